"""Nothing to do loads no model: an extract whose every row is already stored answers from the store's
meta.json (the encoder identity with the stamp of its weights files, `extract.identity`), and the
process never imports torch; a changed row, changed weights files or a store without the stamp
still load the model, and a changed model is still refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from phrasefuse.errors import BadInput
from phrasefuse.extract import encoders
from phrasefuse.extract.identity import WEIGHTS_FILES, weights_stamp
from phrasefuse.extract.jobs import extract_images, extract_texts
from phrasefuse.store import EmbeddingStore
from tests import inputs_data as data
from tests.conftest import TINY_CLIP_CONFIG

HEAVY = ("torch", "open_clip", "faiss", "lightgbm", "sentence_transformers", "timm")


def bmp(seed: int) -> bytes:
    return data.bmp(seed)


@pytest.fixture
def photos(tmp_path):
    return data.bmp_classes(tmp_path / "photos", per_class=2)


@pytest.fixture
def spec(tmp_path) -> str:
    """A tiny random open_clip of this test's own (its config file is changed by some tests)."""
    path = tmp_path / "tiny-noop-clip.json"
    path.write_text(json.dumps(TINY_CLIP_CONFIG))
    return f"open_clip:{path}@"


@pytest.fixture
def loads(monkeypatch) -> dict[str, int]:
    """How many times the real encoder factories run (they are looked up at call time)."""
    counts = {"image": 0, "text": 0}
    real_image, real_text = encoders.load_image_encoder, encoders.load_text_encoder

    def image(*args, **kwargs):
        counts["image"] += 1
        return real_image(*args, **kwargs)

    def text(*args, **kwargs):
        counts["text"] += 1
        return real_text(*args, **kwargs)

    monkeypatch.setattr(encoders, "load_image_encoder", image)
    monkeypatch.setattr(encoders, "load_text_encoder", text)
    return counts


def extract(photos, out, spec):
    return extract_images(photos, out, model=spec, workers=0, batch_size=4, progress=False)


def test_all_stored_loads_no_model_and_a_replaced_photo_does(photos, spec, loads, tmp_path):
    out = tmp_path / "store"
    assert extract(photos, out, spec).embedded == 4 and loads["image"] == 1
    assert EmbeddingStore(out).meta["encoder"][WEIGHTS_FILES] == weights_stamp(spec)
    again = extract(photos, out, spec)
    assert (again.present, again.embedded, loads["image"]) == (4, 0, 1)  # answered from meta.json
    (photos / "red" / "0.bmp").write_bytes(bmp(99))
    changed = extract(photos, out, spec)
    assert (changed.changed, changed.embedded, loads["image"]) == (1, 1, 2)
    (photos / "red" / "5.bmp").write_bytes(bmp(98))  # a new row likewise
    assert extract(photos, out, spec).embedded == 1 and loads["image"] == 3


def test_touched_weights_load_once_then_not(photos, spec, loads, tmp_path):
    out = tmp_path / "store"
    extract(photos, out, spec)
    config = spec.split(":", 1)[1].rstrip("@")
    st = os.stat(config)
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, another mtime
    assert extract(photos, out, spec).present == 4 and loads["image"] == 2  # checked by loading: the same model
    assert EmbeddingStore(out).meta["encoder"][WEIGHTS_FILES] == weights_stamp(spec)  # the new stamp recorded
    extract(photos, out, spec)
    assert loads["image"] == 2


def test_changed_weights_are_still_refused(photos, spec, loads, tmp_path):
    out = tmp_path / "store"
    extract(photos, out, spec)
    config = spec.split(":", 1)[1].rstrip("@")
    other = json.loads(json.dumps(TINY_CLIP_CONFIG))
    other["vision_cfg"]["layers"] = 1  # another model under the same spec
    with open(config, "w") as f:
        json.dump(other, f)
    with pytest.raises(BadInput, match="holds embeddings of"):
        extract(photos, out, spec)


def test_store_without_the_stamp_loads_once_and_records_it(photos, spec, loads, tmp_path):
    out = tmp_path / "store"
    extract(photos, out, spec)
    meta = json.loads((out / "meta.json").read_text())
    del meta["encoder"][WEIGHTS_FILES]  # as stores written before the stamp
    (out / "meta.json").write_text(json.dumps(meta))
    assert extract(photos, out, spec).present == 4 and loads["image"] == 2
    extract(photos, out, spec)
    assert loads["image"] == 2


def test_texts_all_stored_load_no_model(spec, loads, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "image": ["a.jpg", "b.jpg", "c.jpg"],
                             "title": ["a red ball", "a blue cube", None]}), manifest)
    out = tmp_path / "titles"
    assert extract_texts(manifest, "title", out, model=spec, progress=False).embedded == 2 and loads["text"] == 1
    again = extract_texts(manifest, "title", out, model=spec, progress=False)
    assert (again.present, again.embedded, loads["text"]) == (2, 0, 1)  # the row without text is no work
    pq.write_table(pa.table({"id": ["a", "b", "c"], "image": ["a.jpg", "b.jpg", "c.jpg"],
                             "title": ["a red ball", "a green cube", None]}), manifest)
    changed = extract_texts(manifest, "title", out, model=spec, progress=False)
    assert (changed.changed, changed.embedded, loads["text"]) == (1, 1, 2)


NOOP_PROBE = """
import json, sys
from phrasefuse.cli import main
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def test_cli_with_nothing_to_do_imports_no_model_library(photos, spec, tmp_path):
    """The real CLI in a fresh process: with every row stored, no torch, open_clip (or any other model
    library) is even imported."""
    out = tmp_path / "store"
    extract(photos, out, spec)
    proc = subprocess.run([sys.executable, "-c", NOOP_PROBE, "extract", "images", str(photos), "--out", str(out),
                           "--model", spec, "--json"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe == {"code": 0, "heavy": []}, proc.stderr
    assert '"present": 4' in proc.stdout


def test_weights_stamp_follows_the_files_and_names_only_what_it_can(tmp_path):
    from phrasefuse.extract.identity import weights_paths

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x" * 10)
    spec = f"timm:resnet18@{weights}"
    before = weights_stamp(spec)
    assert before and weights_stamp(spec) == before
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert weights_stamp(spec) != before
    weights.unlink()
    assert weights_stamp(spec) is None  # gone: loading says so, as before
    # A hub tag or name cannot be named without loading; a builtin is its package's files.
    assert weights_stamp("open_clip:ViT-B-32@laion2b_s34b_b79k") is None
    assert weights_stamp("sentence-transformers:all-MiniLM-L6-v2") is None
    assert weights_stamp("nofamily:x") is None
    for builtin in ("builtin:efficientnet-lite0", "builtin:all-minilm-l6-v2"):
        assert weights_paths(builtin) and weights_stamp(builtin)


def test_weights_files_rules_are_for_registered_families():
    """identity.FILES_OF_FAMILY is the torch-free half of the family registry: no rule for a family
    that does not exist (a misspelt key would silently load the model on every run)."""
    from phrasefuse.extract.encoders import FAMILIES
    from phrasefuse.extract.identity import FILES_OF_FAMILY

    assert set(FILES_OF_FAMILY) <= set(FAMILIES)
