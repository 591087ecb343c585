"""Options of `index build` that no other test exercised, each by its effect: --target-recall,
--seed, and a float16 image store read by the index stage."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from phrasefuse.index.build import build_index
from phrasefuse.index.folder import PhraseIndex
from phrasefuse.store import EmbeddingStore, StoreWriter, embeddings_to_numpy
from tests.index.conftest import read_meta


def build(random_pairs, store, out, **options) -> dict:
    build_index(random_pairs, store, out, **options)
    return read_meta(out)


@pytest.fixture(scope="module")
def recall_builds(random_store, random_pairs, tmp_path_factory) -> dict[float, dict]:
    folder = tmp_path_factory.mktemp("recall")
    return {target: build(random_pairs, random_store, folder / str(target), kind="ivf-flat", target_recall=target)
            for target in (0.5, 0.99)}


def test_target_recall_sets_how_far_the_search_probes(recall_builds):
    low, high = recall_builds[0.5]["index"], recall_builds[0.99]["index"]
    assert (low["target_recall"], high["target_recall"]) == (0.5, 0.99)
    assert low["search_param"] == high["search_param"] == "nprobe"
    assert high["search_value"] > low["search_value"]  # more lists probed for the higher target
    # Each meets its target on held-out queries, within the sampling error of 500 queries.
    assert recall_builds[0.5]["recall_at_10"] >= 0.5 - 0.05 and recall_builds[0.99]["recall_at_10"] >= 0.95
    assert recall_builds[0.99]["recall_at_10"] > recall_builds[0.5]["recall_at_10"]


def test_seed_makes_the_build_reproducible_and_another_seed_another_index(random_store, random_pairs, tmp_path):
    metas = {name: build(random_pairs, random_store, tmp_path / name, kind="ivf-flat", seed=seed)
             for name, seed in (("a", 3), ("again", 3), ("other", 4))}
    faiss_bytes = {name: (tmp_path / name / "index.faiss").read_bytes() for name in metas}
    assert faiss_bytes["a"] == faiss_bytes["again"]  # same seed: the same trained index, byte for byte
    assert faiss_bytes["a"] != faiss_bytes["other"]  # another seed: other k-means starts, other lists
    assert metas["a"]["index"]["search_value"] == metas["again"]["index"]["search_value"]
    assert metas["a"]["recall_at_10"] == metas["again"]["recall_at_10"]


def test_a_float16_image_store_builds_the_same_index(random_store, random_pairs, tmp_path):
    source = EmbeddingStore(random_store)
    table = source.read_table()
    with StoreWriter.open(tmp_path / "img16", {**source.meta, "dtype": "float16"}, shard_size=2000) as writer:
        writer.add(table["id"], table["key"], embeddings_to_numpy(table["emb"]))
    assert EmbeddingStore(tmp_path / "img16").read_table().schema.field("emb").type.value_type == pa.float16()
    build_index(random_pairs, random_store, tmp_path / "i32")
    build_index(random_pairs, tmp_path / "img16", tmp_path / "i16")
    a, b = PhraseIndex(tmp_path / "i32"), PhraseIndex(tmp_path / "i16")
    assert a.phrases.equals(b.phrases)
    prototypes_32 = a.faiss_index.reconstruct_n(0, a.faiss_index.ntotal)
    prototypes_16 = b.faiss_index.reconstruct_n(0, b.faiss_index.ntotal)
    np.testing.assert_allclose(prototypes_16, prototypes_32, atol=2e-3)  # float16: ~3 decimal digits
