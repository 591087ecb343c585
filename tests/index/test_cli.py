"""The index stage through the CLI: build, lookup, phrases, inspect, and what it refuses. Each
command runs once as the real process; the other calls run `cli.main` in this process."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phrasefuse.errors import BadInput
from phrasefuse.index.folder import PhraseIndex
from phrasefuse.store import EmbeddingStore, embeddings_to_numpy, l2_normalize
from tests.conftest import invoke_cli, run_cli
from tests.index.conftest import HELD_OUT, planted_phrase, read_meta


def test_build_normalises_phrases_and_reports_counts(shapes_index):
    meta = read_meta(shapes_index)
    phrases = PhraseIndex(shapes_index).table["phrase"].to_pylist()
    labels = ("bar", "circle", "cross", "ring", "square", "triangle")
    assert sorted(p for p in phrases if p.startswith("a photo")) == [planted_phrase(c) for c in labels]
    assert len(phrases) == 16  # 6 planted (one each, whatever their case and spacing) + 10 distractors
    assert meta["counts"]["prototypes_from_images"] == 16 and meta["counts"]["prototypes_from_text"] == 0
    assert meta["pairs"]["counts"]["pairs_read"] == 48 + 30
    assert meta["encoder"]["spec"] == "builtin:efficientnet-lite0" and meta["dim"] == 1280
    assert meta["index"]["kind"] == "flat" and meta["recall_at_10"] == 1.0


def test_lookup_returns_the_planted_phrase(shapes_index, shapes_table, shapes_dataset):
    images, labels = shapes_table["image"].to_pylist(), shapes_table["label"].to_pylist()
    paths = [str(shapes_dataset.parent / images[i]) for i in range(len(images) - HELD_OUT, len(images))]  # in no pair
    proc = run_cli("index", "lookup", shapes_index, *paths, "-k", "4", "--json", check=True)
    results = json.loads(proc.stdout)
    assert [r["image"] for r in results] == paths
    for result, label in zip(results, labels[-HELD_OUT:]):
        assert len(result["phrases"]) == len(result["scores"]) == 4
        assert result["phrases"][0] == planted_phrase(label), result
        assert result["scores"] == sorted(result["scores"], reverse=True) and -1 <= result["scores"][-1] <= 1


def test_lookup_text_form_and_unreadable_images(shapes_index, shapes_table, shapes_dataset, tmp_path):
    from phrasefuse.index.lookup import lookup

    path = str(shapes_dataset.parent / shapes_table["image"][-1].as_py())
    lines = lookup(shapes_index, [path], k=2, device="cpu").text().splitlines()
    assert lines[0] == path and len(lines) == 3
    assert lines[1].split(None, 1)[1] == planted_phrase(shapes_table["label"][-1].as_py())
    float(lines[1].split()[0])  # the score comes first
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(BadInput, match="broken.jpg: not an image"):
        lookup(shapes_index, [path, broken], device="cpu")
    proc = invoke_cli("index", "lookup", shapes_index, tmp_path / "missing.jpg")  # the process: the test above
    assert proc.returncode == 2 and "missing.jpg" in proc.stderr and "Traceback" not in proc.stderr


def test_phrases_store_joins_back_and_averages_phrase_embeddings(shapes_index, shapes_img_store, tiny_clip_spec,
                                                                 tmp_path):
    from phrasefuse.extract.encoders import load_text_encoder

    from phrasefuse.index.phrases import generate_phrases

    out = tmp_path / "phrases"  # the library call (the CLI's `phrases` is run below and in tests/faults)
    summary = generate_phrases(shapes_index, shapes_img_store, out, text_model=tiny_clip_spec, device="cpu",
                               progress=False).as_dict()
    assert summary["written"] == 60

    store = EmbeddingStore(out)
    assert store.meta["modality"] == "text" and store.meta["source"]["column"] == "phrases"
    assert store.meta["phrases"]["k"] == 3 and store.meta["phrases"]["build_id"] == read_meta(shapes_index)["build_id"]
    table = store.read_table(["id", "key", "emb", "phrases", "scores"])
    image_ids = EmbeddingStore(shapes_img_store).ids_and_keys()
    assert sorted(table["id"].to_pylist()) == sorted(image_ids["id"].to_pylist())
    keys = dict(zip(image_ids["id"].to_pylist(), image_ids["key"].to_pylist()))
    assert all(keys[i] == k for i, k in zip(table["id"].to_pylist(), table["key"].to_pylist()))
    phrases, scores = table["phrases"].to_pylist(), table["scores"].to_pylist()
    assert all(len(p) == 3 and len(s) == 3 and s == sorted(s, reverse=True) for p, s in zip(phrases, scores))

    encoder = load_text_encoder(tiny_clip_spec, "cpu")
    vocabulary = sorted({p for row in phrases for p in row})
    assert summary["phrases_embedded"] == len(vocabulary) < 3 * 60  # each distinct phrase once
    vectors = dict(zip(vocabulary, encoder.encode(vocabulary)))
    expected = l2_normalize(np.stack([np.mean([vectors[p] for p in row], axis=0) for row in phrases]))
    emb = store.embeddings()[1]
    np.testing.assert_allclose(emb, expected, atol=1e-5)

    # `inspect` of a phrases store shows a few images' phrases with their scores (the first rows)
    shown = invoke_cli("inspect", out, check=True).stdout
    first = table.slice(0, 3).to_pylist()
    for row in first:
        assert f"    {row['id']}: " + ", ".join(f"{p} ({s:.2f})" for p, s in zip(row["phrases"], row["scores"])) in shown
    examples = json.loads(invoke_cli("inspect", out, "--json", check=True).stdout)["examples"]
    assert [e["id"] for e in examples] == [r["id"] for r in first] and examples[0]["phrases"] == first[0]["phrases"]
    assert "examples" not in json.loads(invoke_cli("inspect", shapes_img_store, "--json", check=True).stdout)

    # Score-weighted: the same rows, weighted by their cosine scores.
    weighted_out = tmp_path / "weighted"
    generate_phrases(shapes_index, shapes_img_store, weighted_out, text_model=tiny_clip_spec, score_weighted=True, k=2,
                     device="cpu", progress=False)
    weighted = EmbeddingStore(weighted_out).read_table(["id", "emb", "phrases", "scores"])
    rows = weighted.to_pylist()
    # The top-2 of an image are among its top-3, so `vectors` holds them all.
    expected = l2_normalize(np.stack([sum(s * vectors[p] for p, s in zip(r["phrases"], r["scores"])) for r in rows]))
    np.testing.assert_allclose(embeddings_to_numpy(weighted["emb"]), expected, atol=1e-5)
    assert all(len(r["phrases"]) == 2 for r in rows)

    # Other settings into the same store are refused (resuming is tested below).
    other_k = invoke_cli("phrases", "--index", shapes_index, "--images", shapes_img_store, "--out", out,
                         "--text-model", tiny_clip_spec, "-k", "5")
    assert other_k.returncode == 2 and "k=3" in other_k.stderr and len(other_k.stderr.strip().splitlines()) == 1


def test_phrases_resume_only_embeds_new_images(shapes_index, shapes_img_store, tiny_clip_spec, tmp_path):
    from phrasefuse.index.phrases import generate_phrases
    from phrasefuse.store import StoreWriter

    # A partial output store: the first shard of a previous run, the rest still to do.
    part = tmp_path / "img-part"
    source = EmbeddingStore(shapes_img_store)
    table = source.read_table()
    with StoreWriter.open(part, source.meta) as writer:
        writer.add(table["id"][:25], table["key"][:25], source.embeddings()[1][:25])
    out = tmp_path / "phrases"
    first = generate_phrases(shapes_index, part, out, text_model=tiny_clip_spec, device="cpu")
    second = generate_phrases(shapes_index, shapes_img_store, out, text_model=tiny_clip_spec, device="cpu")
    assert (first.written, second.written, second.present) == (25, 35, 25)
    third = generate_phrases(shapes_index, shapes_img_store, out, text_model=tiny_clip_spec, device="cpu")
    assert (third.written, third.present, third.phrases_embedded) == (0, 60, 0)
    ids = EmbeddingStore(out).ids_and_keys()["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 60


def test_index_refuses_embeddings_of_another_encoder(shapes_index, shapes_tiny_store, tmp_path):
    proc = run_cli("phrases", "--index", shapes_index, "--images", shapes_tiny_store, "--out", tmp_path / "p")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "dim 32" in proc.stderr and str(shapes_index) in proc.stderr
    assert not (tmp_path / "p").exists()
    index = PhraseIndex(shapes_index)
    with pytest.raises(BadInput, match="dim 1280"):
        index.search(np.zeros((2, 32), np.float32), 3)
    same_dim_other_model = dict(index.encoder, weights_sha256="f" * 64)
    with pytest.raises(BadInput, match="was built from"):
        index.check_encoder(same_dim_other_model, what="--images x")


def test_inspect_shows_an_index(shapes_index):
    proc = run_cli("inspect", shapes_index, "--verify", check=True)
    assert proc.stdout.startswith(f"index: {shapes_index}") and "verify" in proc.stdout and "ok" in proc.stdout
    report = json.loads(run_cli("inspect", shapes_index, "--json", check=True).stdout)
    assert report["kind"] == "index" and report["dim"] == 1280 and report["recall@10"].startswith("1.0")


def write_pairs(path, **columns):
    pq.write_table(pa.table(columns), path)
    return path


def test_bad_pairs_tables_exit_2_with_one_line(shapes_img_store, tmp_path):
    from phrasefuse.index.build import build_index

    cases = {
        "no column": (write_pairs(tmp_path / "a.parquet", query=["x"], image=["img-000000"]), "no column 'image_id'"),
        "no known id": (write_pairs(tmp_path / "b.parquet", query=["x", "y"], image_id=["nope-1", "nope-2"]),
                        "no usable pairs"),
        "only empty phrases": (write_pairs(tmp_path / "c.parquet", query=["  ", None], image_id=["img-000000"] * 2),
                               "2 empty phrases"),
    }
    csv = tmp_path / "d.csv"
    csv.write_text("query,image_id,weight\ncircle,img-000000,2\nsquare,img-000001,lots\n")
    for name, (pairs, message) in cases.items():  # the library's one-line errors (the CLI prints them, exit 2)
        with pytest.raises(BadInput) as refused:
            build_index(pairs, shapes_img_store, tmp_path / name, progress=False)
        error = str(refused.value)
        assert message in error and str(pairs) in error and "\n" not in error, (name, error)
        assert not (tmp_path / name).exists()
        if name == "no known id":
            assert "'nope-1'" in error
    # ... and one through the real CLI: exit 2, the one line on stderr, nothing written
    proc = run_cli("index", "build", "--pairs", csv, "--images", shapes_img_store, "--out", tmp_path / "bad weight")
    assert proc.returncode == 2, proc.stderr
    assert "row 2: weight 'lots'" in proc.stderr and str(csv) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad weight").exists()


def test_out_folder_is_replaced_whole_or_refused(planted_pairs, shapes_img_store, tmp_path):
    from phrasefuse.index.build import build_index

    out = tmp_path / "index"
    build_index(planted_pairs, shapes_img_store, out)
    first = read_meta(out)["build_id"]
    build_index(planted_pairs, shapes_img_store, out, min_images=4)  # distractors have 3 images each
    assert read_meta(out)["build_id"] != first and read_meta(out)["counts"]["phrases"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temporary or old folder left
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(BadInput, match="not a phrasefuse index"):
        build_index(planted_pairs, shapes_img_store, tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_text_prototypes_come_from_the_same_clip(shapes_tiny_store, shapes_img_store, tiny_clip_spec, tmp_path):
    from phrasefuse.extract.encoders import load_text_encoder
    from phrasefuse.index.build import build_index

    ids = EmbeddingStore(shapes_tiny_store).ids_and_keys()["id"].to_pylist()
    pairs = write_pairs(tmp_path / "pairs.parquet", query=["circle", "circle", "Blue Sky", "ocean"],
                        image_id=[ids[0], ids[6], None, "not-in-store"])
    out = tmp_path / "index"
    proc = invoke_cli("index", "build", "--pairs", pairs, "--images", shapes_tiny_store, "--out", out,
                      "--text-prototypes", "--json", check=True)  # the process: test_bad_pairs_tables_exit_2...
    assert json.loads(proc.stdout)["counts"]["prototypes_from_text"] == 2
    index = PhraseIndex(out)
    assert index.table.to_pylist() == [{"phrase": "circle", "images": 2, "source": "image"},
                                       {"phrase": "blue sky", "images": 0, "source": "text"},
                                       {"phrase": "ocean", "images": 0, "source": "text"}]
    text = load_text_encoder(tiny_clip_spec, "cpu").encode(["blue sky", "ocean"])
    np.testing.assert_allclose(index.faiss_index.reconstruct_n(1, 2), text, atol=1e-5)

    with pytest.raises(BadInput, match="no text tower"):  # the CLI's exit 2 for a BadInput: the test above
        build_index(pairs, shapes_img_store, tmp_path / "no", text_prototypes=True, progress=False)
    assert not (tmp_path / "no").exists()
