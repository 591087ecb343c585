"""Options of `fuse train`, `fuse ablate` and `predict` that no other test exercised, each by its
effect: --multilabel on a string column, --threshold, --tune-rows, ablate --with-full and --row,
predict --json, and float16 stores read by fuse."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from phrasefuse.cli import app
from phrasefuse.fuse.ablate import ablate
from phrasefuse.fuse.evaluate import predict
from phrasefuse.fuse.train import train_head
from phrasefuse.store import EmbeddingStore, StoreWriter, embeddings_to_numpy
from tests.fuse.conftest import write_synthetic


def invoke(*args) -> str:
    """The CLI in this process (Typer's runner); its stdout."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("options"), n=300)


@pytest.fixture(scope="module")
def joined_labels(tmp_path_factory):
    """A multi-label dataset whose labels are one string per row, 'c0|c1' (as in a CSV)."""
    folder = tmp_path_factory.mktemp("joined")
    data = write_synthetic(folder, n=300, multilabel=True)
    table = pq.read_table(data.manifest)
    joined = pa.array(["|".join(labels) for labels in table["labels"].to_pylist()])
    pq.write_table(table.drop_columns(["labels"]).append_column("tags", joined), folder / "joined.parquet")
    return data, folder / "joined.parquet"


def head_meta(path) -> dict:
    return json.loads((path / "meta.json").read_text())


def test_multilabel_splits_a_string_column_and_threshold_sets_the_decision(joined_labels, tmp_path):
    data, manifest = joined_labels
    features = [str(data.image)]
    train_head(manifest, features, tmp_path / "multiclass", kind="linear", label_col="tags")
    for name, threshold in (("low", 0.2), ("high", 0.7)):
        train_head(manifest, features, tmp_path / name, kind="linear", label_col="tags", multilabel=True,
                   threshold=threshold)
    # Without the flag, 'c0|c1' is one class of its own; with it, the labels are c0..c5.
    assert head_meta(tmp_path / "multiclass")["task"] == "multiclass"
    assert "c0|c1" in head_meta(tmp_path / "multiclass")["labels"]
    meta_low, meta_high = head_meta(tmp_path / "low"), head_meta(tmp_path / "high")
    assert meta_low["task"] == "multilabel" and meta_low["labels"] == [f"c{i}" for i in range(6)]
    assert (meta_low["decision"]["threshold"], meta_high["decision"]["threshold"]) == (0.2, 0.7)
    # The threshold is the decision: a higher one predicts fewer labels (recall down, precision up).
    low_val, high_val = meta_low["metrics"]["val"]["saved"], meta_high["metrics"]["val"]["saved"]
    assert high_val["micro_recall"] < low_val["micro_recall"]
    assert high_val["micro_precision"] > low_val["micro_precision"]
    assert high_val["mAP"] == pytest.approx(low_val["mAP"])  # the same scores, ranked the same


def test_tune_rows_caps_the_rows_that_tune_text_trust(data, tmp_path):
    train_head(data.manifest, [str(data.image), str(data.text)], tmp_path / "all", kind="linear")
    train_head(data.manifest, [str(data.image), str(data.text)], tmp_path / "capped", kind="linear", tune_rows=60)
    train_rows = head_meta(tmp_path / "all")["rows"]["train"]
    assert head_meta(tmp_path / "all")["selection"]["tuning_rows"] == train_rows > 60
    assert head_meta(tmp_path / "capped")["selection"]["tuning_rows"] == 60
    assert head_meta(tmp_path / "capped")["rows"]["train"] == train_rows  # all rows train the final head


def test_ablate_rows_and_with_full(data, tmp_path):
    features = [f"image={data.image}", f"title={data.text}"]
    rows = [["image"], ["image", "title"]]
    ablate(data.manifest, features, "linear", shots=[2], seeds=1, rows=rows, out=tmp_path / "a")
    ablate(data.manifest, features, "linear", shots=[2], seeds=1, rows=rows, full=True, out=tmp_path / "b")
    regimes = [[t["regime"] for t in json.loads((tmp_path / f / "ablation.json").read_text())["tables"]]
               for f in ("a", "b")]
    assert regimes == [["2-shot"], ["full", "2-shot"]]
    for table in json.loads((tmp_path / "b" / "ablation.json").read_text())["tables"]:
        assert [r["features"] for r in table["rows"]] == ["image (image only)", "image + title"]


def test_predict_json_is_one_document_and_the_file_has_every_row(data, tmp_path):
    train_head(data.manifest, [str(data.image), str(data.text)], tmp_path / "head", kind="linear")
    out = tmp_path / "predictions.parquet"
    summary = json.loads(invoke("predict", tmp_path / "head", "--manifest", data.manifest, "--out", out,
                                "--top-k", 3, "--json"))  # json.loads: nothing else on stdout
    predictions = pq.read_table(out)
    assert summary["rows"] == predictions.num_rows == pq.read_metadata(data.manifest).num_rows
    probs = predictions["top_probs"].to_pylist()
    assert all(len(p) == 3 and p == sorted(p, reverse=True) and sum(p) <= 1 + 1e-5 for p in probs)


def float16_copy(store, out) -> None:
    source = EmbeddingStore(store)
    meta = {**source.meta, "dtype": "float16"}
    table = source.read_table()
    with StoreWriter.open(out, meta, shard_size=max(1, table.num_rows // 2)) as writer:
        writer.add(table["id"], table["key"], embeddings_to_numpy(table["emb"]))


def test_float16_stores_train_and_predict_like_float32(data, tmp_path):
    float16_copy(data.image, tmp_path / "img16")
    float16_copy(data.text, tmp_path / "title16")
    assert EmbeddingStore(tmp_path / "img16").read_table().schema.field("emb").type.value_type == pa.float16()
    heads = {}
    for name, stores in (("32", [data.image, data.text]), ("16", [tmp_path / "img16", tmp_path / "title16"])):
        train_head(data.manifest, [f"image={stores[0]}", f"title={stores[1]}"], tmp_path / f"head{name}",
                   kind="linear")
        predict(tmp_path / f"head{name}", data.manifest, tmp_path / f"p{name}.parquet")
        heads[name] = pq.read_table(tmp_path / f"p{name}.parquet").sort_by("id")
    assert heads["16"]["id"].equals(heads["32"]["id"])
    same = np.mean(np.array(heads["16"]["label"].to_pylist()) == np.array(heads["32"]["label"].to_pylist()))
    assert same >= 0.95  # float16 rounding (3 decimal digits) moves only near-ties
