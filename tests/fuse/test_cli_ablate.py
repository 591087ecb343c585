"""The fuse commands through the CLI (as test_cli.py, whose stores it shares): a multi-label head,
`fuse ablate`, and bad inputs refused with exit 2 and one line. `fuse ablate` and one refusal run
the real process; the rest run `cli.main` in this process (test_cli.py runs `fuse train`, `eval`
and `predict` as processes)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import invoke_cli, run_cli
from tests.fuse.conftest import generated_encoder, ok, one_json, refused, write_store


def test_multilabel_mlp_and_ablate(shapes_dataset, stores, tmp_path):
    report = one_json(invoke_cli("fuse", "train", "--manifest", shapes_dataset, "--feature", stores / "img",
                                 "--feature", stores / "title", "--head", "mlp", "--label-col", "tags",
                                 "--per-label-thresholds", "--max-labels", "2", "--out", tmp_path / "tags", "--json"))
    assert report["task"] == "multilabel" and "mAP" in report["metrics"]["test"]["saved"]
    ok(invoke_cli("predict", tmp_path / "tags", "--manifest", shapes_dataset, "--out", tmp_path / "tags.parquet"))
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
    # a hash split stratified by label: pinned, so that scrambling labels keeps it
    splits = read_manifest(shapes_dataset).table["split"]
    manifest = manifest.append_column("split", splits)
    val = split_rows(read_manifest(shapes_dataset))["val"].tolist()
    rolled = [labels[val[(j + 1) % len(val)]] for j in range(len(val))]
    assert rolled != [labels[i] for i in val]
    for i, label in zip(val, rolled):
        labels[i] = label
    pq.write_table(manifest.set_column(manifest.column_names.index("label"), "label", pa.array(labels)),
                   tmp_path / "scrambled.parquet")
    features = [str(stores / "img"), str(stores / "title")]
    assert ablate(tmp_path / "scrambled.parquet", features, "linear", shots=[1, 3], seeds=2).data["tables"] == \
        table["tables"]  # the CLI's tables, on the unscrambled manifest


def test_bad_inputs_exit_2_with_one_line(shapes_dataset, stores, tmp_path):
    table = pq.read_table(shapes_dataset)
    pq.write_table(table.drop(["label"]), tmp_path / "nolabel.parquet")
    refused(run_cli("fuse", "train", "--manifest", tmp_path / "nolabel.parquet", "--feature", stores / "img",
                    "--head", "linear", "--out", tmp_path / "h"), "no 'label' or 'labels' column")
    # no val split is fine (tests/fuse/test_fewshot.py); no train split is not
    pq.write_table(table.append_column("split", pa.array(["val"] * 30 + ["test"] * 30)), tmp_path / "notrain.parquet")
    refused(invoke_cli("fuse", "train", "--manifest", tmp_path / "notrain.parquet", "--feature", stores / "img",
                       "--head", "mlp", "--out", tmp_path / "h"), "'train' split has no rows")
    other = write_store(tmp_path / "other", "image", ["x1", "x2"], np.ones((2, 32), np.float32),
                        generated_encoder("x", 32))
    refused(invoke_cli("fuse", "train", "--manifest", shapes_dataset, "--feature", other, "--head", "lgbm",
                       "--out", tmp_path / "h"), str(other), "none of its 2 ids")
    assert not (tmp_path / "h").exists()
    proc = invoke_cli("fuse", "train", "--manifest", shapes_dataset, "--feature", stores / "img", "--head", "forest",
                      "--out", tmp_path / "h")
    assert proc.returncode == 2 and "forest" in proc.stderr
    head = tmp_path / "head"
    ok(invoke_cli("fuse", "train", "--manifest", shapes_dataset, "--feature", stores / "img", "--feature",
                  stores / "title", "--head", "lgbm", "--out", head))
    # a feature of the saved head (fused or image-only: val decides), from another encoder
    # (MiniLM, not the tiny CLIP it was trained on)
    name = json.loads((head / "meta.json").read_text())["features"][-1]["name"]
    refused(invoke_cli("fuse", "eval", head, "--manifest", shapes_dataset, "--feature",
                       f"{name}={stores / 'title-minilm'}"),
            "was trained on")
    refused(invoke_cli("fuse", "eval", tmp_path / "nolabel.parquet", "--manifest", shapes_dataset),
            "not a phrasefuse head")
