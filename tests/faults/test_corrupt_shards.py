"""Corrupt shards (truncated, another schema, NaN, zero vectors) are detected on read, naming the
file; `inspect --verify --quarantine` moves them aside and a re-run re-embeds just their rows."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phrasefuse.errors import BadInput
from phrasefuse.store import EmbeddingStore, embedding_array, embeddings_to_numpy
from tests.conftest import run_cli
from tests.faults.conftest import assert_sound, shards


@pytest.fixture(scope="module")
def sound_store(fault_dataset, tiny_clip_spec, tmp_path_factory):
    """The 96 images in 12 shards of 8 (copy before corrupting)."""
    from phrasefuse.extract.jobs import extract_images

    out = tmp_path_factory.mktemp("sound") / "img"
    extract_images(fault_dataset, out, model=tiny_clip_spec, workers=0, shard_size=8, progress=False)
    return out


def with_emb(table: pa.Table, change) -> pa.Table:
    emb = embeddings_to_numpy(table["emb"]).copy()
    change(emb)
    return table.set_column(table.column_names.index("emb"), "emb", embedding_array(emb))


CORRUPTIONS = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:200]),
    "not parquet": lambda path: path.write_text("PAR1 but not really"),
    "another dim": lambda path: pq.write_table(pq.read_table(path).set_column(
        2, "emb", embedding_array(np.ones((8, 16), np.float32))), path),
    "no key column": lambda path: pq.write_table(pq.read_table(path).drop_columns(["key"]), path),
    "nan": lambda path: pq.write_table(with_emb(pq.read_table(path), lambda e: e.__setitem__((3, 5), np.nan)), path),
    "zero vector": lambda path: pq.write_table(with_emb(pq.read_table(path), lambda e: e.__setitem__(6, 0)), path),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_corrupt_shard_is_detected_on_read_naming_the_file(kind, sound_store, tmp_path):
    out = tmp_path / "img"
    shutil.copytree(sound_store, out)
    bad = shards(out)[4]
    CORRUPTIONS[kind](bad)
    store = EmbeddingStore(out)
    for read in (store.embeddings, lambda: store.lookup(["nope"]), lambda: list(store.iter_tables())):
        with pytest.raises(BadInput, match=f"{bad}: ") as e:
            read()
        assert "inspect --verify" in str(e.value) and "\n" not in str(e.value)
    proc = run_cli("inspect", out, "--verify")
    assert proc.returncode == 2 and bad.name in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert [line for line in proc.stdout.splitlines() if line.strip().startswith("- ")] == \
        [line for line in proc.stdout.splitlines() if bad.name in line and line.strip().startswith("- ")]


def test_quarantine_then_rerun_re_embeds_just_those_shards_rows(sound_store, fault_dataset, tiny_clip_spec, tmp_path):
    out = tmp_path / "img"
    shutil.copytree(sound_store, out)
    bad = {shards(out)[3]: "nan", shards(out)[7]: "truncated"}
    bad_ids = [i for path in bad for i in pq.read_table(path)["id"].to_pylist()]
    for path, kind in bad.items():
        CORRUPTIONS[kind](path)
    good_before = {p.name: p.read_bytes() for p in shards(out) if p not in bad}

    proc = run_cli("inspect", out, "--verify", "--quarantine", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["problems"] == [] and report["rows"] == 80  # what is left verifies clean
    moved = {m["file"]: m for m in report["quarantined"]}
    assert set(moved) == {p.name for p in bad}
    assert moved[shards(sound_store)[3].name]["rows"] == 8 and "NaN" in moved[shards(sound_store)[3].name]["problems"][0]
    assert moved[shards(sound_store)[7].name]["rows"] is None  # no readable footer
    for path in bad:
        assert (out / "quarantine" / path.name).is_file() and not path.exists()
    assert json.loads((out / "quarantine.json").read_text())["quarantined"] == report["quarantined"]

    from phrasefuse.extract.jobs import extract_images  # the re-run (the function `extract images` calls)

    summary = extract_images(fault_dataset, out, model=tiny_clip_spec, workers=0, shard_size=8, progress=False)
    assert (summary.embedded, summary.reused, summary.present) == (16, 0, 80)  # just those rows
    ids = assert_sound(out)
    assert len(ids) == 96 and set(bad_ids) <= set(ids)
    assert {p.name: p.read_bytes() for p in shards(out) if p.name in good_before} == good_before
    assert run_cli("inspect", out, "--verify").returncode == 0
