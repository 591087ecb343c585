"""The encoder families are a registry: a family registered at runtime (here an alias backed by
open_clip's loaders) extracts a store, and its record, not its name, lets label texts score that
store's image vectors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from phrasefuse.errors import BadInput
from phrasefuse.extract.encoders import (FAMILIES, family_of, list_families, load_image_encoder, load_text_encoder,
                                         parse_spec, register_family)
from phrasefuse.store import EmbeddingStore


@pytest.fixture
def clip_alias():
    family = register_family(dataclasses.replace(FAMILIES["open_clip"], name="clip-alias"))
    yield family
    del FAMILIES[family.name]


def test_each_family_says_what_it_can_do():
    assert [name for name, f in FAMILIES.items() if f.shares_image_text_space] == ["open_clip"]
    assert [name for name, f in FAMILIES.items() if f.weights_after_at] == ["open_clip", "timm"]
    assert family_of("external") is None and family_of(None) is None  # imported vectors: no loader
    with pytest.raises(ValueError):
        register_family(FAMILIES["timm"])  # a name already taken


def test_a_family_registered_at_runtime_loads_extracts_and_scores(clip_alias, tiny_clip_config, tiny_clip_spec,
                                                                   shapes_dataset, tmp_path):
    from phrasefuse.extract.jobs import extract_images
    from phrasefuse.fuse.labeltext import embed_for_store

    spec = f"clip-alias:{tiny_clip_config}@"
    assert parse_spec(spec).weights is None and "clip-alias" in list_families("image")
    alias, original = load_image_encoder(spec, "cpu"), load_image_encoder(tiny_clip_spec, "cpu")
    assert alias.identity["family"] == "clip-alias"  # its own identity: never mixed with open_clip's vectors
    assert alias.identity["weights_sha256"] == original.identity["weights_sha256"]
    assert load_text_encoder(spec, "cpu").identity == alias.identity  # one model, one space

    extract_images(shapes_dataset, tmp_path / "img", model=spec, workers=0, progress=False)
    store = EmbeddingStore(tmp_path / "img")
    assert store.meta["encoder"]["family"] == "clip-alias"
    label_emb, identity = embed_for_store(["a red circle", "a blue square"], store)
    assert identity == store.meta["encoder"] and label_emb.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(label_emb, axis=1), 1.0, atol=1e-5)

    # The same store, once its family no longer shares the image-text space, has no text tower.
    FAMILIES["clip-alias"] = dataclasses.replace(clip_alias, shares_image_text_space=False)
    with pytest.raises(BadInput, match="no text tower"):
        embed_for_store(["a red circle"], store)
