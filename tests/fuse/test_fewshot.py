"""`fuse train` for few labels: every split layout, `--shots K` as `fuse ablate --shots K`, the
stratified hash split and its warnings, `--label-prior` as a feature name or a store path."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phrasefuse.errors import BadInput
from phrasefuse.fuse.ablate import ablate
from phrasefuse.fuse.train import train_head
from phrasefuse.manifests import hash_split, read_manifest
from tests.conftest import invoke_cli
from tests.fuse.conftest import class_vectors, generated_encoder, write_store, write_synthetic


def _resplit(manifest, out, change: dict[str, str]):
    """The manifest with its splits renamed (e.g. {'val': 'train'}: no val split)."""
    table = pq.read_table(manifest)
    split = [change.get(s, s) for s in table["split"].to_pylist()]
    pq.write_table(table.set_column(table.column_names.index("split"), "split", pa.array(split)), out)
    return out


def _ablate_top1(data, features, kind, k, seed, row, **kw) -> float:
    report = ablate(data.manifest, features, kind, shots=[k], seeds=1, seed=seed, progress=False, **kw)
    (table,) = report.data["tables"]
    return next(r for r in table["rows"] if r["features"] == row)["runs"][0]["metrics"]["top1"]


def test_train_without_a_val_split_cross_validates_within_the_training_rows(tmp_path):
    data = write_synthetic(tmp_path / "d", n=600)
    manifest = _resplit(data.manifest, tmp_path / "noval.parquet", {"val": "train"})
    report = train_head(manifest, [data.image, data.text], tmp_path / "h", kind="linear")
    meta = json.loads((tmp_path / "h" / "meta.json").read_text())
    assert meta["rows"]["val"] == 0 and meta["metrics"]["val"] == {}
    assert meta["selection"]["scheme"] == "5-fold cross-validation within the training rows (no val split)"
    assert meta["selection"]["chosen_by"].startswith("5-fold cross-validation within the training rows")
    assert meta["selection"]["training_rows"] == meta["rows"]["train"]
    assert "chosen by: 5-fold cross-validation within the training rows" in report.text()
    assert report.metrics["test"]["saved"]["top1"] > 0.8
    from phrasefuse.report.page import _decision_text  # the run's report says it too

    assert "chosen by 5-fold cross-validation within the training rows" in _decision_text(meta)
    full = ablate(manifest, [data.image, data.text], "linear", seeds=1, progress=False).data["tables"][0]
    assert "5-fold cross-validation within the training rows" in full["note"]  # ablate's full-data table too
    assert next(r for r in full["rows"] if r["features"] == "img + title")["runs"][0]["metrics"]["top1"] == \
        report.metrics["test"]["saved"]["top1"]
    train_head(data.manifest, [data.image], tmp_path / "v", kind="linear")
    assert json.loads((tmp_path / "v" / "meta.json").read_text())["selection"]["chosen_by"] == "the val split"


def test_a_multilabel_head_without_val_tunes_its_thresholds_out_of_fold(tmp_path):
    data = write_synthetic(tmp_path / "d", n=600, multilabel=True)
    manifest = _resplit(data.manifest, tmp_path / "noval.parquet", {"val": "train"})
    train_head(manifest, [data.image], tmp_path / "h", kind="linear", per_label_thresholds=True)
    meta = json.loads((tmp_path / "h" / "meta.json").read_text())
    assert len(meta["decision"]["per_label"]) == 6 and meta["metrics"]["test"]["saved"]["mAP"] > 0.5
    assert meta["selection"]["chosen_by"].startswith("5-fold cross-validation within the training rows")


def test_five_photos_per_class_without_val_is_ablates_five_shot_row(tmp_path):
    """A folder of train/ and test/ with 5 photos per class: `fuse train` without --shots folds as
    `fuse ablate --shots 5` does, so its test top-1 is that row's."""
    data = write_synthetic(tmp_path / "d", n=600)
    table = pq.read_table(data.manifest)
    split, labels = table["split"].to_pylist(), table["label"].to_pylist()
    seen: dict[str, int] = {}
    five = []
    for s, label in zip(split, labels):
        if s == "train" and seen.get(label, 0) < 5:
            seen[label] = seen.get(label, 0) + 1
            five.append("train")
        else:
            five.append("test" if s == "test" else None)
    keep = pa.array([s is not None for s in five])
    small = table.set_column(table.column_names.index("split"), "split", pa.array(five)).filter(keep)
    pq.write_table(small, tmp_path / "five.parquet")
    data.manifest = tmp_path / "five.parquet"
    report = train_head(data.manifest, [data.image, data.text], tmp_path / "h", kind="linear", seed=2)
    assert report.rows == {"train": 30, "val": 0, "test": sum(s == "test" for s in split)}
    assert report.metrics["test"]["saved"]["top1"] == _ablate_top1(data, [data.image, data.text], "linear", 5, 2,
                                                                   "img + title")


@pytest.mark.parametrize("kind,k,seed", [("linear", 5, 0), ("linear", 2, 3), ("linear", 1, 1), ("mlp", 3, 4)])
def test_train_shots_equals_ablates_row_for_the_same_seed(tmp_path, kind, k, seed):
    data = write_synthetic(tmp_path / "d", n=600)
    report = train_head(data.manifest, [data.image, data.text], tmp_path / "h", kind=kind, shots=k, seed=seed)
    meta = json.loads((tmp_path / "h" / "meta.json").read_text())
    assert meta["shots"] == k and meta["selection"]["training_rows"] == 6 * k
    assert meta["selection"]["chosen_by"].startswith(f"{k} labelled rows per class drawn with seed {seed}")
    assert report.metrics["test"]["saved"]["top1"] == _ablate_top1(data, [data.image, data.text], kind, k, seed,
                                                                   "img + title")


def test_train_shots_with_the_label_prior_equals_ablates_row(tmp_path, tiny_clip_spec):
    """--label-prior takes a feature name or a store path in both commands, with the same weights."""
    from phrasefuse.fuse.labeltext import embed_texts

    data = write_synthetic(tmp_path / "d", n=600, image_signal=0.3)
    label_emb, identity = embed_texts([f"c{c}" for c in range(6)], tiny_clip_spec)
    ids = read_manifest(data.manifest).ids.to_pylist()
    near = label_emb[data.labels] + 0.25 * np.random.default_rng(0).standard_normal(
        (len(ids), label_emb.shape[1])).astype(np.float32)
    prior = write_store(tmp_path / "near", "text", ids, near, identity)
    for k, seed in ((2, 0), (1, 1)):
        by_name = train_head(data.manifest, [data.image, f"near={prior}"], tmp_path / "a", kind="linear", shots=k,
                             seed=seed, label_prior="near")
        by_path = train_head(data.manifest, [data.image], tmp_path / "b", kind="linear", shots=k, seed=seed,
                             label_prior=str(prior))
        assert by_path.prior["weight"] > 0, by_path.prior["rule"]
        expected = _ablate_top1(data, [data.image, prior], "linear", k, seed, "img + label prior (near)",
                                rows=[["img", "label-prior"]], label_prior=str(prior))
        assert by_path.metrics["test"]["saved"]["top1"] == expected
        assert expected == _ablate_top1(data, [data.image, prior], "linear", k, seed, "img + label prior (near)",
                                        rows=[["img", "label-prior"]], label_prior="near")
        assert by_name.prior["store"]["name"] == by_path.prior["store"]["name"] == "near"
    with pytest.raises(BadInput, match="--label-prior nope: neither one of the features"):
        train_head(data.manifest, [data.image], tmp_path / "c", kind="linear", label_prior="nope")
    with pytest.raises(BadInput, match="--label-prior nope: neither one of the features"):
        ablate(data.manifest, [data.image], "linear", shots=[2], label_prior="nope", progress=False)


def test_the_cli_trains_the_head_of_ablates_row(tmp_path):
    """`fuse train --shots K --seed S` and `fuse ablate --shots K --seed S`, as a user runs them."""
    data = write_synthetic(tmp_path / "d", n=300)
    common = ["--manifest", data.manifest, "--feature", data.image, "--head", "linear", "--seed", "2", "--json"]
    trained = json.loads(invoke_cli("fuse", "train", *common, "--shots", "3", "--out", tmp_path / "h",
                                    check=True).stdout)
    table = json.loads(invoke_cli("fuse", "ablate", *common, "--shots", "3", "--seeds", "1", "--out",
                                  tmp_path / "ab", check=True).stdout)["tables"][0]
    assert trained["metrics"]["test"]["saved"]["top1"] == table["rows"][0]["runs"][0]["metrics"]["top1"]
    assert trained["selection"]["chosen_by"].startswith("3 labelled rows per class drawn with seed 2")
    refused = invoke_cli("fuse", "train", *common, "--shots", "0", "--out", tmp_path / "h0")
    assert refused.returncode == 2 and refused.stderr.strip().endswith("--shots 0: must be at least 1 labelled row "
                                                                       "per class")


def test_shots_are_checked(tmp_path):
    data = write_synthetic(tmp_path / "d", n=300)
    with pytest.raises(BadInput, match="--shots 0: must be at least 1"):
        train_head(data.manifest, [data.image], tmp_path / "h", kind="linear", shots=0)
    report = train_head(data.manifest, [data.image], tmp_path / "h", kind="linear", shots=1000)
    assert any(w.startswith("--shots 1000: 6 of 6 labels have fewer than 1000 train rows") for w in report.warnings)


def _hash_train_ids(prefix: str, n: int) -> list[str]:
    """n ids that a bare md5 hash split puts in train."""
    ids = [f"{prefix}{i}" for i in range(200)]
    return [i for i, s in zip(ids, hash_split(pa.array(ids)).to_pylist()) if s == "train"][:n]


def test_a_hash_split_is_stratified_and_names_every_label_absent_from_val_or_test(tmp_path):
    sizes = {f"c{c}": 40 for c in range(6)} | {"three": 3, "four": 4}
    ids = [f"{name}-{i}" for name, n in sizes.items() for i in range(n)]
    ids += _hash_train_ids("two-", 2) + _hash_train_ids("one-", 1)  # too few rows: in train only
    labels = [name for name, n in sizes.items() for _ in range(n)] + ["two", "two", "one"]
    pq.write_table(pa.table({"id": ids, "label": labels}), tmp_path / "m.parquet")  # no split column
    m = read_manifest(tmp_path / "m.parquet")
    by_label: dict[str, set] = {}
    for label, split in zip(m.table["label"].to_pylist(), m.table["split"].to_pylist()):
        by_label.setdefault(label, set()).add(split)
    assert all(by_label[c] == {"train", "val", "test"} for c in sizes)
    assert by_label["two"] == by_label["one"] == {"train"}
    vocab = sorted(set(labels))
    codes = np.array([vocab.index(x) for x in labels])
    vectors = class_vectors(np.random.default_rng(0), np.arange(len(vocab)), codes, 16, 1.0)
    img = write_store(tmp_path / "img", "image", ids, vectors, generated_encoder("img", 16))
    report = train_head(tmp_path / "m.parquet", [img], tmp_path / "h", kind="linear")
    for split in ("val", "test"):
        line = next(w for w in report.warnings if w.startswith(f"the {split} split has no rows of"))
        assert "2 of 10 labels ('one', 'two')" in line, line


def test_the_stratified_split_keeps_a_three_row_label_in_each_split():
    from phrasefuse.manifests.dataset import stratified_hash_split

    ids = pa.array([f"x{i}" for i in range(9)])
    got = stratified_hash_split(ids, pa.array(["a"] * 3 + ["b"] * 4 + [None, None])).to_pylist()
    assert sorted(got[:3]) == ["test", "train", "val"] and sorted(got[3:7]) == ["test", "train", "train", "val"]
    assert got[7:] == hash_split(ids).to_pylist()[7:]  # unlabelled rows keep the bare hash
    assert got == stratified_hash_split(ids, pa.array(["a"] * 3 + ["b"] * 4 + [None, None])).to_pylist()
