"""A text's memory is bounded by the model's length (b15): a 20 MB cell was tokenized whole before
the model truncated it to its 256 tokens (4.3 GB RSS). Each text now reaches the tokenizer cut to
`CHARS_PER_TOKEN` x the model's maximum tokens, and the model still reads the same tokens."""

from __future__ import annotations

import numpy as np
import pytest

from phrasefuse.extract import DEFAULT_TEXT_MODEL
from phrasefuse.extract.encoders import CHARS_PER_TOKEN, load_text_encoder


@pytest.mark.parametrize("family", ["builtin", "open_clip"])
def test_a_huge_text_reaches_the_tokenizer_cut_to_what_the_model_reads(family, tiny_clip_spec):
    encoder = load_text_encoder(DEFAULT_TEXT_MODEL if family == "builtin" else tiny_clip_spec, "cpu")
    tokens = encoder.module.max_seq_length if family == "builtin" else encoder.module.context_length
    assert encoder.max_chars == tokens * CHARS_PER_TOKEN
    seen: list[int] = []
    model_call = encoder.encode_batch  # the real tokenizer + model; this only records what it is given

    def recording(texts: list[str]):
        seen.extend(len(t) for t in texts)
        return model_call(texts)

    encoder.encode_batch = recording
    huge = "a long page dumped into one cell " * 60_000  # ~2 MB
    capped = encoder.encode([huge, "short"])
    assert sorted(seen) == [5, encoder.max_chars]
    encoder.encode_batch, encoder.max_chars = model_call, 0  # uncut: the tokenizer truncates it itself
    whole = encoder.encode([huge[:200_000], "short"])
    np.testing.assert_allclose(capped, whole, atol=1e-5)  # the same tokens: the cut lost nothing
