"""How a batch job runs: the local engine and the Ray engine, one interface.

Every batch job (extract images, extract texts, phrases) is reader -> mapper -> writer:

  reader  the job works out its pending rows in this process (the manifest or store rows
          whose id is not yet in the output store);
  mapper  `engine.map(job)`: the job's `Job` declares its mapper for both engines, and the
          engine runs one of them, yielding the same mapped batches either way;
  writer  the job writes every batch through `store.StoreWriter`, in this process whatever the
          engine: whole shards, errors.parquet, the store lock; so resume and embed-once behave
          the same on both engines.

`LocalEngine` calls `Job.local()`. `RayEngine` runs the mapper on Ray Data, so that a Ray
cluster spreads the work: `Job.read(ray)` makes the pending rows a Dataset, `map_batches`
runs `Job.actor` (a callable class) in an actor pool, one actor per device (per GPU, else one
per CPU left after the driver's) which loads the model once and checks that its weights are
the ones the driver recorded in meta.json, and `Job.collect` turns the Arrow tables streamed
back (`iter_batches`, in whatever order the actors finish: stores are keyed by id) into the
job's mapped batches.

`ReplicaPool` runs a job's actor class without Ray, in N spawned processes on this machine (the
local engine on a CPU: `extract images --replicas`): N single-threaded copies of the model instead
of one over N threads; blocks of pending rows go to the least busy replica and the outputs come
back in order, to the same conversion as Ray's (`Job.collect`) and the same writer.

Nothing of Ray is imported with the local engine. Ray starts on first use: `RayOptions.address`
(`--ray-address`), else $RAY_ADDRESS, else a local instance on this machine (a few seconds).
Every file path (manifest images, the index, the image store) must be readable at the same
path on every node of a cluster (shared storage).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from phrasefuse.errors import BadInput
from phrasefuse.store import encoder_identity

ENGINES = ("local", "ray")
BLOCK_BATCHES = 4  # model batches per block handed to a Ray actor


@dataclass
class RayOptions:
    """Where and how wide `--engine ray` runs: `address` None means $RAY_ADDRESS, else a new
    local Ray; `actors` None means one model actor per GPU, else one per spare CPU."""

    address: str | None = None
    actors: int | None = None


@dataclass
class Job:
    """A batch job's mapper, as both engines run it.

    `pending` False: nothing to map (Ray is not even started). `local()` yields the mapped
    batches in this process. On Ray: `read(ray)` is the pending rows as a `ray.data.Dataset`;
    `actor(**actor_args, device=..., threads=...)` maps `batch_size` rows at a time (its
    output: Arrow tables); `collect(tables)` yields the same mapped batches as `local()`.
    `device` is the user's --device (the Ray engine picks GPUs or CPUs for the actors from it).
    """

    pending: bool
    local: Callable[[], Iterator]
    actor: type
    actor_args: dict
    read: Callable[[Any], Any]
    batch_size: int
    collect: Callable[[Iterator[pa.Table]], Iterator]
    device: str = "auto"


class LocalEngine:
    """The mapper in this process (`Job.local`), the model on `--device`."""

    name = "local"

    def driver_encoder(self, load: Callable, spec: str, device: str):
        """The encoder the job runs here."""
        return load(spec, device)

    def map(self, job: Job) -> Iterator:
        if job.pending:
            yield from job.local()


class RayEngine:
    """The mapper in Ray actors (`Job.actor`); pending rows and the writer stay in this process."""

    name = "ray"

    def __init__(self, options: RayOptions | None = None):
        self.options = options or RayOptions()
        preflight(self.options)  # before a job opens its store: Ray installed, the cluster reachable

    def driver_encoder(self, load: Callable, spec: str, device: str):
        """The actors run the model; this copy (on CPU) only names the encoder (its weights checksum)."""
        return load(spec, "cpu")

    def map(self, job: Job) -> Iterator:
        if not job.pending:
            return
        with ray_session(self.options.address) as ray:
            resources, actor_device, threads = actor_pool(ray, job.device, self.options.actors)
            results = job.read(ray).map_batches(
                job.actor, batch_size=job.batch_size, batch_format="pyarrow",
                fn_constructor_kwargs={**job.actor_args, "device": actor_device, "threads": threads}, **resources)
            yield from job.collect(results.iter_batches(batch_size=None, batch_format="pyarrow"))


def get_engine(engine: str, ray: RayOptions | None = None) -> LocalEngine | RayEngine:
    """The engine named by --engine; for Ray, checked before any store is opened."""
    if engine not in ENGINES:
        raise BadInput(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
    return RayEngine(ray) if engine == "ray" else LocalEngine()


# ---------------------------------------------------------------- progress


LOG_EVERY = 30.0  # seconds between progress lines when stderr is not a terminal


@contextlib.contextmanager
def progress(total: int, label: str, enabled: bool | None, unit: str = "rows"):
    """Every batch job's progress, yielding advance(n): on a terminal a rich bar (rows/s, ETA);
    otherwise (a batch log) one line at most every LOG_EVERY seconds with done/total, rate and ETA,
    so the log shows the job is alive. `enabled` False: nothing (e.g. --json); None: by the terminal."""
    if enabled is False or total == 0:
        yield lambda n: None
        return
    if not (enabled or sys.stderr.isatty()):
        yield _progress_lines(total, label, unit=unit)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
    start = time.perf_counter()
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total, rate="")
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            rate = done / max(1e-9, time.perf_counter() - start)
            bar.update(task, advance=n, rate=f"{rate:.1f} {unit}/s")

        yield advance


def _progress_lines(total: int, label: str, every: float | None = None,
                    unit: str = "rows") -> Callable[[int], None]:
    """advance(n) that prints 'LABEL: done/total (p%), rate UNIT/s, ETA' at most every `every` s
    (default LOG_EVERY)."""
    every = LOG_EVERY if every is None else every
    start = last = time.monotonic()
    done = 0

    def advance(n: int) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last < every:
            return
        last = now
        rate = done / max(1e-9, now - start)
        eta = (total - done) / rate if rate > 0 else float("inf")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 86400 * 30 else "unknown"
        print(f"{label}: {done}/{total} ({100 * done / total:.0f}%), {rate:.1f} {unit}/s, ETA {eta_text}",
              file=sys.stderr, flush=True)

    return advance


# ---------------------------------------------------------------- Ray session and actor pool


def preflight(options: RayOptions) -> None:
    """Before a job opens its store: Ray is installed, and the cluster address answers."""
    _import_ray()
    _probe(options.address or os.environ.get("RAY_ADDRESS"))


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise BadInput("--engine ray: Ray is not installed; pip install 'phrasefuse[ray]' (or use --engine local)") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None):
    """The connected `ray` module; a Ray started here is shut down on exit (one already
    initialised by the caller, e.g. tests, is left running)."""
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        _probe(address or os.environ.get("RAY_ADDRESS"))
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        except (ConnectionError, ValueError) as e:
            raise BadInput(f"--ray-address {address or '$RAY_ADDRESS'}: cannot connect to Ray "
                           f"({str(e).splitlines()[0][:160]}); check the address or unset it") from None
        started = True
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # execution plans and "progress bars disabled"
    ray.data.DataContext.get_current().enable_progress_bars = False  # the job's own summary line is the report
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _probe(address: str | None, timeout: float = 5.0) -> None:
    """Fail in seconds on an unreachable HOST:PORT (Ray itself retries for minutes)."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        return  # a form only Ray knows: let it judge
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise BadInput(f"--ray-address {address}: nothing answers there ({e.strerror or e}); start the cluster "
                       f"('ray start --head') or fix the address") from None


def actor_pool(ray, device: str, actors: int | None) -> tuple[dict, str, int]:
    """(map_batches resource arguments, device for the actors, threads per actor): one actor
    per GPU when the cluster has GPUs (and `device` allows), else one per CPU but one (kept for
    the driver and Ray's read tasks), each with an equal share of the CPUs."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if actors is not None and actors < 1:
        raise BadInput(f"--ray-actors {actors}: must be at least 1")
    if device == "cuda" and not gpus:
        raise BadInput("--device cuda: the Ray cluster has no GPU; use --device auto or cpu")
    if device != "cpu" and gpus:
        n = actors or gpus
        return {"compute": ray.data.ActorPoolStrategy(size=n), "num_gpus": 1, "num_cpus": 1}, "cuda", 1
    spare = max(1, cpus - 1)
    n = actors or spare
    threads = max(1, spare // n)
    return {"compute": ray.data.ActorPoolStrategy(size=n), "num_cpus": threads}, "cpu", threads


def arrow_blocks(ray, table: pa.Table, rows: int):
    """A Ray Dataset of `table` in blocks of `rows` rows (each block goes to one actor call or a few)."""
    return ray.data.from_arrow([table.slice(start, rows) for start in range(0, table.num_rows, rows)])


def check_identity(loaded: dict, expected: dict, spec: str) -> None:
    """In an actor: a node with other weights (another package version, another file) must not mix its vectors in."""
    if encoder_identity(loaded) != encoder_identity(expected):
        raise RuntimeError(f"{spec}: a Ray worker loaded weights {loaded.get('weights_sha256', '')[:12]} "
                           f"(dim {loaded.get('dim')}), the driver {expected.get('weights_sha256', '')[:12]} "
                           f"(dim {expected.get('dim')}); install the same model on every node")


def set_threads(threads: int) -> None:
    """In an actor: torch's intra-op threads, its share of the node's CPUs."""
    import torch

    torch.set_num_threads(threads)


# ---------------------------------------------------------------- model replicas (local engine, CPU)


REPLICA_IN_FLIGHT = 2  # blocks queued per replica: one it maps, one waiting, so it never idles
REPLICA_POLL = 0.5  # seconds between checks that every replica is alive while waiting for a result


def cpu_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class ReplicaPool:
    """`replicas` processes on this machine, each holding one `actor(**args, device="cpu",
    threads=threads)` (a Ray actor class of a job: `Job.actor`), so that N single-threaded copies of
    a CPU model run side by side instead of one model over N threads (whose threads wait for each
    other at every operator). `map(blocks)` hands each block (an Arrow table of rows) to the least
    busy replica and yields their outputs in the blocks' order; the caller keeps writing.

    Spawned, not forked: a fresh interpreter per replica, so no OpenMP pool or lock of this process
    is inherited. Replicas ignore SIGINT and SIGTERM (Ctrl-C reaches the whole process group; this
    process stops the job and `close` kills them) and die with this process (Linux PR_SET_PDEATHSIG,
    else within a second of noticing a new parent). A replica that fails or dies fails the job."""

    def __init__(self, actor: type, args: dict, replicas: int, threads: int = 1):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(replicas)]
        self.identities: list[dict | None] = [None] * replicas
        self.expected: dict | None = None
        self.sent = 0  # blocks handed out so far (their seq numbers)
        self.closed = False
        self.procs = [ctx.Process(target=_replica_main, name=f"phrasefuse-replica-{i}", daemon=True,
                                  args=(actor, args, threads, i, os.getpid(), self.tasks[i], self.results))
                      for i in range(replicas)]
        try:
            for proc in self.procs:
                proc.start()
        except BaseException:
            self.close()  # those already started
            raise

    def __enter__(self) -> "ReplicaPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def expect(self, identity: dict, spec: str) -> None:
        """Every replica must load these weights (checked as each reports ready)."""
        self.expected, self.spec = identity, spec
        for loaded in filter(None, self.identities):
            self._check(loaded)

    def broadcast(self, method: str, *args) -> None:
        """`actor.method(*args)` in every replica, before any block sent after this call."""
        for tasks in self.tasks:
            tasks.put(("call", method, args))

    def map(self, blocks) -> Iterator:
        """Each block through one replica's actor; the outputs in the blocks' order."""
        blocks, more = iter(blocks), True
        busy, owner, done = [0] * len(self.procs), {}, {}  # blocks queued per replica; seq -> replica; seq -> output
        first = next_out = self.sent  # seq numbers run on across calls: a result of an abandoned map is dropped
        while more or owner:
            while more and min(busy) < REPLICA_IN_FLIGHT:
                block = next(blocks, None)
                if block is None:
                    more = False
                    break
                replica = busy.index(min(busy))
                self.tasks[replica].put(("map", self.sent, block))
                busy[replica], owner[self.sent], self.sent = busy[replica] + 1, replica, self.sent + 1
            if not owner:
                continue
            seq, out = self._receive()
            if seq not in owner or seq < first:
                continue
            busy[owner.pop(seq)] -= 1
            done[seq] = out
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1

    def _receive(self) -> tuple[int, Any]:
        """The next mapped block (seq, output); readiness reports are checked on the way."""
        import queue

        while True:
            try:
                kind, replica, seq, payload = self.results.get(timeout=REPLICA_POLL)
            except queue.Empty:
                self._check_alive()
                continue
            if kind == "map":
                return seq, payload
            if kind == "ready":
                self.identities[replica] = payload
                if self.expected is not None and payload is not None:
                    self._check(payload)
                continue
            error, message = payload
            if error == "BadInput":
                raise BadInput(message)
            raise RuntimeError(f"model replica {replica}: {message}")

    def _check(self, loaded: dict) -> None:
        if encoder_identity(loaded) != encoder_identity(self.expected):
            raise RuntimeError(f"{self.spec}: a model replica loaded weights {loaded.get('weights_sha256', '')[:12]}, "
                               f"this process {self.expected.get('weights_sha256', '')[:12]} (the model files "
                               f"changed while the job started?); run it again")

    def _check_alive(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.exitcode is not None:
                how = f"signal {-proc.exitcode}" if proc.exitcode < 0 else f"exit {proc.exitcode}"
                raise RuntimeError(f"model replica {i} ended unexpectedly ({how}; out of memory?); "
                                   f"the store keeps every finished shard and a rerun resumes (or pass --replicas 1)")

    def close(self) -> None:
        """Stop every replica (killed: they only map, nothing of theirs needs saving). Idempotent."""
        if self.closed:
            return
        self.closed = True
        started = [proc for proc in self.procs if proc.pid is not None]
        for proc in started:
            if proc.exitcode is None:
                proc.kill()
        for proc in started:
            proc.join(timeout=10)
        for q in (*self.tasks, self.results):
            q.cancel_join_thread()  # a block still in a pipe to a killed replica must not hang the exit
            q.close()


def _replica_main(actor: type, args: dict, threads: int, index: int, parent: int, tasks, results) -> None:
    """A replica process: load the actor, then map what `tasks` brings until told to stop or orphaned."""
    import queue
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    _die_with_parent(parent)
    try:
        set_threads(threads)
        worker = actor(**args, device="cpu", threads=threads)
        results.put(("ready", index, None, getattr(worker, "identity", None)))
    except Exception as e:  # noqa: BLE001 - reported to the job, which fails with it
        results.put(("error", index, None, _failure(e)))
        return
    while True:
        try:
            kind, seq, payload = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        try:
            if kind == "map":
                results.put(("map", index, seq, worker(payload)))
            else:
                getattr(worker, seq)(*payload)
        except Exception as e:  # noqa: BLE001 - bad rows are the actor's business; this is a broken job
            results.put(("error", index, seq, _failure(e)))
            return


def _failure(e: Exception) -> tuple[str, str]:
    if isinstance(e, BadInput):
        return "BadInput", str(e)
    return type(e).__name__, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def _die_with_parent(parent: int) -> None:
    """The kernel kills this process when its parent dies (Linux); elsewhere the task loop polls."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(0)
