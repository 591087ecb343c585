"""`phrasefuse export` / `phrasefuse import`: the .npy + metadata Parquet layout, through the real CLI
(and the library where only its behaviour is checked)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phrasefuse.errors import BadInput
from phrasefuse.interop import export_npy, import_npy
from phrasefuse.store import EmbeddingStore, StoreWriter, encoder_identity, l2_normalize, new_meta
from tests.conftest import run_cli
from tests.index.conftest import random_encoder


@pytest.fixture(scope="module")
def image_store(tmp_path_factory):
    """2,500 random unit vectors of dim 24 in 3 shards (shard size 1,000), float32."""
    path = tmp_path_factory.mktemp("interop") / "img"
    emb = l2_normalize(np.random.default_rng(0).standard_normal((2500, 24)).astype(np.float32))
    meta = new_meta(modality="image", encoder=random_encoder(24), dtype="float32",
                    source={"manifest": "generated", "column": "image"})
    with StoreWriter.open(path, meta, shard_size=1000) as writer:
        writer.add([f"img{i:05d}" for i in range(len(emb))], [f"k{i}" for i in range(len(emb))], emb)
    return path


def exported(tmp_path, store, name="export", cli: bool = False):
    """`store` exported to .npy: through the real CLI, or the library call (a test's input)."""
    out = tmp_path / name
    if cli:
        run_cli("export", store, "--format", "npy", "--out", out, check=True)
    else:
        export_npy(store, out)
    return out


def test_export_writes_the_ecosystem_layout_in_store_row_order(image_store, tmp_path):
    out = exported(tmp_path, image_store, cli=True)
    arrays = sorted((out / "img_emb").iterdir())
    metadata = sorted((out / "metadata").iterdir())
    assert [p.name for p in arrays] == [f"img_emb_{n:05d}.npy" for n in range(3)]
    assert [p.name for p in metadata] == [f"metadata_{n:05d}.parquet" for n in range(3)]
    emb = np.concatenate([np.load(p, allow_pickle=False) for p in arrays])
    ids = pa.concat_tables([pq.read_table(p) for p in metadata])
    assert emb.dtype == np.float16 and emb.shape == (2500, 24)
    assert ids.column_names == ["id", "key"]
    store_ids, store_emb = EmbeddingStore(image_store).embeddings()
    assert ids["id"].to_pylist() == list(store_ids)
    np.testing.assert_allclose(emb.astype(np.float32), store_emb, atol=1e-3)
    assert json.loads((out / "meta.json").read_text())["store"]["encoder"]["name"] == "gaussian-24"


def test_export_then_import_gives_the_same_ids_and_embeddings(image_store, tmp_path):
    out = exported(tmp_path, image_store)
    store = tmp_path / "imported"
    proc = run_cli("import", out, "--out", store, "--shard-size", "700", "--json", check=True)
    summary = json.loads(proc.stdout)
    assert summary["rows"] == 2500 and summary["present"] == 0 and summary["files"] == 3
    a, b = EmbeddingStore(image_store), EmbeddingStore(store)
    ids_a, emb_a = a.embeddings()
    ids_b, emb_b = b.embeddings()
    assert list(ids_a) == list(ids_b)
    np.testing.assert_allclose(emb_b.astype(np.float32), emb_a, atol=1e-3)  # float16 precision
    assert b.ids_and_keys()["key"].to_pylist() == a.ids_and_keys()["key"].to_pylist()
    assert encoder_identity(b.meta["encoder"]) == encoder_identity(a.meta["encoder"])
    assert b.meta["modality"] == "image" and b.dtype == "float16" and len(b.shard_paths()) == 4
    assert run_cli("inspect", store, "--verify").returncode == 0
    # Resume: nothing is imported twice.
    again = json.loads(run_cli("import", out, "--out", store, "--json", check=True).stdout)
    assert again["rows"] == 0 and again["present"] == 2500 and b.num_rows() == 2500


def test_an_imported_store_refuses_another_identity(image_store, tmp_path):
    out = exported(tmp_path, image_store)
    store = tmp_path / "imported"
    import_npy(out, store, like=image_store)
    proc = run_cli("import", out, "--out", store, "--encoder-name", "ViT-B-32", "--weights-sha256", "f" * 64)
    assert proc.returncode == 2, proc.stderr
    assert f"{store}: holds embeddings of random:24" in proc.stderr and "Traceback" not in proc.stderr
    assert EmbeddingStore(store).num_rows() == 2500


def test_import_of_a_foreign_text_folder_with_a_manual_identity(tmp_path):
    """Vectors from elsewhere: unnormalised float32, ids in another column, unpadded file numbers."""
    folder = tmp_path / "foreign"
    (folder / "text_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    rng = np.random.default_rng(3)
    chunks = [rng.standard_normal((n, 8)).astype(np.float32) * 5 for n in (30, 12)]
    for n, emb in enumerate(chunks):
        np.save(folder / "text_emb" / f"text_emb_{n}.npy", emb)
        pq.write_table(pa.table({"caption": [f"c{n}-{i}" for i in range(len(emb))],
                                 "image_path": [f"doc{n}_{i}" for i in range(len(emb))]}),
                       folder / "metadata" / f"metadata_{n}.parquet")
    store = tmp_path / "text"
    run_cli("import", folder, "--out", store, "--id-col", "image_path", "--encoder-name", "my-text-model",
            "--weights-sha256", "v1", check=True)
    s = EmbeddingStore(store)
    ids, emb = s.embeddings()
    assert s.meta["modality"] == "text" and s.dtype == "float32"
    assert s.meta["encoder"]["family"] == "external" and s.meta["encoder"]["dim"] == 8
    assert list(ids) == [f"doc{n}_{i}" for n, e in enumerate(chunks) for i in range(len(e))]
    np.testing.assert_allclose(emb, l2_normalize(np.concatenate(chunks)), atol=1e-6)
    # A text store exports to text_emb/.
    out = exported(tmp_path, store, "text-export")
    assert sorted(p.name for p in (out / "text_emb").iterdir()) == ["text_emb_00000.npy"]


def test_import_takes_the_identity_of_an_encoder_spec(tmp_path, tiny_clip_spec):
    from phrasefuse.extract.encoders import load_image_encoder

    folder = tmp_path / "clip"
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    np.save(folder / "img_emb" / "img_emb_0.npy", np.random.default_rng(4).standard_normal((5, 32)).astype(np.float16))
    pq.write_table(pa.table({"id": [f"x{i}" for i in range(5)]}), folder / "metadata" / "metadata_0.parquet")
    store = tmp_path / "store"
    import_npy(folder, store, encoder=tiny_clip_spec)  # in process: one model load for the test
    identity = load_image_encoder(tiny_clip_spec, "cpu").identity
    assert encoder_identity(EmbeddingStore(store).meta["encoder"]) == encoder_identity(identity)


# ---------------------------------------------------------------- bad input: exit 2, one line naming the file


def foreign_folder(tmp_path, emb, ids=None, id_col="id"):
    folder = tmp_path / "in"
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    npy = folder / "img_emb" / "img_emb_0.npy"
    np.save(npy, emb)
    n = len(ids) if ids is not None else len(emb)
    ids = ids if ids is not None else [f"r{i}" for i in range(n)]
    pq.write_table(pa.table({id_col: ids}), folder / "metadata" / "metadata_0.parquet")
    return folder, npy, folder / "metadata" / "metadata_0.parquet"


def good(n=6, dim=4):
    return np.random.default_rng(5).standard_normal((n, dim)).astype(np.float32)


def with_nan():
    emb = good()
    emb[3, 1] = np.nan
    return emb


CASES = {
    "row counts differ": (lambda t: foreign_folder(t, good(6), ids=[f"r{i}" for i in range(5)]), "metadata",
                          "5 rows, but img_emb_0.npy has 6"),
    "no id column": (lambda t: foreign_folder(t, good(), id_col="url"), "metadata", "no 'id' column"),
    "NaN row": (lambda t: foreign_folder(t, with_nan()), "npy", "row 3 has NaN/inf"),
    "not 2-D": (lambda t: foreign_folder(t, np.zeros((2, 3, 4), np.float32)), "npy", "expected 2-D"),
    "1-D": (lambda t: foreign_folder(t, np.ones(6, np.float32)), "npy", "expected 2-D"),
    "duplicate ids": (lambda t: foreign_folder(t, good(3), ids=["a", "b", "a"]), "folder", "id a appears 2 times"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_inputs_exit_2_naming_the_file(tmp_path, case):
    """The library's one-line error naming the file (the CLI prints it, exit 2: the tests below)."""
    make, names, message = CASES[case]
    folder, npy, metadata = make(tmp_path)
    with pytest.raises(BadInput) as refused:
        import_npy(folder, tmp_path / "store", encoder_name="m", weights_sha256="w")
    error = str(refused.value)
    named = {"npy": npy, "metadata": metadata, "folder": metadata.parent}[names]
    assert error.startswith(f"{named}:") and message in error and "\n" not in error, error
    assert not (tmp_path / "store").exists()  # checked before anything is written


def test_a_pickled_array_is_refused_not_loaded(tmp_path):
    folder, npy, _ = foreign_folder(tmp_path, good())
    np.save(npy, np.array([{"not": "numbers"}] * 6, dtype=object), allow_pickle=True)
    proc = run_cli("import", folder, "--out", tmp_path / "store", "--encoder-name", "m", "--weights-sha256", "w")
    assert proc.returncode == 2 and f"{npy}: not a readable .npy array" in proc.stderr, proc.stderr


def test_missing_metadata_file_and_missing_identity(tmp_path):
    folder, npy, metadata = foreign_folder(tmp_path, good())
    proc = run_cli("import", folder, "--out", tmp_path / "store")
    assert proc.returncode == 2 and "which encoder made these vectors?" in proc.stderr
    metadata.unlink()
    proc = run_cli("import", folder, "--out", tmp_path / "store", "--encoder-name", "m", "--weights-sha256", "w")
    assert proc.returncode == 2 and f"{npy}: no matching" in proc.stderr, proc.stderr


def test_export_refuses_a_folder_that_is_not_a_store(tmp_path):
    proc = run_cli("export", tmp_path, "--format", "npy", "--out", tmp_path / "x")
    assert proc.returncode == 2 and f"{tmp_path}: not an embedding store" in proc.stderr
    assert not (tmp_path / "x").exists()
