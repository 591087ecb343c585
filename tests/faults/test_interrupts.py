"""Crash safety of the batch jobs: SIGKILL of the real CLI at random points, then resume;
Ctrl-C (SIGINT) stops with exit 130 and says what is kept."""

from __future__ import annotations

import re
import signal
import time

import numpy as np
import pyarrow.parquet as pq

from phrasefuse.extract.jobs import extract_images
from phrasefuse.store import EmbeddingStore
from tests.faults.conftest import assert_sound, error_lines, file_states, shards, start_cli, wait_until

ROWS, SHARD = 96, 4  # fault_dataset: 24 shards


def holds_lock(store, proc) -> bool:
    try:
        return (store / ".lock").read_text() == str(proc.pid)
    except FileNotFoundError:
        return False


def test_sigkill_at_random_points_then_resume_stores_each_id_once(fault_dataset, tiny_clip_spec, tmp_path):
    out = tmp_path / "img"
    args = ("extract", "images", fault_dataset, "--out", out, "--model", tiny_clip_spec, "--workers", "0",
            "--batch-size", "1", "--shard-size", SHARD)
    rng = np.random.default_rng(6)
    # Three kill points: once the job holds the store, after a random number of further shards
    # (0: before or during its first write), plus a random delay that lands anywhere in a batch
    # or a shard write.
    for point in range(3):
        before = len(shards(out))
        target = before + int(rng.integers(0, 5))
        proc = start_cli(*args)
        wait_until(lambda: holds_lock(out, proc) and len(shards(out)) >= target, proc)
        time.sleep(float(rng.uniform(0, 0.1)))
        assert proc.poll() is None, f"kill point {point}: the job finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ids = assert_sound(out, killed=True)  # after each kill: every shard whole and readable, no id twice
        assert len(ids) < ROWS and len(shards(out)) >= before
    kept = file_states(out)
    kept_rows = EmbeddingStore(out).num_rows()

    # The resume (in this process, to keep the suite fast: the same function the CLI calls).
    summary = extract_images(fault_dataset, out, model=tiny_clip_spec, workers=0, batch_size=1, shard_size=SHARD,
                             progress=False)
    assert (summary.present, summary.embedded) == (kept_rows, ROWS - kept_rows)
    ids = assert_sound(out)
    assert sorted(ids) == sorted(pq.read_table(fault_dataset)["id"].to_pylist())  # each id exactly once
    after = file_states(out)
    assert all(after[name] == state for name, state in kept.items() if name.startswith("part-"))  # untouched


def test_ctrl_c_exits_130_and_says_what_is_kept(fault_dataset, tiny_clip_spec, tmp_path):
    out = tmp_path / "img"
    # A job started in the background inherits an ignored SIGINT; a terminal's job has the default.
    proc = start_cli("extract", "images", fault_dataset, "--out", out, "--model", tiny_clip_spec, "--workers", "0",
                     "--batch-size", "1", "--shard-size", SHARD,
                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_until(lambda: len(shards(out)) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    line = error_lines(stderr)
    assert len(line) == 1 and "interrupted" in line[0] and "Traceback" not in stderr, stderr
    kept = re.search(r"(\d+) rows written by this run, (\d+) rows in (\d+) shards kept", line[0])
    assert kept, line[0]
    ids = assert_sound(out)
    # The rows buffered at Ctrl-C were flushed as a last whole shard; the line counts what is on disk.
    assert int(kept[1]) == int(kept[2]) == len(ids) >= 2 * SHARD and int(kept[3]) == len(shards(out))
