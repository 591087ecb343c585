"""A run's `work` folder: phrasefuse fills and cleans only a folder that is its own (absent, empty, or
holding run-state.json); "/", the home folder, a file and a folder of the user's files are refused
with one line (exit 2) before anything is written; "~" is the home folder; and a run never deletes a
user's files named like its leftovers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from phrasefuse.run.config import load_config
from tests.conftest import invoke_cli


def listing(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(folder)), p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*"))


def config_with_work(folder: Path, work: str) -> Path:
    (folder / "m.csv").write_text("id,image,label\n")
    config = folder / "run.toml"
    config.write_text(f'work = "{work}"\n[data]\nmanifest = "m.csv"\n'
                      f'[[heads]]\nname = "h"\nkind = "linear"\nfeatures = ["image"]\n')
    return config


def refused(config: Path) -> str:
    proc = invoke_cli("run", config)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "key 'work'" in proc.stderr
    return proc.stderr


def test_work_at_the_root_folder_is_refused(tmp_path):
    assert "is the root folder" in refused(config_with_work(tmp_path, "/"))


def test_work_at_the_home_folder_is_refused_and_tilde_is_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".vimrc.old-2021").write_text("old vimrc")
    monkeypatch.setenv("HOME", str(home))
    before = listing(home)
    assert "is your home folder" in refused(config_with_work(tmp_path, "~"))
    assert listing(home) == before
    assert load_config(config_with_work(tmp_path, "~/pf")).work == home / "pf"  # not CONFIG_DIR/~/pf


def test_work_naming_a_file_is_one_clear_line(tmp_path):
    (tmp_path / "workfile").write_text("a file")
    line = refused(config_with_work(tmp_path, "workfile"))
    assert f"{tmp_path / 'workfile'} is a file, not a folder" in line and line.count("key 'work'") == 1


@pytest.mark.parametrize("work", [".", "mine"])
def test_work_holding_files_phrasefuse_did_not_write_is_refused_untouched(tmp_path, work):
    """The config's own folder (it holds the config and the data), or any folder of the user's."""
    folder = tmp_path / work
    folder.mkdir(exist_ok=True)
    (folder / ".vimrc.old-2021").write_text("old vimrc")
    (folder / "stores").mkdir()
    (folder / "stores" / ".inventory.del-4242").write_text("notes")
    config = config_with_work(tmp_path, work)
    before = listing(tmp_path)
    assert "holds files phrasefuse did not write" in refused(config)
    assert listing(tmp_path) == before


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_run_keeps_user_files_named_like_its_leftovers_in_its_work_folder(tmp_path, tiny_clip_spec,
                                                                            shapes_dataset):
    from phrasefuse.run.pipeline import run_config

    data = tmp_path / "data"
    shutil.copytree(shapes_dataset.parent, data)
    pq.write_table(pq.read_table(data / "manifest.parquet").slice(0, 6), data / "manifest.parquet")
    config = tmp_path / "c.toml"
    config.write_text(f'work = "w"\n[data]\nmanifest = "data/manifest.parquet"\n'
                      f'[encoders]\nimage = "{tiny_clip_spec}"\nworkers = 0\n')
    list(run_config(config, progress=False))
    work, dead = tmp_path / "w", dead_pid()
    assert (work / "run-state.json").is_file()
    mine = [work / ".vimrc.old-2021", work / ".photos.old-4242" / "wedding.txt",
            work / f".thesis.tmp-{dead}" / "chapter1.tex", work / "stores" / f".inventory.del-{dead}",
            work / "stores" / f".image.tmp-{dead}", work / "heads" / f".image.old-{dead}" / "meta.json"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the user's")
    state = json.loads((work / "run-state.json").read_text())
    state["stages"] = {}  # every stage runs again: stores resumed, heads and report rewritten (swapped)
    (work / "run-state.json").write_text(json.dumps(state))
    results = list(run_config(config, progress=False))
    assert [r.status for r in results if r.stage == "report"] == ["ran"], [(r.stage, r.status) for r in results]
    assert all(path.read_text() == "the user's" for path in mine)
