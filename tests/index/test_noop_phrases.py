"""`phrases` with no new image loads no text model and no FAISS index: the output store's meta.json
names the text model (`extract.identity`), and the CLI process imports neither torch nor faiss; a
new (or changed) image still loads both and is searched."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from phrasefuse.extract import encoders
from phrasefuse.extract.jobs import extract_images
from phrasefuse.index.build import build_index
from phrasefuse.index.folder import PhraseIndex
from phrasefuse.index.phrases import generate_phrases
from tests import inputs_data as data
from tests.extract.test_noop import NOOP_PROBE


def test_no_new_image_loads_no_text_model_nor_index(tiny_clip_spec, tmp_path, monkeypatch):
    photos = data.bmp_folder_and_pairs(tmp_path)
    images = tmp_path / "images"
    extract_images(photos, images, model=tiny_clip_spec, workers=0, progress=False)
    build_index(tmp_path / "pairs.parquet", images, tmp_path / "index", progress=False)
    loads = {"text": 0, "faiss": 0}
    real_text, real_faiss = encoders.load_text_encoder, PhraseIndex.faiss_index.fget

    def text(*args, **kwargs):
        loads["text"] += 1
        return real_text(*args, **kwargs)

    def faiss_index(self):
        loads["faiss"] += self._faiss is None  # a read of the FAISS file
        return real_faiss(self)

    monkeypatch.setattr(encoders, "load_text_encoder", text)
    monkeypatch.setattr(PhraseIndex, "faiss_index", property(faiss_index))

    def phrases():
        return generate_phrases(tmp_path / "index", images, tmp_path / "phrases", text_model=tiny_clip_spec,
                                device="cpu", k=2, progress=False)

    assert phrases().written == 6 and loads == {"text": 1, "faiss": 1}
    again = phrases()
    assert (again.written, again.present, loads) == (0, 6, {"text": 1, "faiss": 1})

    # The real CLI in a fresh process: nothing of torch, open_clip or faiss is imported.
    proc = subprocess.run([sys.executable, "-c", NOOP_PROBE, "phrases", "--index", str(tmp_path / "index"),
                           "--images", str(images), "--out", str(tmp_path / "phrases"), "--text-model",
                           tiny_clip_spec, "-k", "2", "--json"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"code": 0, "heavy": []}, proc.stderr

    (photos / "6.bmp").write_bytes(data.bmp(6))  # a new image: searched, with the model and the index loaded
    extract_images(photos, images, model=tiny_clip_spec, workers=0, progress=False)
    new = phrases()
    assert (new.written, new.present, loads) == (1, 6, {"text": 2, "faiss": 2})
