"""`phrasefuse index lookup`: the top-k phrases of a few image files, with cosine scores.

The ad-hoc, interpretable view of what an index "sees" in an image. The images are
embedded with the index's own encoder, through the same reader and mapper as `extract
images` (a batch at a time: memory is bounded by the batch size, not by the inputs), so a
file gives the vector its store row holds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

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
           device: str = "auto", batch_size: int = BATCH) -> LookupResult:
    """Embed `images` with the index's encoder; their top-k phrases and scores. `device` auto|cpu|cuda
    places both the encoder (torch) and the search (FAISS). The images are read, decoded, embedded and
    searched `batch_size` at a time (`search_batches`): what is held for all of them is only their
    top-k rows and scores, so memory does not grow with their bytes or pixels. Every row is searched
    before anything is returned: a bad image late in the list leaves no partial output."""
    if k < 1:
        raise BadInput(f"-k {k}: must be at least 1")
    index = PhraseIndex(index_path, device=device)  # --device cuda without a GPU: refused before any work
    paths = [str(p) for p in images]
    scores = rows = None
    for pos, batch_scores, batch_rows in search_batches(index, paths, k, device, batch_size):
        if scores is None:  # k' = min(k, phrases) columns: known from the first search
            scores = np.zeros((len(paths), batch_scores.shape[1]), np.float32)
            rows = np.full((len(paths), batch_rows.shape[1]), -1, np.int64)
        scores[pos], rows[pos] = batch_scores, batch_rows
    if scores is None:
        return LookupResult([], [], [])
    phrases = index.phrases
    found = rows >= 0
    return LookupResult(
        images=paths,
        phrases=[phrases.take(r[f]).to_pylist() for r, f in zip(rows, found)],
        scores=[[round(float(s), 4) for s in row[f]] for row, f in zip(scores, found)],
    )


def search_batches(index: PhraseIndex, paths: list[str], k: int, device: str,
                   batch_size: int = BATCH) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(positions in `paths`, scores (b, k'), phrase rows (b, k')) per batch of at most `batch_size`
    inputs, in input order. The reading, decoding and embedding are extract's (`jobs.image_job`: the
    local mapper's DataLoader over `images.ImageRows`), so a file gives the vector its store row
    holds; an input whose bytes an earlier input had (same content key) takes that input's result
    without being decoded again. A file that cannot be read or decoded: BadInput naming the first."""
    from phrasefuse.engine import LocalEngine
    from phrasefuse.extract.images import read_item
    from phrasefuse.extract.jobs import image_job
    from phrasefuse.extract.recorded import load_recorded_encoder

    if k < 1:
        raise BadInput(f"-k {k}: must be at least 1")
    if batch_size < 1:
        raise BadInput(f"batch size {batch_size}: must be at least 1")
    for path in paths:  # before loading the model: a wrong path fails fast (checked, not read: nothing held)
        _, reason = read_item(path, read=False)
        if reason is not None:
            raise BadInput(f"{path}: {reason}; pass readable image files")
    encoder = load_recorded_encoder(index.meta, "image", folder=index.path, kind="index", device=device,
                                    fix="install that model where its spec says, or rebuild the index")
    # ids are positions: the same file may be given twice, and each occurrence gets its result
    todo = pa.table({"id": pa.array(np.arange(len(paths)).astype(str)), "image": pa.array(paths, pa.string())})
    # DataLoader workers only pay off past a few batches (predict's rule); their prefetch stays bounded
    workers = 0 if len(paths) < 256 else None
    job = image_job(todo, pa.array([], pa.string()), encoder, index.meta["encoder"].get("spec", ""),
                    batch_size=batch_size, workers=workers, device=device)
    first_of_key: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # content key -> its (scores, rows): k' values
    for batch in LocalEngine().map(job):
        if batch.errors:  # batches come in input order: this batch's first error is the first of all
            pos, reason = min(((int(i), r) for i, r in batch.errors), key=lambda e: e[0])
            raise BadInput(f"{paths[pos]}: {reason}; pass readable image files")
        pos = np.array([int(i) for i in batch.ids], np.int64)
        scores, rows = index.search(batch.emb, k) if len(pos) else (None, None)
        if len(pos):
            first_of_key.update((key, (scores[j], rows[j])) for j, key in enumerate(batch.keys))
        if batch.known:
            again = np.array([int(i) for i, _ in batch.known], np.int64)
            copied = [first_of_key[key] for _, key in batch.known]
            more_scores, more_rows = np.stack([c[0] for c in copied]), np.stack([c[1] for c in copied])
            pos = np.concatenate([pos, again])
            scores = more_scores if scores is None else np.concatenate([scores, more_scores])
            rows = more_rows if rows is None else np.concatenate([rows, more_rows])
        if len(pos):
            order = np.argsort(pos, kind="stable")
            yield pos[order], scores[order], rows[order]
