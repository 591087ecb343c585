"""The fuse commands through the real CLI, on the generated shapes dataset with real encoders
(the tiny random open_clip for images and titles, the built-in MiniLM for zero-shot)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cli
from tests.fuse.conftest import generated_encoder, write_store


@pytest.fixture(scope="module")
def stores(shapes_dataset, tiny_clip_spec, tmp_path_factory):
    """img and title stores (tiny open_clip, one space), and title-minilm (built-in text encoder)."""
    from phrasefuse.extract.jobs import extract_images, extract_texts

    work = tmp_path_factory.mktemp("fuse-cli")
    extract_images(shapes_dataset, work / "img", model=tiny_clip_spec, workers=0, progress=False)
    extract_texts(shapes_dataset, "title", work / "title", model=tiny_clip_spec, progress=False)
    extract_texts(shapes_dataset, "title", work / "title-minilm", progress=False)
    return work


def ok(proc) -> dict | str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def one_json(proc) -> dict:
    return json.loads(ok(proc))  # the whole of stdout is one JSON document


def refused(proc, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_train_eval_predict_inspect(shapes_dataset, stores, tmp_path):
    head = tmp_path / "head"
    proc = run_cli("fuse", "train", "--manifest", shapes_dataset, "--feature", stores / "img",
                   "--feature", stores / "title", "--head", "linear", "--out", head, "--seed", "1", "--json")
    report = one_json(proc)
    assert report["kind"] == "linear" and report["rows"] == {"train": 47, "val": 7, "test": 6}
    # 7 val rows cannot show the (random tiny CLIP) title to be clearly better: image-only is saved, and said
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
    assert "top1=" in ok(run_cli("fuse", "eval", head, "--manifest", shapes_dataset, "--split", "val"))

    ok(run_cli("predict", head, "--manifest", shapes_dataset, "--out", tmp_path / "pred.parquet", "--top-k", "3"))
    pred = pq.read_table(tmp_path / "pred.parquet")
    assert pred.num_rows == 60 and {"id", "label", "probability", "top_labels", "top_probs"} <= set(pred.column_names)
    assert all(len(t) == 3 for t in pred["top_labels"].to_pylist())

    text = ok(run_cli("inspect", head))
    assert text.startswith(f"head: {head}") and "feature img" in text
    verified = one_json(run_cli("inspect", head, "--verify", "--json"))
    assert verified["kind"] == "head" and verified["verified"] and verified["problems"] == []


def test_multilabel_mlp_and_ablate(shapes_dataset, stores, tmp_path):
    report = one_json(run_cli("fuse", "train", "--manifest", shapes_dataset, "--feature", stores / "img", "--feature",
                              stores / "title", "--head", "mlp", "--label-col", "tags", "--per-label-thresholds",
                              "--max-labels", "2", "--out", tmp_path / "tags", "--json"))
    assert report["task"] == "multilabel" and "mAP" in report["metrics"]["test"]["saved"]
    ok(run_cli("predict", tmp_path / "tags", "--manifest", shapes_dataset, "--out", tmp_path / "tags.parquet"))
    labels = pq.read_table(tmp_path / "tags.parquet")["labels"].to_pylist()
    assert len(labels) == 60 and max(len(x) for x in labels) <= 2

    table = one_json(run_cli("fuse", "ablate", "--manifest", shapes_dataset, "--feature", stores / "img", "--feature",
                             stores / "title", "--head", "linear", "--shots", "1,3", "--seeds", "2",
                             "--out", tmp_path / "ablation", "--json"))
    assert [t["regime"] for t in table["tables"]] == ["1-shot", "3-shot"]
    assert [r["features"] for r in table["tables"][1]["rows"]] == ["img (image only)", "title", "img + title"]
    assert "cross-validation" in table["tables"][1]["note"]
    assert len(table["tables"][1]["rows"][0]["runs"]) == 2
    # 1 shot: nothing can validate text, so no seed keeps it (the row is the image-only head)
    one_shot = table["tables"][0]["rows"]
    assert one_shot[2]["text_kept"] == 0 and one_shot[2]["top1"] == one_shot[0]["top1"]
    markdown = (tmp_path / "ablation" / "ablation.md").read_text()
    assert "| img + title |" in markdown
    assert json.loads((tmp_path / "ablation" / "ablation.json").read_text())["tables"] == table["tables"]
    # the val split is not used by the few-shot tables: scrambling its labels changes nothing
    from phrasefuse.fuse.ablate import ablate
    from phrasefuse.fuse.data import split_rows
    from phrasefuse.manifests import read_manifest

    manifest = pq.read_table(shapes_dataset)
    labels = manifest["label"].to_pylist()
    val = split_rows(read_manifest(shapes_dataset))["val"].tolist()  # a hash of the id: scrambling keeps it
    rolled = [labels[val[(j + 1) % len(val)]] for j in range(len(val))]
    assert rolled != [labels[i] for i in val]
    for i, label in zip(val, rolled):
        labels[i] = label
    pq.write_table(manifest.set_column(manifest.column_names.index("label"), "label", pa.array(labels)),
                   tmp_path / "scrambled.parquet")
    features = [str(stores / "img"), str(stores / "title")]
    runs = [ablate(m, features, "linear", shots=[1, 3], seeds=2).data["tables"]
            for m in (shapes_dataset, tmp_path / "scrambled.parquet")]
    assert runs[0] == runs[1] == table["tables"]


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
    one_json(run_cli("fuse", "train", "--manifest", shapes_dataset, "--feature", stores / "img", "--head", "linear",
                     "--label-prior", stores / "title-minilm", "--out", head, "--json"))
    meta = json.loads((head / "meta.json").read_text())
    grid = {g["weight"]: g["val_top1"] for g in meta["prior"]["grid"]}
    # the titles' prior is informative: a weight > 0, and a gain on val over the head without it
    assert meta["prior"]["weight"] > 0 and grid[meta["prior"]["weight"]] > grid[0.0], grid
    assert "shuffled across the rows" in meta["prior"]["rule"] and meta["prior"]["likelihood_ratio"] > 3.841
    assert one_json(run_cli("fuse", "eval", head, "--manifest", shapes_dataset, "--json"))["rows"] == 6


def test_bad_inputs_exit_2_with_one_line(shapes_dataset, stores, tmp_path):
    table = pq.read_table(shapes_dataset)
    pq.write_table(table.drop(["label"]), tmp_path / "nolabel.parquet")
    refused(run_cli("fuse", "train", "--manifest", tmp_path / "nolabel.parquet", "--feature", stores / "img",
                    "--head", "linear", "--out", tmp_path / "h"), "no 'label' or 'labels' column")
    pq.write_table(table.append_column("split", pa.array(["train"] * 30 + ["test"] * 30)), tmp_path / "noval.parquet")
    refused(run_cli("fuse", "train", "--manifest", tmp_path / "noval.parquet", "--feature", stores / "img",
                    "--head", "mlp", "--out", tmp_path / "h"), "'val' split has no rows")
    other = write_store(tmp_path / "other", "image", ["x1", "x2"], np.ones((2, 32), np.float32),
                        generated_encoder("x", 32))
    refused(run_cli("fuse", "train", "--manifest", shapes_dataset, "--feature", other, "--head", "lgbm",
                    "--out", tmp_path / "h"), str(other), "none of its 2 ids")
    assert not (tmp_path / "h").exists()
    proc = run_cli("fuse", "train", "--manifest", shapes_dataset, "--feature", stores / "img", "--head", "forest",
                   "--out", tmp_path / "h")
    assert proc.returncode == 2 and "forest" in proc.stderr
    head = tmp_path / "head"
    ok(run_cli("fuse", "train", "--manifest", shapes_dataset, "--feature", stores / "img", "--feature",
               stores / "title", "--head", "lgbm", "--out", head))
    # a feature of the saved head (fused or image-only: val decides), from another encoder
    # (MiniLM, not the tiny CLIP it was trained on)
    name = json.loads((head / "meta.json").read_text())["features"][-1]["name"]
    refused(run_cli("fuse", "eval", head, "--manifest", shapes_dataset, "--feature",
                    f"{name}={stores / 'title-minilm'}"),
            "was trained on")
    refused(run_cli("fuse", "eval", tmp_path / "nolabel.parquet", "--manifest", shapes_dataset),
            "not a phrasefuse head")
