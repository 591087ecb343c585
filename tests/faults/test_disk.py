"""A full disk or a read-only output folder: a clear one-line error (exit 2), nothing corrupted,
earlier shards intact, and the re-run after fixing it completes."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess

import pytest

from phrasefuse.errors import BadInput
from phrasefuse.extract.jobs import extract_images
from tests.conftest import run_cli
from tests.faults.conftest import assert_sound, error_lines, file_states, small_filesystem


def fill(folder) -> None:
    """Write a ballast file until the filesystem has no byte left."""
    with open(folder / "ballast", "wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC


def limit_file_size():  # preexec_fn: files over 2 KB fail with EFBIG instead of killing the job
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))


def test_disk_full_is_a_clear_error_and_earlier_shards_survive(fault_dataset, tiny_clip_spec, tmp_path):
    disk = tmp_path / "disk"
    with small_filesystem(disk, "2m") as mounted:
        out = disk / "img"
        extract_images(fault_dataset, out, model=tiny_clip_spec, workers=0, shard_size=8, limit=24, progress=False)
        before = file_states(out)
        if mounted:
            fill(disk)  # a real full disk (tmpfs): the next shard gets ENOSPC
        proc = run_cli("extract", "images", fault_dataset, "--out", out, "--model", tiny_clip_spec, "--workers", "0",
                       "--shard-size", "8", preexec_fn=None if mounted else limit_file_size)
        assert proc.returncode == 2, proc.stderr
        [message] = error_lines(proc.stderr)
        assert (f"{out}/part-00003.parquet: cannot write ("
                f"{os.strerror(errno.ENOSPC if mounted else errno.EFBIG)})") in message, message
        after = file_states(out)
        assert {k: v for k, v in after.items() if k.startswith("part-")} == \
            {k: v for k, v in before.items() if k.startswith("part-")}  # earlier shards untouched
        assert len(assert_sound(out)) == 24  # nothing half-written

        (disk / "ballast").unlink(missing_ok=True)  # free the space, run again
        again = extract_images(fault_dataset, out, model=tiny_clip_spec, workers=0, shard_size=8, progress=False)
        assert (again.present, again.embedded) == (24, 72)
        assert len(assert_sound(out)) == 96


def test_read_only_output_is_a_clear_error_and_nothing_is_written(fault_dataset, tiny_clip_spec, tmp_path):
    folder = tmp_path / "ro"
    with small_filesystem(folder, "2m") as mounted:
        out = folder / "img"
        extract_images(fault_dataset, out, model=tiny_clip_spec, workers=0, shard_size=8, limit=8, progress=False)
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        elif os.geteuid() != 0:
            out.chmod(0o555)
            folder.chmod(0o555)
        else:
            pytest.skip("root without mount: cannot make a folder read-only")
        before = file_states(out)
        proc = run_cli("extract", "images", fault_dataset, "--out", out, "--model", tiny_clip_spec, "--workers", "0")
        assert proc.returncode == 2, proc.stderr
        [message] = error_lines(proc.stderr)
        assert str(out) in message
        assert "cannot write" in message
        assert file_states(out) == before and sorted(os.listdir(folder)) == ["img"]  # nothing written
        with pytest.raises(BadInput, match=f"{folder / 'new'}: cannot create the store folder"):
            extract_images(fault_dataset, folder / "new", model=tiny_clip_spec, workers=0, progress=False)
        if not mounted:
            folder.chmod(0o755)
            out.chmod(0o755)
