"""The user's files next to and inside phrasefuse's outputs: hidden names that look like leftovers of
phrasefuse (`.vimrc.old-2021`, `.x.tmp-31337/...`, `.inventory.del-4242`) survive `extract --out`,
`fuse train --out`, `index build --out` and `inspect`; an output folder that is not phrasefuse's is
refused (exit 2, one line) before anything is written into it; read-only commands (`inspect`,
`fuse eval`) leave the folder byte-identical, even where a writer was killed between the two renames
of a swap (they read the old copy in place)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import invoke_cli
from tests.faults.test_stale_state import dead_pid, killed_mid_swap, listing
from tests.faults.test_tampered_heads import write_data


def lookalikes_beside(out: Path, dead: int) -> list[Path]:
    """The user's hidden siblings of `out` named like phrasefuse's old leftovers of it."""
    files = [out.with_name(f".{out.name}.old-4242") / "wedding.txt", out.with_name(f".{out.name}.old-{dead}") / "meta.json",
             out.with_name(f".{out.name}.tmp-{dead}") / "draft.txt", out.with_name(f".{out.name}.del-{dead}")]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("the user's")
    return files


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A manifest and an image store (random 16-d encoder), a head trained on them, a pairs table."""
    from phrasefuse.fuse.train import train_head

    folder = tmp_path_factory.mktemp("user-files")
    manifest, img = write_data(folder, n=160)
    train_head(str(manifest), [f"image={img}"], folder / "head", kind="linear", seed=0)
    ids = pq.read_table(manifest)["id"].to_pylist()
    pq.write_table(pa.table({"query": [f"phrase {i % 7}" for i in range(len(ids))], "image_id": ids}),
                   folder / "pairs.parquet")
    return manifest, img, folder / "head", folder / "pairs.parquet"


def test_extract_out_refuses_a_folder_that_is_not_a_store_and_leaves_it_untouched(tmp_path, tiny_clip_spec):
    (tmp_path / "m.csv").write_text("id,title\nr1,hello\nr2,world\n")
    mine, mine2 = tmp_path / "mine", tmp_path / "mine2"
    mine.mkdir()
    (mine / ".notes.tmp-keep").write_text("keep me")
    (mine / "report.txt").write_text("keep")
    (mine2 / ".cache.tmp-dir").mkdir(parents=True)  # a hidden folder named like a temporary
    before = listing(tmp_path)
    for out in (mine, mine2):
        proc = invoke_cli("extract", "texts", tmp_path / "m.csv", "--col", "title", "--out", out,
                          "--model", tiny_clip_spec)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert f"{out}: exists and is not a phrasefuse store" in proc.stderr
    assert listing(tmp_path) == before  # no meta.json, no .lock, nothing deleted


def test_extract_into_its_own_store_keeps_a_user_file_named_like_a_temporary(tmp_path, tiny_clip_spec):
    (tmp_path / "m.csv").write_text("id,title\nr1,hello\nr2,world\n")
    out = tmp_path / "st"
    args = ("extract", "texts", tmp_path / "m.csv", "--col", "title", "--out", out, "--model", tiny_clip_spec)
    invoke_cli(*args, check=True)
    mine = [out / ".notes.tmp-keep", out / f".part-00009.parquet.tmp-{dead_pid()}"]
    for f in mine:
        f.write_text("the user's")
    invoke_cli(*args, check=True)
    assert all(f.read_text() == "the user's" for f in mine)


def test_fuse_train_and_index_build_keep_user_siblings_named_like_leftovers(data, tmp_path):
    manifest, img, _, pairs = data
    dead = dead_pid()
    head, index = tmp_path / "h", tmp_path / "ix"
    mine = lookalikes_beside(head, dead) + lookalikes_beside(index, dead)
    for _ in range(2):  # written, then replaced (a swap)
        invoke_cli("fuse", "train", "--manifest", manifest, "--feature", f"image={img}", "--head", "linear",
                   "--out", head, check=True)
        invoke_cli("index", "build", "--pairs", pairs, "--images", img, "--out", index, check=True)
    assert all(f.read_text() == "the user's" for f in mine)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["h", "ix"]
    assert len(list(tmp_path.iterdir())) == 2 + 8  # nothing of ours beside them


def test_inspect_of_a_folder_that_is_not_phrasefuses_changes_nothing(tmp_path):
    docs = tmp_path / "Documents"
    docs.mkdir()
    (docs / "a.txt").write_text("a")
    lookalikes_beside(docs, dead_pid())
    before = listing(tmp_path)
    proc = invoke_cli("inspect", docs)
    assert proc.returncode == 2 and "not a phrasefuse store" in proc.stderr
    assert listing(tmp_path) == before


def test_read_only_commands_read_a_head_killed_mid_swap_in_place_and_change_nothing(data, tmp_path):
    manifest, img, trained_head, _ = data
    head = tmp_path / "h"
    shutil.copytree(trained_head, head)
    killed_mid_swap(head, dead_pid())
    before = listing(tmp_path)
    assert invoke_cli("inspect", head, "--verify").returncode == 0
    proc = invoke_cli("fuse", "eval", head, "--manifest", manifest)
    assert proc.returncode == 0, proc.stderr
    assert listing(tmp_path) == before  # nothing renamed back, nothing deleted: that is the next writer's
