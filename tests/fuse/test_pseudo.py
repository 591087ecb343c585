"""Pseudo-shots (fuse/pseudo.py): query prototypes pseudo-labelled through the label texts, kept
only when they clearly help on held-out rows, dropped when they do not, refused from another encoder."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phrasefuse.errors import BadInput
from phrasefuse.fuse.data import Blocks, prepare
from phrasefuse.fuse.heads import Task, head_params
from phrasefuse.fuse.pseudo import PseudoShots, load_pseudo_shots, match_labels
from phrasefuse.fuse.select import choose_label_prior, cross_validation, fit_and_choose, sample_shots
from phrasefuse.store import EmbeddingStore
from tests.conftest import run_cli
from tests.fuse.conftest import generated_encoder, write_store

CLASSES = 6


def test_each_phrase_goes_to_its_nearest_label_and_each_label_takes_its_widest_margins():
    label_emb = np.eye(3, dtype=np.float32)
    phrases = np.array([[1, 0, 0], [0.9, 0.8, 0], [0, 1, 0], [0, 0.2, 1], [0, 0.7, 0.72]], np.float32)
    labels, margins = match_labels(phrases, label_emb)
    assert labels.tolist() == [0, 0, 1, 2, 2]
    assert margins[0] > margins[1] and margins[3] > margins[4] > 0
    shots = PseudoShots("x", phrases, labels, margins, list("abcde"), {})
    assert sorted(shots.taken(1).tolist()) == [0, 2, 3]  # the widest margin of each label
    assert sorted(shots.taken(2).tolist()) == [0, 1, 2, 3, 4]  # label 1 has only one phrase


@pytest.fixture(scope="module")
def few_shot(tmp_path_factory):
    """Generated data where 3 shots per class leave the image head weak, and prototypes of
    other train rows of each class (the query corpus) are near the class centres."""
    from tests.fuse.conftest import write_synthetic

    data = write_synthetic(tmp_path_factory.mktemp("pseudo"), n=1200, classes=CLASSES, image_signal=0.45,
                           text_missing=0.0)
    prep = prepare(data.manifest, [str(data.image)], need=("train", "test"))
    y = prep.labels.y
    rng = np.random.default_rng(5)
    pool = sample_shots(prep.rows["train"], y, False, 3, 0)
    corpus = np.setdiff1d(prep.rows["train"], pool)
    vectors, labels = [], []
    for c in range(CLASSES):  # 8 prototypes per class, each the mean of 6 corpus images
        rows = rng.choice(corpus[y[corpus] == c], (8, 6))
        vectors.append(prep.blocks.arrays[0][rows].mean(axis=1))
        labels += [c] * 8
    vectors = np.concatenate(vectors)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    margins = rng.uniform(0.1, 0.5, len(labels)).astype(np.float32)
    return prep, pool, vectors, np.array(labels), margins


def choose_with(prep, pool, pseudo, k=3, seed=0):
    task = Task(prep.labels.vocab, False)
    scheme = cross_validation(pool, prep.labels.y, False, k, seed)
    return fit_and_choose("linear", prep.blocks, prep.labels.y, task, prep.roles, head_params("linear", {}), seed,
                          scheme, pseudo=pseudo)


def test_matching_pseudo_shots_are_kept_and_help(few_shot):
    prep, pool, vectors, labels, margins = few_shot
    shots = PseudoShots("generated", vectors, labels, margins, [f"p{i}" for i in range(len(labels))], {})
    outcome = choose_with(prep, pool, shots)
    without = choose_with(prep, pool, None)
    test = prep.rows["test"]
    acc = lambda o: np.mean(np.argmax(o.saved.predict(prep.blocks.take(test)), 1) == prep.labels.y[test])
    assert outcome.pseudo["per_label"] > 0 and outcome.pseudo["rows"] == CLASSES * outcome.pseudo["per_label"]
    assert outcome.pseudo["score_without"] < max(c["score"] for c in outcome.pseudo["candidates"])
    assert "pseudo-shots" in outcome.reason
    assert acc(outcome) > acc(without) + 0.05  # on the test split, which chose nothing
    # the label prior's second look uses the head's labelled training rows, not its pseudo-shot rows
    cos = np.random.default_rng(0).standard_normal((len(prep.labels.y), CLASSES)).astype(np.float32)
    weight, record = choose_label_prior(outcome, cos, prep.labels.y)
    assert weight == 0.0 and "did not pass its own test either" in record["rule"]


@pytest.mark.parametrize("seed", range(3))
def test_mismatched_pseudo_shots_are_dropped(few_shot, seed):
    prep, pool, vectors, labels, margins = few_shot
    wrong = (labels + 1 + np.random.default_rng(seed).integers(0, CLASSES - 1, len(labels))) % CLASSES
    shots = PseudoShots("generated", vectors, wrong, margins, [f"p{i}" for i in range(len(labels))], {})
    outcome = choose_with(prep, pool, shots, seed=seed)
    assert outcome.pseudo["per_label"] == 0 and outcome.pseudo["rows"] == 0
    assert len(outcome.pseudo["candidates"]) == 4  # every candidate was scored, none won
    without = choose_with(prep, pool, None, seed=seed)
    test = prep.blocks.take(prep.rows["test"])
    assert np.allclose(outcome.saved.predict(test), without.saved.predict(test))  # the head without them


def test_one_shot_leaves_pseudo_shots_out(few_shot):
    prep, _, vectors, labels, margins = few_shot
    pool = sample_shots(prep.rows["train"], prep.labels.y, False, 1, 0)
    shots = PseudoShots("generated", vectors, labels, margins, [f"p{i}" for i in range(len(labels))], {})
    outcome = choose_with(prep, pool, shots, k=1)
    assert outcome.pseudo["per_label"] == 0 and not outcome.pseudo["candidates"]
    assert "nothing held out" in outcome.pseudo["reason"]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """Generated data, its image store, and an index built from it whose phrases are the label names."""
    from phrasefuse.index.build import build_index
    from tests.fuse.conftest import write_synthetic

    folder = tmp_path_factory.mktemp("indexed")
    data = write_synthetic(folder, n=300, classes=CLASSES, text_missing=0.0)
    manifest = pq.read_table(data.manifest)
    pairs = pa.table({"query": manifest["label"], "image_id": manifest["id"]})
    pq.write_table(pairs, folder / "pairs.parquet")
    build_index(folder / "pairs.parquet", data.image, folder / "index")
    return data, folder / "index"


def test_an_index_gives_each_label_its_own_prototype(indexed, tiny_clip_spec):
    data, index = indexed
    prep = prepare(data.manifest, [str(data.image)], need=("train",))
    encoder = prep.features[0].store.meta["encoder"]
    shots = load_pseudo_shots(index, encoder, prep.labels.vocab, tiny_clip_spec)
    assert sorted(shots.phrases) == sorted(prep.labels.vocab)
    assert [prep.labels.vocab[c] for c in shots.labels] == shots.phrases  # identical texts match
    means = np.stack([prep.blocks.arrays[0][data.labels == c].mean(0) for c in range(CLASSES)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    assert np.allclose(shots.vectors, means[shots.labels], atol=1e-4)  # the prototypes, read back from FAISS


def test_an_index_of_another_encoder_is_refused(indexed, tmp_path, tiny_clip_spec):
    data, index = indexed
    other = generated_encoder("other-img", 48)
    with pytest.raises(BadInput, match="other-img"):
        load_pseudo_shots(index, other, ["c0", "c1"], tiny_clip_spec)
    ids = pq.read_table(data.manifest)["id"].to_pylist()
    write_store(tmp_path / "img2", "image", ids, EmbeddingStore(data.image).lookup(ids)[0], other)
    proc = run_cli("fuse", "train", "--manifest", data.manifest, "--feature", tmp_path / "img2", "--head", "linear",
                   "--pseudo-shots", index, "--out", tmp_path / "head")
    assert proc.returncode == 2 and "--pseudo-shots" in proc.stderr and "other-img" in proc.stderr
    assert not (tmp_path / "head").exists()


def test_fuse_train_records_the_pseudo_shot_choice(indexed, tmp_path, tiny_clip_spec):
    import json

    from phrasefuse.fuse.train import train_head
    from phrasefuse.report.page import _decision_text

    data, index = indexed
    report = train_head(data.manifest, [str(data.image)], tmp_path / "head", kind="linear", pseudo_shots=str(index),
                        text_model=tiny_clip_spec)
    meta = json.loads((tmp_path / "head" / "meta.json").read_text())
    pseudo = meta["selection"]["pseudo_shots"]
    assert pseudo["index"] == str(index) and pseudo["rule"].startswith("per label")
    assert [c["per_label"] for c in pseudo["candidates"]] == [1]  # one phrase per label: one candidate set
    assert np.isfinite(pseudo["score_without"]) and np.isfinite(pseudo["candidates"][0]["score"])
    assert (pseudo["rows"] > 0) == (pseudo["per_label"] > 0) and pseudo["reason"]
    assert "pseudo-shots:" in report.text() and "pseudo-shots from" in _decision_text(meta)
