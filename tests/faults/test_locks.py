"""Two writers of one store: the second is refused with a clear message; the lock of a killed
writer does not block the next job."""

from __future__ import annotations

import signal

from phrasefuse.extract.jobs import extract_images
from tests.faults.conftest import assert_sound, error_lines, shards, start_cli, wait_until


def test_second_writer_is_refused_and_a_killed_writers_lock_does_not_block(fault_dataset, tiny_clip_spec, tmp_path):
    out = tmp_path / "img"
    args = ("extract", "images", fault_dataset, "--out", out, "--model", tiny_clip_spec, "--workers", "0",
            "--batch-size", "2", "--shard-size", "8")
    jobs = [start_cli(*args), start_cli(*args)]  # started together: whichever opens the store first holds it
    wait_until(lambda: len(shards(out)) >= 1)
    holder = next(job for job in jobs if (out / ".lock").read_text() == str(job.pid))
    other = next(job for job in jobs if job is not holder)
    holder.send_signal(signal.SIGSTOP)  # holds the lock for as long as the other needs
    try:
        _, stderr = other.communicate(timeout=120)
        assert other.returncode == 2, stderr
        assert error_lines(stderr) == [f"phrasefuse: error: {out}: another job (pid {holder.pid}) is writing this "
                                       f"store; wait for it to finish or write to another --out"]
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock; the kernel releases it
        holder.wait()
    assert (out / ".lock").read_text() == str(holder.pid)  # the lock file stays behind, unheld
    kept = len(assert_sound(out, killed=True))

    resumed = extract_images(fault_dataset, out, model=tiny_clip_spec, workers=0, shard_size=8, progress=False)
    assert (resumed.present, resumed.embedded) == (kept, 96 - kept)
    assert len(assert_sound(out)) == 96
