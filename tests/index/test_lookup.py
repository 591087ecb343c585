"""`index lookup` streams its inputs (b04): read, decoded, embedded and searched a batch at a time,
so its memory is bounded by the batch size, not by how many images it is given."""

from __future__ import annotations

import shutil

import numpy as np

from phrasefuse.index.folder import PhraseIndex
from tests.index.conftest import HELD_OUT, planted_phrase


def _held_out(shapes_table, shapes_dataset) -> dict[str, str]:
    """One held-out image (in no pair) per class: label -> path."""
    images, labels = shapes_table["image"].to_pylist(), shapes_table["label"].to_pylist()
    return {labels[i]: str(shapes_dataset.parent / images[i]) for i in range(len(images) - HELD_OUT, len(images))}


def test_lookup_reads_each_input_only_when_its_batch_comes(shapes_index, shapes_table, shapes_dataset, tmp_path):
    from phrasefuse.index.lookup import search_batches

    held = _held_out(shapes_table, shapes_dataset)
    first, other = sorted(held)[:2]
    paths = [str(tmp_path / f"{i}.jpg") for i in range(8)]
    for i, path in enumerate(paths):  # distinct bytes each (a trailing byte): no input is a copy of another
        with open(path, "wb") as f:
            f.write(open(held[first], "rb").read() + bytes([i]))
    batches = search_batches(PhraseIndex(shapes_index), paths, 2, "cpu", batch_size=3)
    pos, _, rows = next(batches)
    assert pos.tolist() == [0, 1, 2]
    # The inputs after the first batch are replaced now: a lookup that had read (or decoded) every
    # input up front, as it did, would still answer `first` for them.
    for path in paths[3:]:
        shutil.copy(held[other], path)
    rest = list(batches)
    assert [b[0].tolist() for b in rest] == [[3, 4, 5], [6, 7]]  # at most 3 inputs in memory at a time
    phrases = PhraseIndex(shapes_index).phrases
    assert phrases.take(rows[:, 0]).to_pylist() == [planted_phrase(first)] * 3
    assert all(p == planted_phrase(other) for _, _, r in rest for p in phrases.take(r[:, 0]).to_pylist())


def test_lookup_in_batches_answers_as_in_one(shapes_index, shapes_table, shapes_dataset):
    from phrasefuse.index.lookup import lookup

    paths = list(_held_out(shapes_table, shapes_dataset).values())
    paths = paths + paths[:2]  # a file given twice gets its result twice, in its places
    whole = lookup(shapes_index, paths, k=4, device="cpu", batch_size=64)
    small = lookup(shapes_index, paths, k=4, device="cpu", batch_size=2)
    assert whole.images == small.images == paths
    assert whole.phrases == small.phrases and whole.phrases[-2:] == whole.phrases[:2]
    np.testing.assert_allclose(whole.scores, small.scores, atol=2e-4)
