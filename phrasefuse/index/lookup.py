"""`phrasefuse index lookup`: the top-k phrases of a few image files, with cosine scores.

The ad-hoc, interpretable view of what an index "sees" in an image. The images are
embedded with the index's own encoder, through the same decoding and preprocessing
as `extract images`, so a file gives the vector its store row holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from phrasefuse.errors import BadInput, printable
from phrasefuse.index import DEFAULT_LOOKUP_K
from phrasefuse.index.folder import PhraseIndex

BATCH = 64


@dataclass
class LookupResult:
    images: list[str]
    phrases: list[list[str]]
    scores: list[list[float]]

    def as_dict(self) -> list[dict]:
        """The --json document: a list, one {image, phrases, scores} per image."""
        return [{"image": image, "phrases": p, "scores": s}
                for image, p, s in zip(self.images, self.phrases, self.scores)]

    def text(self) -> str:
        lines = []
        for image, phrases, scores in zip(self.images, self.phrases, self.scores):
            lines.append(printable(image))  # a newline in a file name must not forge a line
            lines += [f"  {score:6.3f}  {printable(phrase)}" for phrase, score in zip(phrases, scores)]
        return "\n".join(lines)


def lookup(index_path: str | os.PathLike, images: list[str | os.PathLike], k: int = DEFAULT_LOOKUP_K,
           device: str = "auto") -> LookupResult:
    """Embed `images` with the index's encoder; their top-k phrases and scores. `device` auto|cpu|cuda
    places both the encoder (torch) and the search (FAISS)."""
    import torch

    from phrasefuse.extract.images import image_pixels, read_item
    from phrasefuse.extract.recorded import load_recorded_encoder

    if k < 1:
        raise BadInput(f"-k {k}: must be at least 1")
    index = PhraseIndex(index_path, device=device)  # --device cuda without a GPU: refused before any work
    files = []
    for path in map(str, images):  # before loading the model: a wrong path fails fast
        data, reason = read_item(path)
        if data is None:
            raise BadInput(f"{path}: {reason}; pass readable image files")
        files.append((path, data))
    encoder = load_recorded_encoder(index.meta, "image", folder=index.path, kind="index", device=device,
                                    fix="install that model where its spec says, or rebuild the index")
    pixels = []
    for path, data in files:
        try:
            pixels.append(image_pixels(data, encoder.to_pixels, encoder.resize_shorter))
        except ValueError as e:
            raise BadInput(f"{path}: {e}; pass readable image files") from None
    emb = np.concatenate([encoder.encode(torch.stack(pixels[i:i + BATCH])) for i in range(0, len(pixels), BATCH)])
    scores, rows = index.search(emb, k)
    phrases = index.phrases
    found = rows >= 0
    return LookupResult(
        images=[str(p) for p in images],
        phrases=[phrases.take(r[f]).to_pylist() for r, f in zip(rows, found)],
        scores=[[round(float(s), 4) for s in row[f]] for row, f in zip(scores, found)],
    )
