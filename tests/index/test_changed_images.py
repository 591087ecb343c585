"""Derived results follow a changed image (b32): the phrases of an image whose content changed
(embedded again by `extract images`) are searched again from its new vector, not kept."""

from __future__ import annotations

from phrasefuse.extract.jobs import extract_images
from phrasefuse.index.build import build_index
from phrasefuse.index.phrases import generate_phrases
from phrasefuse.store import EmbeddingStore, verify_store
from tests import inputs_data as data


def test_phrases_of_a_changed_image_are_searched_again(tiny_clip_spec, tmp_path):
    photos = data.bmp_folder_and_pairs(tmp_path)
    images = tmp_path / "images"
    extract_images(photos, images, model=tiny_clip_spec, workers=0, progress=False)
    build_index(tmp_path / "pairs.parquet", images, tmp_path / "index", progress=False)
    out = tmp_path / "phrases"
    assert generate_phrases(tmp_path / "index", images, out, text_model=tiny_clip_spec, device="cpu", k=2,
                            progress=False).written == 6

    (photos / "4.bmp").write_bytes(data.bmp(404))
    assert extract_images(photos, images, model=tiny_clip_spec, workers=0, progress=False).changed == 1
    again = generate_phrases(tmp_path / "index", images, out, text_model=tiny_clip_spec, device="cpu", k=2,
                             progress=False)
    assert (again.written, again.present) == (1, 5)
    keys = dict(zip(*EmbeddingStore(out).ids_and_keys().to_pydict().values()))
    # every phrase row is of its image's current content
    assert keys == dict(zip(*EmbeddingStore(images).ids_and_keys().to_pydict().values()))
    assert verify_store(EmbeddingStore(out)) == []
