"""Crash safety of the batch jobs: the real CLI SIGKILLed at exact steps of the store's write
contract (phrasefuse/faultpoints.py), then resumed; Ctrl-C and SIGTERM at a known buffered state
stop with exit 130, one line, and the buffered rows as a last whole shard. With model replicas:
test_interrupt_replicas.py (a file of its own, so that the two xdist workers share the slow ones).

No kill races the clock: each job kills itself, or pauses, at a named point, so what is on disk
at the kill is known exactly whatever the machine's speed."""

from __future__ import annotations

import re
import signal

import pyarrow.parquet as pq

from phrasefuse.extract.jobs import extract_images, extract_texts
from phrasefuse.store import EmbeddingStore
from tests.faults.conftest import assert_interrupted, assert_sound, file_states, kill_at, pause_at, shards

ROWS, SHARD = 96, 4  # fault_dataset; --batch-size 1: one row per StoreWriter.add


def shard_names(n: int) -> list[str]:
    return [f"part-{i:05d}.parquet" for i in range(n)]


def temporary_files(store) -> list[str]:
    """Our temporary files in the store, named without their random token (`.X.phrasefuse-T.tmp-PID` -> `.X.tmp-PID`)."""
    return sorted(re.sub(r"\.phrasefuse-[0-9a-f]{16}\.", ".", p.name) for p in store.glob(".*.phrasefuse-*.tmp-*"))


def part_states(store) -> dict:
    return {name: state for name, state in file_states(store).items() if name.startswith("part-")}


# Each step kills a run of `extract images` on the same store. (point, shards in place after the
# kill, the temporary file the kill leaves: a whole shard under its hidden name, or none).
IMAGE_KILLS = [
    ("shard-tmp-written@3", 2, "part-00002"),  # the 3rd shard written to its temporary file, not fsync'ed
    ("shard-synced@2", 3, "part-00003"),  # the next run: part-00002 in place, part-00003 fsync'ed, not renamed
    ("shard-renamed@2", 5, None),  # the next: part-00003 whole; part-00004 renamed into place, nothing after it ran
]


def test_sigkill_at_each_step_of_a_shard_write_then_resume_stores_each_id_once(fault_dataset, tiny_clip_spec,
                                                                               tmp_path):
    out = tmp_path / "img"
    args = ("extract", "images", fault_dataset, "--out", out, "--model", tiny_clip_spec, "--workers", "0",
            "--batch-size", "1", "--shard-size", SHARD)
    for point, in_place, left in IMAGE_KILLS:
        before = part_states(out) if out.exists() else {}
        proc = kill_at(point, *args)
        assert [p.name for p in shards(out)] == shard_names(in_place), point
        assert all(part_states(out)[name] == state for name, state in before.items()), point  # untouched
        # The temporary file a kill leaves is this run's; the stale one of the run before was removed.
        assert temporary_files(out) == ([f".{left}.parquet.tmp-{proc.pid}"] if left else []), point
        if left:  # a whole shard under its hidden name, which no reader looks at
            assert pq.read_metadata(next(out.glob(".*.phrasefuse-*.tmp-*"))).num_rows == SHARD
        ids = assert_sound(out, killed=True)
        assert len(ids) == in_place * SHARD and EmbeddingStore(out).num_rows() == len(ids), point
    kept = part_states(out)

    # The resume (in this process, to keep the suite fast: the same function the CLI calls).
    summary = extract_images(fault_dataset, out, model=tiny_clip_spec, workers=0, batch_size=1, shard_size=SHARD,
                             progress=False)
    kept_rows = len(kept) * SHARD
    assert (summary.present, summary.embedded) == (kept_rows, ROWS - kept_rows)
    assert temporary_files(out) == []
    ids = assert_sound(out)
    assert sorted(ids) == sorted(pq.read_table(fault_dataset)["id"].to_pylist())  # each id exactly once
    assert all(part_states(out)[name] == state for name, state in kept.items())  # untouched by the resume


def test_ctrl_c_with_rows_buffered_exits_130_and_flushes_them_as_a_last_shard(fault_dataset, tiny_clip_spec, tmp_path):
    """SIGTERM (the same handler): tests/faults/test_kill_points.py, on `import`."""
    out = tmp_path / "img"
    # Paused after the 10th row is buffered: 2 shards of 4 written, 2 rows in the buffer.
    proc = pause_at("rows-buffered@10", "extract", "images", fault_dataset, "--out", out, "--model", tiny_clip_spec,
                    "--workers", "0", "--batch-size", "1", "--shard-size", SHARD, mark_dir=tmp_path, sigint=True)
    assert [p.name for p in shards(out)] == shard_names(2)  # the state at the signal, exactly
    proc.send_signal(signal.SIGINT)
    assert_interrupted(proc, [SHARD, SHARD, 2], out)


def test_sigkill_of_extract_texts_mid_write_then_resume_stores_each_id_once(fault_dataset, tiny_clip_spec, tmp_path):
    out = tmp_path / "title"
    proc = kill_at("shard-synced@2", "extract", "texts", fault_dataset, "--col", "title", "--out", out,
                   "--model", tiny_clip_spec, "--shard-size", SHARD)
    assert [p.name for p in shards(out)] == shard_names(1)
    assert temporary_files(out) == [f".part-00001.parquet.tmp-{proc.pid}"]
    assert EmbeddingStore(out).errors().num_rows > 0  # the rows without a title, recorded with the first shard
    assert len(assert_sound(out, killed=True)) == SHARD
    kept = part_states(out)

    resumed = extract_texts(fault_dataset, "title", out, model=tiny_clip_spec, shard_size=SHARD, progress=False)
    assert resumed.present == SHARD and temporary_files(out) == []
    ids = assert_sound(out)
    titles = pq.read_table(fault_dataset)["title"].to_pylist()
    errors = EmbeddingStore(out).errors()["id"].to_pylist()
    assert len(errors) == resumed.failed == titles.count(None)  # retried, failed again, recorded once
    assert sorted(ids + errors) == sorted(pq.read_table(fault_dataset)["id"].to_pylist())  # each id once
    assert all(part_states(out)[name] == state for name, state in kept.items())
