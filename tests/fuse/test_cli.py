"""The fuse commands through the real CLI, on the generated shapes dataset with real encoders
(the tiny random open_clip for images and titles, the built-in MiniLM for zero-shot): train, eval,
predict, inspect; zero-shot and the label prior. Multi-label, ablate and bad inputs:
test_cli_ablate.py (two files, so that two workers share them)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import invoke_cli, run_cli
from tests.fuse.conftest import ok, one_json


def test_train_eval_predict_inspect(shapes_dataset, stores, tmp_path):
    head = tmp_path / "head"
    proc = run_cli("fuse", "train", "--manifest", shapes_dataset, "--feature", stores / "img",
                   "--feature", stores / "title", "--head", "linear", "--out", head, "--seed", "1", "--json")
    report = one_json(proc)
    assert report["kind"] == "linear" and report["rows"] == {"train": 48, "val": 6, "test": 6}
    # 6 val rows cannot show the (random tiny CLIP) title to be clearly better: image-only is saved, and said
    assert report["saved"] == "image-only" and report["reason"] == "every text feature's trust was tuned to 0 " \
        "on validation"
    assert report["metrics"]["val"]["saved"] == report["metrics"]["val"]["image_only"]
    assert [f["name"] for f in json.loads((head / "meta.json").read_text())["features"]] == ["img"]
    # ... and the thin val split is one warning line on stderr (stdout stays one JSON document)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("phrasefuse: warning: ")]
    assert len(warnings) == 1 and "the val split has fewer than 5 rows of 6 of 6 labels" in warnings[0]
    assert report["warnings"] == [warnings[0].removeprefix("phrasefuse: warning: ")]
    assert sorted(p.name for p in head.iterdir()) == ["meta.json", "weights.safetensors"]

    evaluation = one_json(run_cli("fuse", "eval", head, "--manifest", shapes_dataset, "--json"))
    assert evaluation["rows"] == 6 and evaluation["metrics"]["top1"] == report["metrics"]["test"]["saved"]["top1"]
    # the text form and inspect through cli.main in this process (each command runs as a process once here)
    assert "top1=" in ok(invoke_cli("fuse", "eval", head, "--manifest", shapes_dataset, "--split", "val"))

    ok(run_cli("predict", head, "--manifest", shapes_dataset, "--out", tmp_path / "pred.parquet", "--top-k", "3"))
    pred = pq.read_table(tmp_path / "pred.parquet")
    assert pred.num_rows == 60 and {"id", "label", "probability", "top_labels", "top_probs"} <= set(pred.column_names)
    assert all(len(t) == 3 for t in pred["top_labels"].to_pylist())

    text = ok(invoke_cli("inspect", head))
    assert text.startswith(f"head: {head}") and "feature img" in text
    verified = one_json(invoke_cli("inspect", head, "--verify", "--json"))
    assert verified["kind"] == "head" and verified["verified"] and verified["problems"] == []


def test_zeroshot_and_label_prior(shapes_dataset, stores, tmp_path):
    report = one_json(run_cli("fuse", "zeroshot", "--manifest", shapes_dataset, "--phrases", stores / "title-minilm",
                              "--split", "all", "--json"))
    # titles 'a red circle' (most) or 'photo 12' vs the label names, with no labelled image
    assert report["labels"] == 6 and 0.5 < report["coverage"] < 0.8
    assert report["metrics"]["top1"] > 0.5 > report["chance_top1"]
    # in-process (one model load): label descriptions instead of names, and multi-label tags
    from phrasefuse.fuse.evaluate import zeroshot

    pq.write_table(pa.table({"label": ["circle", "square", "triangle", "cross", "ring", "bar"],
                             "description": ["a round disc", "a box with four equal sides",
                                             "a shape with three corners", "a plus sign", "a hollow circle",
                                             "a long thin rectangle"]}),
                   tmp_path / "descriptions.parquet")
    described = zeroshot(shapes_dataset, stores / "title-minilm", str(tmp_path / "descriptions.parquet"), split="all").as_dict()
    assert described["label_texts"] == "descriptions" and described["metrics"]["top1"] > described["chance_top1"]
    tags = zeroshot(shapes_dataset, stores / "title-minilm", label_col="tags", split="all").as_dict()
    assert tags["labels"] == 10 and tags["metrics"]["mAP"] > 0.4  # colours and shapes, each in 1/4 to 1/2 of rows

    head = tmp_path / "prior"
    one_json(invoke_cli("fuse", "train", "--manifest", shapes_dataset, "--feature", stores / "img", "--head",
                        "linear", "--label-prior", stores / "title-minilm", "--out", head, "--json"))
    meta = json.loads((head / "meta.json").read_text())
    grid = {g["weight"]: g["val_top1"] for g in meta["prior"]["grid"]}
    # the titles' prior is informative: a weight > 0, and a gain on val over the head without it
    assert meta["prior"]["weight"] > 0 and grid[meta["prior"]["weight"]] > grid[0.0], grid
    assert "shuffled across the rows" in meta["prior"]["rule"] and meta["prior"]["likelihood_ratio"] > 3.841
    from phrasefuse.fuse.evaluate import evaluate  # in process: the CLI's eval is tested above

    assert evaluate(head, shapes_dataset).as_dict()["rows"] == 6  # the prior's phrases store read back with the head
