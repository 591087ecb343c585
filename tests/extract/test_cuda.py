"""Extract on CUDA (marked gpu; skipped without a CUDA device; bench/gpu.sh runs them): the same
images through the real job on the GPU (uint8 batches copied pinned, normalised on the device, under
autocast) give the CPU's embeddings, cosine > 0.999; the text encoders likewise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from phrasefuse.extract.encoders import load_text_encoder
from phrasefuse.extract.jobs import extract_images
from phrasefuse.store import EmbeddingStore

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def store_vectors(path) -> tuple[list, np.ndarray]:
    ids, emb = EmbeddingStore(path).embeddings()
    order = np.argsort(ids)
    return [ids[i] for i in order], np.asarray(emb)[order]


@pytest.mark.parametrize("model", ["builtin", "tiny-clip"])
def test_extract_on_cuda_equals_cpu(model, shapes_dataset, tiny_clip_spec, tmp_path):
    spec = "builtin:efficientnet-lite0" if model == "builtin" else tiny_clip_spec
    for device in ("cpu", "cuda"):
        summary = extract_images(shapes_dataset, tmp_path / device, model=spec, device=device, workers=2,
                                 progress=False)
        assert summary.embedded == 60, summary.text()
    cpu_ids, cpu = store_vectors(tmp_path / "cpu")
    cuda_ids, cuda = store_vectors(tmp_path / "cuda")
    assert cpu_ids == cuda_ids
    cosine = np.einsum("nd,nd->n", cpu, cuda)
    assert cosine.min() > 0.999, (model, float(cosine.min()))


@pytest.mark.parametrize("model", ["builtin", "tiny-clip"])
def test_text_encoders_on_cuda_equal_cpu(model, tiny_clip_spec):
    spec = "builtin:all-minilm-l6-v2" if model == "builtin" else tiny_clip_spec
    texts = ["a photo of a ring", "milk can", "a traffic cone on a road", "IMG_0013", "tennis ball"]
    cpu = load_text_encoder(spec, "cpu").encode(texts)
    cuda = load_text_encoder(spec, "cuda").encode(texts, batch_size=2)
    assert np.einsum("nd,nd->n", cpu, cuda).min() > 0.999
