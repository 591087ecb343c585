"""Helpers of the fault-injection suite: the real CLI as a process that kills itself or pauses at an
exact fault point (phrasefuse/faultpoints.py), store checks, and a small filesystem we can fill
up or make read-only."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from phrasefuse.faultpoints import ENV as FAULT_ENV
from phrasefuse.faultpoints import MARK_ENV
from phrasefuse.store import EmbeddingStore, verify_store

TIMEOUT = 600  # seconds; generous: only a hung job ever reaches it (the machine may be loaded)


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "phrasefuse", *map(str, args)]


def cli_env(fault: str | None = None, mark: Path | None = None) -> dict[str, str]:
    """The environment of a CLI run; `fault` plants a fault point (phrasefuse/faultpoints.py)."""
    env = {k: v for k, v in os.environ.items() if k not in (FAULT_ENV, MARK_ENV)}
    env["HF_HUB_OFFLINE"] = "1"
    if fault:
        env[FAULT_ENV] = fault
    if mark:
        env[MARK_ENV] = str(mark)
    return env


def start_cli(*args, fault: str | None = None, mark: Path | None = None, sigint: bool = False,
              **kwargs) -> subprocess.Popen:
    """The real `phrasefuse` CLI as a background process (to kill or interrupt). `sigint`: Ctrl-C
    acts as in a terminal (a job started in the background inherits an ignored SIGINT)."""
    if sigint:
        kwargs["preexec_fn"] = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    return subprocess.Popen(cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(fault, mark), **kwargs)


def kill_at(point: str, *args) -> subprocess.Popen:
    """Run the real CLI until it SIGKILLs itself at fault point `point` (`NAME@N`); fail if it
    ends any other way (the point was not reached, or reached in another order)."""
    proc = start_cli(*args, fault=f"{point}:kill")
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, f"{point}: the job exited {proc.returncode} instead:\n{stderr}"
    return proc


def pause_at(point: str, *args, mark_dir: Path, **kwargs) -> subprocess.Popen:
    """Start the real CLI and return once it is paused at fault point `point` (it sleeps there
    until a signal's handler raises, or it is killed): the state it is in is known exactly."""
    mark = mark_dir / f"paused-{point}"
    proc = start_cli(*args, fault=f"{point}:pause", mark=mark, **kwargs)
    wait_until(mark.exists, proc)
    assert mark.read_text().split() == [point.partition("@")[0], str(proc.pid)]
    return proc


def wait_until(condition, proc: subprocess.Popen | None = None, timeout: float = TIMEOUT) -> None:
    """Poll `condition` until true; fail if `proc` ends first or the timeout passes. Only for
    conditions that stay true once reached (a fault point's mark): never a race with the job."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before the fault could be injected:\n"
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the job")
        time.sleep(0.01)


def shards(store: Path) -> list[Path]:
    return sorted(store.glob("part-*.parquet"))


def assert_sound(store: Path, killed: bool = False) -> list[str]:
    """Every shard readable and valid, each id once; returns the ids. No temporary file is left,
    except, right after a kill, the hidden one of an interrupted write (readers never see it;
    the next run removes it)."""
    assert verify_store(EmbeddingStore(store)) == []
    ids = EmbeddingStore(store).ids_and_keys()["id"].to_pylist()
    assert len(ids) == len(set(ids))
    assert len(list(store.glob(".*.phrasefuse-*.tmp-*"))) <= (1 if killed else 0)
    return ids


def assert_interrupted(proc: subprocess.Popen, shard_rows: list[int], out: Path) -> None:
    """Exit 130 and the one line saying what is kept; the shards hold `shard_rows` rows, the last
    one the 1 to shard_size - 1 rows that were buffered at the signal (flushed whole)."""
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, stderr
    line = error_lines(stderr)
    assert len(line) == 1 and line[0].startswith("phrasefuse: interrupted;") and "Traceback" not in stderr, stderr
    kept = re.search(r"(\d+) rows written by this run, (\d+) rows in (\d+) shards kept", line[0])
    assert kept and tuple(map(int, kept.groups())) == (sum(shard_rows), sum(shard_rows), len(shard_rows)), line[0]
    assert [pq.read_metadata(p).num_rows for p in shards(out)] == shard_rows
    assert 1 <= shard_rows[-1] < shard_rows[0] and len(assert_sound(out)) == sum(shard_rows)


def file_states(folder: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, size, mtime) of each file: unchanged means not rewritten."""
    return {p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str = "4m"):
    """A tmpfs of `size` mounted on `folder` (yields True), or, where we may not mount (not root),
    a plain folder (yields False: the caller falls back to RLIMIT_FSIZE / chmod)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture(scope="session")
def fault_dataset(tmp_path_factory) -> Path:
    """96 generated JPEGs (12 shards of 8) and their manifest; read-only for tests."""
    from phrasefuse.synthetic import generate_images

    return generate_images(tmp_path_factory.mktemp("faults-data"), 96, seed=3, size=(160, 120))


def error_lines(stderr: str) -> list[str]:
    """stderr without open_clip's warning that the tiny test model has random weights."""
    return [line for line in stderr.splitlines() if line.strip() and "No pretrained weights loaded" not in line]
