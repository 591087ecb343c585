"""folders.py: phrasefuse deletes or renames only what it can prove it made (marked leftover names
with a token, leftover folders holding that token, leftover files only in phrasefuse's folders), and
a full disk or a file-size limit while a library writes a head, an index or an export is exit 2
naming the file, with nothing half-written."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from phrasefuse.errors import BadInput
from phrasefuse.folders import (OWNER_FILE, atomic_folder, recover_folder, recover_leftovers, remove_folder,
                                write_json_atomic)
from phrasefuse.store import StoreWriter, new_meta

TOKEN = "0123456789abcdef"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def listing(folder: Path) -> list[tuple[str, int, int]]:
    """Every path under `folder` with its size and mtime (byte-identical before and after)."""
    return sorted((str(p.relative_to(folder)), p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*"))


def user_lookalikes(folder: Path, dead: int) -> None:
    """A user's own files named like leftovers of phrasefuse, old style and new style without the proof."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".vimrc.old-2021").write_text("old vimrc")
    (folder / ".photos.old-4242").mkdir()
    (folder / ".photos.old-4242" / "wedding.txt").write_text("precious")
    (folder / f".thesis.tmp-{dead}").mkdir()
    (folder / f".thesis.tmp-{dead}" / "chapter1.tex").write_text("draft")
    (folder / ".inventory.del-4242").write_text("notes")
    (folder / ".notes.tmp-keep").write_text("keep me")
    # the new pattern, but no marker in the folder, or a marker of another token
    unproven = folder / f".thing.phrasefuse-{TOKEN}.old-{dead}"
    unproven.mkdir()
    (unproven / "meta.json").write_text("{}")
    other = folder / f".thing.phrasefuse-{TOKEN}.del-{dead}"
    other.mkdir()
    (other / OWNER_FILE).write_text("fedcba9876543210\n")
    (other / "mine.txt").write_text("mine")


def test_user_files_named_like_leftovers_survive_every_recovery(tmp_path):
    dead = dead_pid()
    user_lookalikes(tmp_path, dead)
    (tmp_path / "run-state.json").write_text('{"format": "phrasefuse-run-state", "stages": {}}')  # even in a work folder
    before = listing(tmp_path)
    recover_leftovers(tmp_path, owned=True)
    recover_folder(tmp_path / "thing")
    with atomic_folder(tmp_path / "thing", "fmt-x", "thing") as tmp:
        write_json_atomic(tmp / "meta.json", {"format": "fmt-x"})
    remove_folder(tmp_path / "thing")
    assert listing(tmp_path) == before


def test_a_leftover_file_is_removed_only_inside_a_phrasefuse_folder(tmp_path):
    dead = dead_pid()
    name = f".report.html.phrasefuse-{TOKEN}.tmp-{dead}"
    plain, store = tmp_path / "plain", tmp_path / "store"
    for folder in (plain, store):
        folder.mkdir()
        (folder / name).write_text("<half")
    (store / "meta.json").write_text('{"format": "phrasefuse-store"}')
    recover_leftovers(plain)
    recover_leftovers(store)
    assert (plain / name).exists() and not (store / name).exists()


def test_a_proven_leftover_folder_of_a_dead_writer_is_removed_and_a_live_ones_kept(tmp_path):
    dead = dead_pid()
    proven = tmp_path / f".thing.phrasefuse-{TOKEN}.tmp-{dead}"
    live = tmp_path / f".thing.phrasefuse-{TOKEN}.tmp-{os.getppid()}"
    for folder in (proven, live):
        folder.mkdir()
        (folder / OWNER_FILE).write_text(TOKEN + "\n")
        (folder / "half.bin").write_bytes(b"x")
    empty = tmp_path / f".other.phrasefuse-{TOKEN}.tmp-{dead}"  # killed between its mkdir and its marker
    empty.mkdir()
    recover_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]


def test_a_folder_output_carries_no_marker_and_leaves_nothing_beside_it(tmp_path):
    out = tmp_path / "thing"
    for n in (1, 2):
        with atomic_folder(out, "fmt-x", "thing") as tmp:
            assert [p.name for p in tmp.iterdir()] == [OWNER_FILE]
            write_json_atomic(tmp / "meta.json", {"format": "fmt-x", "n": n})
    assert [p.name for p in tmp_path.iterdir()] == ["thing"] and [p.name for p in out.iterdir()] == ["meta.json"]
    assert json.loads((out / "meta.json").read_text())["n"] == 2


# ---------------------------------------------------------------- a full disk (a file-size limit)


@contextlib.contextmanager
def file_size_limit(limit: int):
    """RLIMIT_FSIZE: a write past `limit` bytes fails with EFBIG (Python ignores SIGXFSZ), the same
    path as a full disk, without a mount."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def store_of(path: Path, n: int = 50, dim: int = 16) -> Path:
    encoder = {"family": "test", "name": "random", "weights_sha256": "0" * 64, "dim": dim, "spec": "test"}
    meta = new_meta(modality="image", encoder=encoder, dtype="float32", source={"column": "image"})
    with StoreWriter.open(path, meta) as w:
        x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
        w.add([f"r{i}" for i in range(n)], [f"k{i}" for i in range(n)], x / np.linalg.norm(x, axis=1, keepdims=True))
    return path


def write_head(out: Path) -> None:
    from phrasefuse.fuse.artifact import save_head

    save_head(out, {"kind": "linear"}, {"w": np.zeros((64, 64), np.float32)}, {})


def write_index(out: Path) -> None:
    import faiss

    from phrasefuse.index.folder import phrases_table, write_index_folder

    index = faiss.IndexFlatIP(16)
    index.add(np.eye(50, 16, dtype=np.float32))
    write_index_folder(out, index, phrases_table(pa.array([f"p{i}" for i in range(50)]), np.ones(50, np.int64),
                                                 np.full(50, "image")), {"format": "phrasefuse-index"})


def write_export(out: Path) -> None:
    from phrasefuse.interop import export_npy

    export_npy(out.parent / "store", out)


@pytest.mark.parametrize("write, first_file", [(write_head, "weights.safetensors"), (write_index, "index.faiss"),
                                               (write_export, "img_emb/img_emb_00000.npy")])
def test_a_library_writer_on_a_full_disk_is_exit_2_naming_the_file_with_nothing_half_written(write, first_file,
                                                                                             tmp_path):
    store_of(tmp_path / "store")
    out = tmp_path / "out"
    before = listing(tmp_path)
    with file_size_limit(64), pytest.raises(BadInput) as e:  # room for the leftover marker, not for the file
        write(out)
    message = str(e.value)
    assert message.startswith(f"{out / first_file}: cannot write (File too large)") and "\n" not in message
    assert listing(tmp_path) == before  # no output, no temporary left
