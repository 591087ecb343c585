"""Kills that leave state behind: a folder swap cut between its two renames, a derived store cut
half-way through its deletion, a shard written but errors.parquet not yet rewritten; and a run
that must retry failed rows. Each state is built exactly as the kill leaves it (no timing)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phrasefuse.folders import (OWNER_FILE, atomic_folder, is_folder_of, recover_folder, recover_leftovers,
                                remove_folder, write_json_atomic)
from phrasefuse.store import EmbeddingStore, StoreWriter, new_meta
from tests.faults.test_tampered_heads import _encoder, write_data


def dead_pid() -> int:
    """The pid of a process that has exited (what a SIGKILLed writer leaves in its leftovers' names)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


TOKEN = "0123456789abcdef"


def leftover(out: Path, kind: str, pid: int, token: str = TOKEN) -> Path:
    """The name a writer of pid `pid` gives a temporary (tmp), moved-aside (old) or deleted (del) `out`."""
    return out.with_name(f".{out.name}.phrasefuse-{token}.{kind}-{pid}")


def marked_folder(path: Path, token: str = TOKEN) -> Path:
    """A leftover folder as phrasefuse leaves it: its owner marker holds the token of its name."""
    path.mkdir()
    (path / OWNER_FILE).write_text(token + "\n")
    return path


def killed_mid_swap(out: Path, pid: int, new_written: bool = True) -> None:
    """`_swap_in` killed after `out` -> .out.phrasefuse-T.old-PID and before .out.phrasefuse-T.tmp-PID -> out."""
    (out / OWNER_FILE).write_text(TOKEN + "\n")  # marked before it moves aside
    os.rename(out, leftover(out, "old", pid))
    tmp = marked_folder(leftover(out, "tmp", pid))
    if new_written:
        (tmp / "meta.json").write_text("{}")


def listing(folder: Path) -> list[tuple[str, int, int]]:
    """Every path under `folder` with its size and mtime: a reader must leave it byte-identical."""
    return sorted((str(p.relative_to(folder)), p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from phrasefuse.fuse.train import train_head

    folder = tmp_path_factory.mktemp("stale")
    manifest, img = write_data(folder, n=160)
    train_head(str(manifest), [f"image={img}"], folder / "head", kind="linear", seed=0)
    return manifest, img, folder / "head"


def test_a_head_killed_between_the_two_renames_is_read_in_place_and_put_back_by_the_next_writer(trained, tmp_path):
    from phrasefuse.fuse.artifact import is_head, load_head

    _, _, head = trained
    h = tmp_path / "h"
    shutil.copytree(head, h)
    pid = dead_pid()
    killed_mid_swap(h, pid)
    before = listing(tmp_path)
    assert is_head(h)  # the reader reads the old head where it lies...
    assert load_head(h).vocab
    assert listing(tmp_path) == before  # ...and renames or deletes nothing (a read-only command)
    recover_folder(h)  # the next writer puts it back and removes the dead writer's leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h"] and not (h / OWNER_FILE).exists()
    assert load_head(h).vocab


def test_an_index_or_store_killed_mid_swap_is_read_in_place_by_read_meta_json(trained, tmp_path):
    _, img, _ = trained
    st = tmp_path / "st"
    shutil.copytree(img, st)
    killed_mid_swap(st, dead_pid())
    before = listing(tmp_path)
    assert EmbeddingStore(st).meta["dim"] == 16 and EmbeddingStore(st).num_rows() == 160
    assert listing(tmp_path) == before
    recover_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["st"] and EmbeddingStore(st).num_rows() == 160


def test_the_next_write_cleans_leftovers_of_dead_writers_and_spares_live_ones(tmp_path):
    out = tmp_path / "thing"
    with atomic_folder(out, "fmt-x", "thing") as tmp:
        write_json_atomic(tmp / "meta.json", {"format": "fmt-x", "n": 1})
    dead = dead_pid()
    for kind in ("tmp", "old", "del"):
        marked_folder(leftover(out, kind, dead))
    live = marked_folder(leftover(out, "tmp", os.getppid()))  # a live process (the runner's parent) is writing
    with atomic_folder(out, "fmt-x", "thing") as tmp:
        write_json_atomic(tmp / "meta.json", {"format": "fmt-x", "n": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["thing", live.name])
    assert not (out / OWNER_FILE).exists()
    assert json.loads((out / "meta.json").read_text())["n"] == 2


def test_the_new_folder_wins_when_the_kill_came_after_the_second_rename(tmp_path):
    out = tmp_path / "thing"
    out.mkdir()
    (out / "meta.json").write_text(json.dumps({"format": "fmt-x", "n": "new"}))
    old = marked_folder(leftover(out, "old", dead_pid()))
    (old / "meta.json").write_text(json.dumps({"format": "fmt-x", "n": "old"}))
    assert is_folder_of(out, "fmt-x") and old.exists()  # a reader reads the new one and removes nothing
    recover_folder(out)  # the next writer removes the old copy
    assert json.loads((out / "meta.json").read_text())["n"] == "new" and not old.exists()


def test_leftovers_of_files_and_folders_in_a_work_folder_are_recovered_in_one_pass(tmp_path):
    dead = dead_pid()
    (tmp_path / "run-state.json").write_text('{"format": "phrasefuse-run-state", "stages": {}}')
    leftover(tmp_path / "report.html", "tmp", dead).write_text("<half")
    leftover(tmp_path / "run-state.json", "tmp", dead).write_text("{")
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "meta.json").write_text("{}")
    killed_mid_swap(tmp_path / "index", dead)
    marked_folder(leftover(tmp_path / "phrases", "del", dead))
    recover_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "run-state.json"]
    assert (tmp_path / "index" / "meta.json").read_text() == "{}"


def test_a_derived_store_deleted_crash_safely_never_shows_half(trained, tmp_path, monkeypatch):
    _, img, _ = trained
    victim = tmp_path / "phrases"
    shutil.copytree(img, victim)
    real_unlink = os.unlink

    def killed_at_meta(path, *a, **k):  # the kill of r03: right after meta.json is unlinked
        real_unlink(path, *a, **k)
        if os.path.basename(str(path)) == "meta.json":
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "unlink", killed_at_meta)
    with pytest.raises(KeyboardInterrupt):
        remove_folder(victim)
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert not victim.exists()  # gone whole: nothing at the path a later run reads
    recover_folder(victim)  # (the leftover's owner, this process, is alive: removed once it is gone)
    remove_folder(victim)  # a no-op on a missing folder


def test_run_rebuilds_a_phrases_store_left_without_meta_json(trained, tmp_path):
    from phrasefuse.run.pipeline import _stale_phrases

    _, img, _ = trained
    half = tmp_path / "phrases"
    shutil.copytree(img, half)
    (half / "meta.json").unlink()  # what the old rmtree left: shards but no meta.json
    assert _stale_phrases(EmbeddingStore(half), "any-build")
    assert not _stale_phrases(EmbeddingStore(tmp_path / "absent"), "any-build")


def test_a_stale_error_of_a_stored_id_is_dropped_by_the_next_writer(tmp_path):
    meta = new_meta(modality="image", encoder=_encoder(4), dtype="float32", source={"column": "image"})
    store = tmp_path / "st"
    with StoreWriter.open(store, meta) as w:
        w.add(["a", "b"], ["ka", "kb"], np.eye(4, dtype=np.float32)[:2])
    # killed after the shard storing "a" was written, before errors.parquet was rewritten
    pq.write_table(pa.table({"id": ["a", "c"], "reason": ["file not found: a.jpg", "file not found: c.jpg"]}),
                   store / "errors.parquet")
    with StoreWriter.open(store, meta):
        pass
    assert EmbeddingStore(store).errors()["id"].to_pylist() == ["c"]


def test_run_retries_failed_rows_once_the_file_is_back(tmp_path, tiny_clip_spec, shapes_dataset):
    from phrasefuse.run.pipeline import run_config

    data = tmp_path / "data"
    shutil.copytree(shapes_dataset.parent, data)
    t = pq.read_table(data / "manifest.parquet").slice(0, 6)
    pq.write_table(t, data / "manifest.parquet")
    missing = data / t["image"][3].as_py()
    missing.rename(tmp_path / "aside.jpg")
    config = tmp_path / "c.toml"
    config.write_text(f'work = "w"\n[data]\nmanifest = "data/manifest.parquet"\n'
                      f'[encoders]\nimage = "{tiny_clip_spec}"\nworkers = 0\n')
    first = [r for r in run_config(config, progress=False) if r.stage == "extract image"][0]
    assert first.summary["failed"] == 1
    (tmp_path / "aside.jpg").rename(missing)
    half = leftover(tmp_path / "w" / "report.html", "tmp", dead_pid())  # of a run killed writing its report
    half.write_text("<half")
    second = [r for r in run_config(config, progress=False) if r.stage == "extract image"][0]
    assert second.status == "ran" and second.summary["embedded"] == 1 and second.summary["failed"] == 0
    assert EmbeddingStore(tmp_path / "w/stores/image").num_rows() == 6
    assert not half.exists()
    third = [r for r in run_config(config, progress=False) if r.stage == "extract image"][0]
    assert third.status == "skipped"  # nothing failed any more: up to date again
