"""Helpers of the fault-injection suite: the real CLI as a process we can kill, store checks,
and a small filesystem we can fill up or make read-only."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phrasefuse.store import EmbeddingStore, verify_store


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "phrasefuse", *map(str, args)]


def start_cli(*args, **kwargs) -> subprocess.Popen:
    """The real `phrasefuse` CLI as a background process (to kill or interrupt)."""
    return subprocess.Popen(cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kwargs)


def wait_until(condition, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    """Poll `condition` until true; fail if `proc` ends first or the timeout passes."""
    deadline = time.time() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before the fault could be injected:\n"
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        if time.time() > deadline:
            raise AssertionError("timed out waiting for the job")
        time.sleep(0.005)


def shards(store: Path) -> list[Path]:
    return sorted(store.glob("part-*.parquet"))


def assert_sound(store: Path, killed: bool = False) -> list[str]:
    """Every shard readable and valid, each id once; returns the ids. No temporary file is left,
    except, right after a kill, the hidden one of an interrupted write (readers never see it;
    the next run removes it)."""
    assert verify_store(EmbeddingStore(store)) == []
    ids = EmbeddingStore(store).ids_and_keys()["id"].to_pylist()
    assert len(ids) == len(set(ids))
    assert len(list(store.glob(".*.tmp-*"))) <= (1 if killed else 0)
    return ids


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
