"""Ctrl-C, SIGTERM and SIGKILL of `extract images --replicas 2`: the model replicas (spawned
processes) never outlive the job, the buffered rows are flushed on exit 130, and a resume completes.
(Without replicas: test_interrupts.py.)"""

from __future__ import annotations

import os
import signal

import pyarrow.parquet as pq
import pytest

from phrasefuse.extract.jobs import extract_images
from tests.faults.conftest import TIMEOUT, assert_interrupted, assert_sound, pause_at, shards, wait_until
from tests.faults.test_interrupts import ROWS, SHARD, shard_names


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (its model replicas, multiprocessing's resource tracker), from /proc."""
    from pathlib import Path

    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    found, todo = [], [pid]
    while todo:
        pid = todo.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        found += children
        todo += children
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed child that no one has reaped yet is gone for our purpose)."""
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


REPLICA_ARGS = ("--workers", "0", "--batch-size", "1", "--shard-size", SHARD, "--device", "cpu", "--replicas", "2")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_ctrl_c_or_sigterm_with_replicas_exits_130_flushes_and_leaves_no_replica(fault_dataset, tiny_clip_spec,
                                                                                 tmp_path, signum):
    out = tmp_path / "img"
    proc = pause_at("rows-buffered@10", "extract", "images", fault_dataset, "--out", out, "--model", tiny_clip_spec,
                    *REPLICA_ARGS, mark_dir=tmp_path, sigint=True)
    replicas = [pid for pid in descendants(proc.pid) if "multiprocessing.spawn" in cmdline(pid)]
    assert len(replicas) == 2
    for pid in replicas if signum == signal.SIGINT else []:  # Ctrl-C in a terminal reaches them too: ignored
        os.kill(pid, signum)
    proc.send_signal(signum)
    assert_interrupted(proc, [SHARD, SHARD, 2], out)
    assert not [pid for pid in replicas if running(pid)] and not descendants(proc.pid)


def test_sigkill_with_replicas_takes_the_replicas_down_and_resume_completes(fault_dataset, tiny_clip_spec, tmp_path):
    out = tmp_path / "img"
    proc = pause_at("rows-buffered@6", "extract", "images", fault_dataset, "--out", out, "--model", tiny_clip_spec,
                    *REPLICA_ARGS, mark_dir=tmp_path)
    replicas = [pid for pid in descendants(proc.pid) if "multiprocessing.spawn" in cmdline(pid)]
    assert len(replicas) == 2
    proc.kill()
    proc.communicate(timeout=TIMEOUT)
    wait_until(lambda: not any(running(pid) for pid in replicas))  # the kernel kills them with their parent
    assert [p.name for p in shards(out)] == shard_names(1)
    # The resume in this process, without replicas (resuming with them: tests/extract/test_replicas.py).
    summary = extract_images(fault_dataset, out, model=tiny_clip_spec, batch_size=1, shard_size=SHARD, device="cpu",
                             progress=False)
    assert (summary.present, summary.embedded) == (SHARD, ROWS - SHARD)
    assert sorted(assert_sound(out)) == sorted(pq.read_table(fault_dataset)["id"].to_pylist())


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
