"""Two writers of one store: the second is refused with a clear message; the lock of a killed
writer does not block the next job."""

from __future__ import annotations

import signal

from phrasefuse.extract.jobs import extract_images
from tests.faults.conftest import TIMEOUT, assert_sound, error_lines, start_cli, wait_until


def test_second_writer_is_refused_and_a_killed_writers_lock_does_not_block(fault_dataset, tiny_clip_spec, tmp_path):
    out = tmp_path / "img"
    args = ("extract", "images", fault_dataset, "--out", out, "--model", tiny_clip_spec, "--workers", "0",
            "--batch-size", "2", "--shard-size", "8")
    # Started together: whichever opens the store first holds the lock and pauses (fault point) after
    # its first shard, holding it for as long as the other needs; the other never reaches the point.
    mark = tmp_path / "holder-paused"
    jobs = [start_cli(*args, fault="shard-written@1:pause", mark=mark) for _ in range(2)]
    try:
        wait_until(lambda: mark.exists() or all(job.poll() is not None for job in jobs))
        assert mark.exists(), [job.stderr.read() for job in jobs]
        holder_pid = int(mark.read_text().split()[1])
        holder = next(job for job in jobs if job.pid == holder_pid)
        other = next(job for job in jobs if job is not holder)
        assert (out / ".lock").read_text() == str(holder.pid)
        _, stderr = other.communicate(timeout=TIMEOUT)
        assert other.returncode == 2, stderr
        assert error_lines(stderr) == [f"phrasefuse: error: {out}: another job (pid {holder.pid}) is writing this "
                                       f"store; wait for it to finish or write to another --out"]
    finally:
        for job in jobs:
            if job.poll() is None:
                job.send_signal(signal.SIGKILL)  # the holder dies holding the lock; the kernel releases it
            job.wait()
    assert (out / ".lock").read_text() == str(holder.pid)  # the lock file stays behind, unheld
    assert len(assert_sound(out)) == 8  # the paused holder's one shard

    resumed = extract_images(fault_dataset, out, model=tiny_clip_spec, workers=0, shard_size=8, progress=False)
    assert (resumed.present, resumed.embedded) == (8, 96 - 8)
    assert len(assert_sound(out)) == 96
