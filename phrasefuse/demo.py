"""`phrasefuse demo`: a dataset generated here, run through the pipeline with the built-in encoders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def run_demo(work: str | os.PathLike, n: int = 200) -> Iterator[str]:
    from phrasefuse.extract.jobs import extract_images, extract_texts
    from phrasefuse.synthetic import generate_images

    work = Path(work)
    manifest = generate_images(work / "data", n)
    yield f"dataset: {n} generated images, manifest {manifest}"
    summary = extract_images(manifest, work / "stores" / "img")
    yield summary.line()
    summary = extract_texts(manifest, "title", work / "stores" / "title")
    yield summary.line()
    yield f"stores: {work / 'stores'} (inspect them with: phrasefuse inspect {work / 'stores' / 'img'})"
