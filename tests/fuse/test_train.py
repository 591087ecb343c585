"""Training heads on generated stores with a known answer (real stores, real heads, real LightGBM)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from phrasefuse.errors import BadInput
from phrasefuse.fuse.artifact import load_head
from phrasefuse.fuse.data import load_blocks
from phrasefuse.fuse.evaluate import evaluate, predict
from phrasefuse.fuse.train import train_head
from phrasefuse.manifests import read_manifest
from tests.fuse.conftest import generated_encoder, write_store, write_synthetic

KINDS = ["linear", "mlp", "lgbm"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Image vectors know only y // 2, text vectors only y % 2 (30% of rows have no text):
    each alone tells at most half of the 6 classes apart; together they tell all."""
    return write_synthetic(tmp_path_factory.mktemp("pairs"), n=1200, image_groups=np.arange(6) // 2,
                           text_groups=np.arange(6) % 2, image_signal=0.5, text_signal=0.5)


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    """An informative image feature and a text feature that is pure noise."""
    return write_synthetic(tmp_path_factory.mktemp("noise"), n=1200, image_signal=0.22, text_signal=0.0)


@pytest.fixture(scope="module")
def informative(tmp_path_factory):
    """Image and text both informative, independently noisy."""
    return write_synthetic(tmp_path_factory.mktemp("informative"), n=1200, image_signal=0.22, text_signal=0.35)


def top1(report, name="saved"):
    return report.metrics["test"][name]["top1"]


@pytest.mark.parametrize("kind", KINDS)
def test_fused_beats_each_single_feature_when_each_knows_half(pairs, tmp_path, kind):
    fused = train_head(pairs.manifest, [pairs.image, pairs.text], tmp_path / "fused", kind=kind)
    text_only = train_head(pairs.manifest, [pairs.text], tmp_path / "text", kind=kind)
    assert fused.saved == "fused"
    image_only = top1(fused, "image_only")
    assert image_only < 0.55 and top1(text_only) < 0.45  # each alone is capped near 1/2 and 1/3 (+ noise)
    assert top1(fused) > max(image_only, top1(text_only)) + 0.15
    # the head folder: safetensors / LightGBM text and meta.json, nothing else (no pickle)
    files = sorted(p.name for p in (tmp_path / "fused").iterdir())
    assert files == sorted(["meta.json", "weights.safetensors"] + (["lgbm.txt"] if kind == "lgbm" else []))
    meta = json.loads((tmp_path / "fused" / "meta.json").read_text())
    assert [f["name"] for f in meta["features"]] == ["img", "title"]
    assert meta["features"][1]["encoder"]["weights_sha256"] == generated_encoder("title", 24)["weights_sha256"]
    assert meta["selection"]["saved"] == "fused" and meta["metrics"]["val"]["image_only"]["top1"] < \
        meta["metrics"]["val"]["fused"]["top1"]


@pytest.mark.parametrize("kind", KINDS)
def test_noise_text_is_left_out(noise, tmp_path, kind):
    # The rule keeps text that beats image-only by more than one standard error: noise can pass by
    # chance (how often depends even on the order of floating-point sums, e.g. BLAS threads), so a
    # rate is asserted, not a verdict per seed.
    kept = []
    for seed in (0, 1, 2):
        report = train_head(noise.manifest, [noise.image, noise.text], tmp_path / f"h{seed}", kind=kind, seed=seed)
        if report.saved != "image-only":
            kept.append((seed, report.reason))
            continue
        assert report.metrics["test"]["saved"] == report.metrics["test"]["image_only"]
        meta = json.loads((tmp_path / f"h{seed}" / "meta.json").read_text())
        assert [f["name"] for f in meta["features"]] == ["img"]
        assert meta["selection"]["validation"]["image_only"] == report.metrics["val"]["image_only"]["top1"]
    assert len(kept) <= 1, kept


@pytest.mark.parametrize("kind", KINDS)
def test_informative_text_is_kept_and_beats_image_only(informative, tmp_path, kind):
    report = train_head(informative.manifest, [informative.image, informative.text], tmp_path / "h", kind=kind)
    assert report.saved == "fused", report.reason
    assert top1(report) > top1(report, "image_only") + 0.03
    meta = json.loads((tmp_path / "h" / "meta.json").read_text())
    assert [f["name"] for f in meta["features"]] == ["img", "title"] and meta["features"][1]["trust"] > 0
    assert meta["selection"]["validation"]["fused"] > meta["selection"]["validation"]["image_only"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("multilabel", [False, True])
def test_save_load_round_trip_gives_identical_predictions(tmp_path, kind, multilabel):
    data = write_synthetic(tmp_path / "d", n=600, image_groups=np.arange(6) // 2, text_groups=np.arange(6) % 2,
                           image_signal=0.5, text_signal=0.5, multilabel=multilabel)
    report = train_head(data.manifest, [data.image, data.text], tmp_path / "h", kind=kind, seed=3,
                        per_label_thresholds=multilabel, max_labels=2 if multilabel else None)
    assert report.saved == "fused"
    manifest = read_manifest(data.manifest)
    head = load_head(tmp_path / "h")
    blocks, cos = head.inputs(manifest.ids, manifest.source)
    assert np.array_equal(head.predict(blocks, cos), report.fitted.predict(blocks))
    again = evaluate(tmp_path / "h", data.manifest, split="test").as_dict()["metrics"]
    key = "mAP" if multilabel else "top1"
    assert again[key] == report.metrics["test"]["saved"][key]
    if multilabel:
        assert len(head.meta["decision"]["per_label"]) == 6 and head.meta["decision"]["max_labels"] == 2
        assert again["mAP"] > 0.4  # each label is in ~22% of the rows


def test_missing_text_rows_still_get_predictions(pairs, tmp_path):
    train_head(pairs.manifest, [pairs.image, pairs.text], tmp_path / "h", kind="mlp")
    predict(tmp_path / "h", pairs.manifest, tmp_path / "p.parquet", top_k=3)
    table = pq.read_table(tmp_path / "p.parquet").to_pydict()
    assert len(table["id"]) == len(pairs.labels)
    missing = ~pairs.text_present
    assert all(m == ["title"] for m, gone in zip(table["missing_features"], missing) if gone)
    assert all(m == [] for m, gone in zip(table["missing_features"], missing) if not gone)
    truth = np.array([f"c{c}" for c in pairs.labels])
    predicted = np.array(table["label"])
    for top, probs, label, prob in zip(table["top_labels"], table["top_probs"], predicted, table["probability"]):
        assert len(top) == 3 and len(set(top)) == 3 and top[0] == label and probs[0] == prob
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    assert np.mean(predicted == truth) > 0.6  # the top label is the right one for most rows
    # without text only the image's half is known: about 1/2; with text, far better
    assert 0.35 < np.mean(predicted[missing] == truth[missing]) < np.mean(predicted[~missing] == truth[~missing]) - 0.2


def test_a_head_refuses_a_store_of_another_encoder(pairs, tmp_path):
    train_head(pairs.manifest, [pairs.image, pairs.text], tmp_path / "h", kind="linear")
    ids = read_manifest(pairs.manifest).ids.to_pylist()
    other = write_store(tmp_path / "title", "text", ids, np.ones((len(ids), 24), np.float32),
                        generated_encoder("another-model", 24))
    with pytest.raises(BadInput, match="was trained on"):
        evaluate(tmp_path / "h", pairs.manifest, feature_args=[f"title={other}"])
    with pytest.raises(BadInput, match="was trained on"):
        predict(tmp_path / "h", pairs.manifest, tmp_path / "p.parquet", feature_args=[str(other)])
    assert not (tmp_path / "p.parquet").exists()
    with pytest.raises(BadInput, match="no feature 'nope'"):
        evaluate(tmp_path / "h", pairs.manifest, feature_args=[f"nope={other}"])


def test_bad_inputs_are_clear_errors(pairs, tmp_path):
    import pyarrow as pa

    table = pq.read_table(pairs.manifest)
    pq.write_table(table.drop(["label"]), tmp_path / "nolabels.parquet")
    with pytest.raises(BadInput, match="no 'label' or 'labels' column"):
        train_head(tmp_path / "nolabels.parquet", [pairs.image], tmp_path / "h", kind="linear")
    no_train = table.set_column(table.column_names.index("split"), "split",
                                pa.array(["val" if s == "train" else s for s in table["split"].to_pylist()]))
    pq.write_table(no_train, tmp_path / "notrain.parquet")  # no val split is fine (tests/fuse/test_fewshot.py)
    with pytest.raises(BadInput, match="'train' split has no rows"):
        train_head(tmp_path / "notrain.parquet", [pairs.image], tmp_path / "h", kind="linear")
    stranger = write_store(tmp_path / "stranger", "image", ["zz1", "zz2"], np.ones((2, 48), np.float32),
                           generated_encoder("img", 48))
    with pytest.raises(BadInput, match="none of its 2 ids"):
        train_head(pairs.manifest, [stranger], tmp_path / "h", kind="linear")
    with pytest.raises(BadInput, match="--head mlp"):
        train_head(pairs.manifest, [pairs.image], tmp_path / "h", kind="linear", align_descriptions=1.0)
    assert not (tmp_path / "h").exists()  # nothing half-written


def test_alignment_pulls_image_projections_to_label_descriptions(pairs, tmp_path, tiny_clip_spec):
    import torch

    from phrasefuse.fuse.labeltext import embed_texts

    table = pq.read_table(pairs.manifest)
    labels = sorted(set(table["label"].to_pylist()))
    pq.write_table(pa_table({"label": labels, "description": [f"a picture of shape number {c}" for c in labels]}),
                   tmp_path / "desc.parquet")
    report = train_head(pairs.manifest, [pairs.image, pairs.text], tmp_path / "h", kind="mlp", align_descriptions=1.0,
                        label_descriptions=str(tmp_path / "desc.parquet"), text_model=tiny_clip_spec)
    head = load_head(tmp_path / "h")
    assert head.meta["alignment"]["weight"] == 1.0 and head.meta["alignment"]["texts"] == "descriptions"
    net = report.fitted.net
    targets, _ = embed_texts([f"a picture of shape number {c}" for c in labels], tiny_clip_spec)
    manifest = read_manifest(pairs.manifest)
    blocks = load_blocks([head.features()[0]], manifest.ids, manifest.source)
    x = torch.from_numpy(report.fitted.transform.select([0]).apply(blocks))
    with torch.no_grad():
        z = torch.nn.functional.normalize(net.align(net.proj[0](x)), dim=1).numpy()
    nearest = np.argmax(z @ targets.T, axis=1)
    # the image feature only knows y // 2: its projection can find the right pair of descriptions
    assert np.mean(nearest // 2 == pairs.labels // 2) > 0.8


def pa_table(columns):
    import pyarrow as pa

    return pa.table(columns)


def test_predictions_show_the_phrases_behind_them(pairs, tmp_path):
    import pyarrow as pa

    ids = read_manifest(pairs.manifest).ids.to_pylist()
    from phrasefuse.store import EmbeddingStore

    have = np.flatnonzero(pairs.text_present)
    vectors, _ = EmbeddingStore(pairs.text).lookup([ids[i] for i in have])  # informative: the fused head is kept
    phrases = [[f"phrase {i}", f"query {i % 7}"] for i in have]
    store = write_store(tmp_path / "phrases", "text", [ids[i] for i in have], vectors, generated_encoder("phr", 24),
                        extra={"phrases": pa.array(phrases, pa.list_(pa.string()))})
    assert train_head(pairs.manifest, [pairs.image, store], tmp_path / "h", kind="linear").saved == "fused"
    predict(tmp_path / "h", pairs.manifest, tmp_path / "p.parquet")
    column = pq.read_table(tmp_path / "p.parquet")["phrases"].to_pylist()
    assert [column[i] for i in have] == phrases
    assert all(column[i] is None for i in np.flatnonzero(~pairs.text_present))


def test_same_seed_same_head(pairs, tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        train_head(pairs.manifest, [pairs.image, pairs.text], tmp_path / name, kind="mlp", seed=seed)
    weights = {n: (tmp_path / n / "weights.safetensors").read_bytes() for n in "abc"}
    assert weights["a"] == weights["b"] and weights["a"] != weights["c"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_label_seen_only_in_val_and_test_counts_as_errors(tmp_path, kind):
    """A class that train lacks: no crash; its rows are errors, and the report says how many."""
    import pyarrow as pa

    data = write_synthetic(tmp_path / "d", n=600, image_signal=0.5, text_signal=0.0)
    table = pq.read_table(data.manifest)
    labels, split = table["label"].to_pylist(), table["split"].to_pylist()
    rare = [i for i, s in enumerate(split) if s != "train" and i % 7 == 0]
    for i in rare:
        labels[i] = "rare"
    pq.write_table(table.set_column(table.column_names.index("label"), "label", pa.array(labels)),
                   tmp_path / "m.parquet")
    report = train_head(tmp_path / "m.parquet", [data.image], tmp_path / "h", kind=kind)
    n_val = sum(split[i] == "val" for i in rare)
    n_test = len(rare) - n_val
    assert report.metrics["val"]["saved"]["unknown_labels"] == n_val > 0
    assert report.metrics["test"]["saved"]["unknown_labels"] == n_test > 0
    assert "rare" not in json.loads((tmp_path / "h" / "meta.json").read_text())["labels"]
    assert any(w.startswith(f"{n_test} of ") and "test rows carry a label the train split lacks" in w
               for w in report.warnings)
    assert any(f"{n_val} of " in w and "val rows" in w for w in report.warnings)
    # the known rows are still classified well: the errors are the unseen rows (and a few others)
    test_rows = [i for i, s in enumerate(split) if s == "test"]
    assert report.metrics["test"]["saved"]["top1"] <= 1 - n_test / len(test_rows) + 1e-9


def test_warnings_for_a_thin_val_split(tmp_path):
    import pyarrow as pa

    data = write_synthetic(tmp_path / "d", n=600, image_signal=0.5, text_signal=0.0)
    table = pq.read_table(data.manifest)
    labels, split = table["label"].to_pylist(), table["split"].to_pylist()
    val_c0 = [i for i, (l, s) in enumerate(zip(labels, split)) if s == "val" and l == "c0"]
    thin = ["train" if i in val_c0[2:] else s for i, s in enumerate(split)]  # 2 val rows of c0 left
    pq.write_table(table.set_column(table.column_names.index("split"), "split", pa.array(thin)),
                   tmp_path / "m.parquet")
    report = train_head(tmp_path / "m.parquet", [data.image], tmp_path / "h", kind="linear")
    assert [w for w in report.warnings if "fewer than 5 rows" in w] == \
        ["the val split has fewer than 5 rows of 1 of 6 labels ('c0': 2): choices made on it (text trust, label "
         "prior weight, early stopping) rest on few rows"]
    assert json.loads((tmp_path / "h" / "meta.json").read_text())["warnings"] == report.warnings
    full = train_head(data.manifest, [data.image], tmp_path / "h2", kind="linear")
    assert full.warnings == []


def test_an_informative_label_prior_is_kept_and_a_noise_prior_left_out(tmp_path, tiny_clip_spec):
    """Prior vectors near their row's label-name embedding (informative) or random (noise), in the
    text space of a real (tiny random) encoder: only the first earns a weight."""
    from phrasefuse.fuse.labeltext import embed_texts

    data = write_synthetic(tmp_path / "d", n=1200, image_signal=0.22, text_signal=0.0)
    label_emb, identity = embed_texts([f"c{c}" for c in range(6)], tiny_clip_spec)
    ids = read_manifest(data.manifest).ids.to_pylist()
    rng = np.random.default_rng(0)
    dim = label_emb.shape[1]
    near = label_emb[data.labels] + 0.25 * rng.standard_normal((len(ids), dim)).astype(np.float32)
    write_store(tmp_path / "near", "text", ids, near, identity)
    good = train_head(data.manifest, [data.image], tmp_path / "good", kind="linear", label_prior=str(tmp_path / "near"))
    assert good.prior["weight"] > 0, good.prior["rule"]
    assert top1(good) > top1(good, "without_prior") + 0.03
    assert "label prior: near (label names), weight" in good.text()
    # what is printed is what was saved: the saved line names every part of the head, the prior and its
    # weight too (an image-only head with a prior changes predictions); the rule's statistics are in
    # meta.json and --json, the text has one plain line
    meta = json.loads((tmp_path / "good" / "meta.json").read_text())
    saved = next(line for line in good.text().splitlines() if line.startswith("  saved: "))
    assert saved == (f"  saved: features {', '.join(f['name'] for f in meta['features'])}; label prior near, weight "
                     f"{meta['prior']['weight']:.3g}")
    without, with_it = (100 * meta["metrics"]["val"][k]["top1"] for k in ("without_prior", "saved"))
    assert f"it raised val top-1 from {without:.1f} to {with_it:.1f}" in good.text()
    assert "rule" not in good.text() and "dlogL" not in good.text() and "dlogL" in meta["prior"]["rule"]
    assert "dlogL" in json.dumps(good.as_dict())
    for seed in (0, 1, 2):
        noise = np.random.default_rng(seed).standard_normal((len(ids), dim)).astype(np.float32)
        write_store(tmp_path / f"noise{seed}", "text", ids, noise, identity)
        bad = train_head(data.manifest, [data.image], tmp_path / f"bad{seed}", kind="linear", seed=seed,
                         label_prior=str(tmp_path / f"noise{seed}"))
        assert bad.prior["weight"] == 0.0, bad.prior["rule"]
        assert bad.metrics["test"]["saved"] == bad.metrics["test"]["without_prior"]
        assert "(left out)" in bad.text() and "; no label prior (left out)" in bad.text()
