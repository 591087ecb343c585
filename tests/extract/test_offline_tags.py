"""An open_clip pretrained tag whose weights are not cached fails at once, offline, in one whole line."""

from __future__ import annotations

import pytest

from phrasefuse.errors import BadInput
from phrasefuse.extract.encoders import _first_words, load_image_encoder

ARCH, TAG = "ViT-B-32", "laion2b_s34b_b79k"


def test_uncached_tag_offline_is_one_whole_line(monkeypatch):
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip_model.safetensors"), str):
        pytest.skip("these weights are cached on this machine")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BadInput) as e:
        load_image_encoder(f"open_clip:{ARCH}@{TAG}", "cpu")
    message = str(e.value)
    assert "\n" not in message and "not in the local cache" in message and "HF_HUB_OFFLINE" in message
    assert message.endswith("open_clip:ViT-B-32@/path/to/weights.pt")


def test_long_messages_are_cut_at_a_word():
    text = "word " * 100
    cut = _first_words(text, 42)
    assert cut.endswith(" ...") and len(cut) <= 46 and cut[:-4].split(" ")[-1] == "word"
    assert _first_words("short\nsecond line") == "short"
