"""SIGKILL of the other writing commands at exact fault points (phrasefuse/faultpoints.py), then
resume: `import` and `phrases` (stores written through StoreWriter; SIGTERM with rows buffered on
`import`), and the folder outputs that are rewritten in place (`index build`, `fuse train`, `export`): the old folder or the new one,
whole, and no leftover once the next write is done."""

from __future__ import annotations

import json
import re
import signal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phrasefuse.folders import recover_folder
from phrasefuse.index.build import build_index
from phrasefuse.index.folder import PhraseIndex
from phrasefuse.interop import export_npy, import_npy
from phrasefuse.store import EmbeddingStore, StoreWriter, l2_normalize, new_meta
from tests.conftest import run_cli
from tests.faults.conftest import assert_interrupted, assert_sound, file_states, kill_at, pause_at, shards
from tests.index.conftest import random_encoder

SHARD = 4


def part_states(store) -> dict:
    return {name: state for name, state in file_states(store).items() if name.startswith("part-")}


def temporary_files(folder) -> list[str]:
    """Our temporary files in `folder`, named without their random token (`.X.phrasefuse-T.tmp-PID` -> `.X.tmp-PID`)."""
    return sorted(re.sub(r"\.phrasefuse-[0-9a-f]{16}\.", ".", p.name) for p in folder.glob(".*.phrasefuse-*.tmp-*"))


def write_vectors(path, n: int, dim: int, shard_size: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    emb = l2_normalize(np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32))
    ids = [f"v{i:04d}" for i in range(n)]
    meta = new_meta(modality="image", encoder=random_encoder(dim), dtype="float32",
                    source={"manifest": "generated", "column": "image"})
    with StoreWriter.open(path, meta, shard_size=shard_size) as writer:
        writer.add(ids, ids, emb)
    return ids, emb


# ---------------------------------------------------------------- import


@pytest.fixture(scope="module")
def npy_folder(tmp_path_factory):
    """30 random unit vectors exported as 5 .npy files of 7, 7, 7, 7 and 2 rows."""
    folder = tmp_path_factory.mktemp("kill-import")
    ids, emb = write_vectors(folder / "store", 30, 8, shard_size=7)
    export_npy(folder / "store", folder / "npy")
    return folder / "npy", ids, emb


# Kills of `import --shard-size 4` on the same store: the 7-row files come in chunks of 4 and 3,
# so rows are buffered across files. (point, shards in place after the kill, temporary file left)
IMPORT_KILLS = [
    ("meta.json-synced@1", 0, ".meta.json"),  # the store's meta.json fsync'ed under its hidden name
    ("rows-buffered@4", 3, None),  # 4 chunks: 14 rows, 3 shards written, 2 rows buffered (lost)
    ("shard-tmp-written@2", 4, ".part-00004.parquet"),
    ("shard-written@2", 6, None),
]


def test_sigkill_of_import_at_each_step_then_resume_stores_each_id_once(npy_folder, tmp_path):
    folder, ids, emb = npy_folder
    out = tmp_path / "imported"
    for point, in_place, left in IMPORT_KILLS:
        before = part_states(out) if out.exists() else {}
        proc = kill_at(point, "import", folder, "--out", out, "--shard-size", SHARD)
        assert [p.name for p in shards(out)] == [f"part-{i:05d}.parquet" for i in range(in_place)], point
        assert all(part_states(out)[name] == state for name, state in before.items()), point
        assert temporary_files(out) == ([f"{left}.tmp-{proc.pid}"] if left else []), point
        if in_place:
            assert EmbeddingStore(out).num_rows() == in_place * SHARD and len(assert_sound(out, killed=True))
        else:  # killed before the store had its meta.json: not a store yet, and the next run makes it one
            assert not EmbeddingStore(out).exists()
    kept = part_states(out)

    summary = import_npy(folder, out, shard_size=SHARD)
    assert (summary.present, summary.rows) == (len(kept) * SHARD, len(ids) - len(kept) * SHARD)
    assert temporary_files(out) == [] and all(part_states(out)[n] == s for n, s in kept.items())
    stored_ids, stored = EmbeddingStore(out).embeddings()
    assert sorted(assert_sound(out)) == ids  # each id exactly once
    order = np.argsort(stored_ids)
    np.testing.assert_allclose(stored[order], emb, atol=1e-3)  # through float16 .npy files


def test_sigterm_with_rows_buffered_exits_130_and_flushes_them_as_a_last_shard(npy_folder, tmp_path):
    """A scheduler's stop (SIGTERM) while the 2nd chunk's 3 rows wait in the buffer (shard size 4)."""
    folder, _, _ = npy_folder
    out = tmp_path / "imported"
    proc = pause_at("rows-buffered@2", "import", folder, "--out", out, "--shard-size", SHARD, mark_dir=tmp_path)
    assert len(shards(out)) == 1  # the state at the signal, exactly
    proc.send_signal(signal.SIGTERM)
    assert_interrupted(proc, [SHARD, 3], out)


# ---------------------------------------------------------------- phrases


def test_sigkill_of_phrases_mid_write_then_resume_equals_an_uninterrupted_run(tiny_clip_spec, tmp_path):
    from phrasefuse.index.phrases import generate_phrases

    images = tmp_path / "img"
    ids, _ = write_vectors(images, 40, 16, shard_size=40)
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"query": [f"phrase {i % 9}" for i in range(40)], "image_id": ids}), pairs)
    build_index(pairs, images, tmp_path / "index")
    out = tmp_path / "phrases"
    proc = kill_at("shard-synced@3", "phrases", "--index", tmp_path / "index", "--images", images, "--out", out,
                   "--text-model", tiny_clip_spec, "-k", 2, "--batch-size", 5, "--shard-size", SHARD)
    assert len(shards(out)) == 2 and temporary_files(out) == [f".part-00002.parquet.tmp-{proc.pid}"]
    assert len(assert_sound(out, killed=True)) == 2 * SHARD
    kept = part_states(out)

    resumed = generate_phrases(tmp_path / "index", images, out, k=2, text_model=tiny_clip_spec, batch_size=5,
                               shard_size=SHARD)
    assert (resumed.present, resumed.written) == (2 * SHARD, 40 - 2 * SHARD) and temporary_files(out) == []
    assert all(part_states(out)[n] == s for n, s in kept.items())
    whole = tmp_path / "whole"
    generate_phrases(tmp_path / "index", images, whole, k=2, text_model=tiny_clip_spec, shard_size=SHARD)
    a, b = (EmbeddingStore(p).read_table().sort_by("id") for p in (out, whole))
    assert sorted(assert_sound(out)) == ids and a["id"].equals(b["id"]) and a["phrases"].equals(b["phrases"])
    np.testing.assert_allclose(np.stack(a["emb"].to_numpy(zero_copy_only=False)),
                               np.stack(b["emb"].to_numpy(zero_copy_only=False)), atol=1e-6)


# ---------------------------------------------------------------- folders rewritten in place


def leftovers(out) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def index_inputs(tmp_path_factory):
    """An image store and two pairs tables: index A (9 phrases), index B (5 phrases)."""
    folder = tmp_path_factory.mktemp("kill-index")
    ids, _ = write_vectors(folder / "img", 60, 16, shard_size=60)
    tables = {}
    for name, phrases in (("a", 9), ("b", 5)):
        tables[name] = folder / f"pairs-{name}.parquet"
        pq.write_table(pa.table({"query": [f"{name} phrase {i % phrases}" for i in range(60)], "image_id": ids}),
                       tables[name])
    return folder / "img", tables


def index_phrases(index) -> list[str]:
    return sorted(PhraseIndex(index).phrases.to_pylist())


# Where a rebuild of index A into B is killed, and which index the folder then holds, whole.
INDEX_KILLS = [
    ("index.faiss-tmp-written@1", "a"),  # building the new folder: the old one untouched
    ("folder-built@1", "a"),  # the new folder complete under its hidden name, not swapped in
    ("folder-old-moved@1", "a"),  # between the two renames: the old folder aside, the new not in place
    ("folder-renamed@1", "b"),  # the new one in place; the old one not yet deleted
]


@pytest.mark.parametrize("point, holds", INDEX_KILLS)
def test_sigkill_while_an_index_is_rewritten_leaves_the_old_or_the_new_one_whole(point, holds, index_inputs,
                                                                                  tmp_path):
    images, pairs = index_inputs
    out = tmp_path / "index"
    build_index(pairs["a"], images, out)
    expected = {"a": index_phrases(out)}
    kill_at(point, "index", "build", "--pairs", pairs["b"], "--images", images, "--out", out)
    if holds == "a":
        assert index_phrases(out) == expected["a"]
    else:
        assert len(index_phrases(out)) == 5
    assert PhraseIndex(out).faiss_index.ntotal == len(index_phrases(out))  # the FAISS file matches its table
    assert run_cli("inspect", out, "--verify").returncode == 0
    build_index(pairs["b"], images, out)  # the next write: the new index, and nothing left behind
    assert len(index_phrases(out)) == 5 and leftovers(out) == []


def test_sigkill_between_the_renames_of_a_head_rewrite_keeps_the_old_head(tmp_path):
    from phrasefuse.fuse.artifact import load_head
    from phrasefuse.fuse.train import train_head
    from tests.fuse.conftest import write_synthetic

    data = write_synthetic(tmp_path / "data", n=300)
    head = tmp_path / "head"
    train_head(data.manifest, [str(data.image)], head, kind="linear", seed=0)
    old = json.loads((head / "meta.json").read_text())
    kill_at("folder-old-moved@1", "fuse", "train", "--manifest", data.manifest, "--feature", data.image,
            "--feature", data.text, "--head", "linear", "--out", head, "--seed", 1)
    assert not (head / "meta.json").exists()  # the kill left no folder at HEAD: the old one is aside
    aside = leftovers(head)
    assert load_head(head).meta == old  # a reader reads the old head where it lies, whole...
    assert leftovers(head) == aside and not head.exists()  # ...and renames nothing (read-only)
    recover_folder(head)  # the next writer puts the old head back, whole
    assert json.loads((head / "meta.json").read_text()) == old and leftovers(head) == []
    assert run_cli("inspect", head, "--verify").returncode == 0


def test_sigkill_while_an_export_is_rewritten_leaves_the_old_one_whole(npy_folder, tmp_path):
    """Before any rename (no recovery needed): the old export in place, unchanged."""
    folder, _, _ = npy_folder
    out = tmp_path / "export"
    export_npy(folder.parent / "store", out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    kill_at("folder-built@1", "export", folder.parent / "store", "--format", "npy", "--out", out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [name for name in leftovers(out) if ".phrasefuse-" in name and ".tmp-" in name]  # the new one, complete, never swapped in
