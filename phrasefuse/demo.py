"""`phrasefuse demo`: a dataset generated here (phrasefuse.synthetic), run through the
pipeline config phrasefuse/run/demo.toml with the built-in offline encoders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from phrasefuse.errors import BadInput
from phrasefuse.folders import make_folder, write_atomic

DEFAULT_N = 1000
QUERY_IMAGES = 800
MIN_N = 500  # 45% train: 20+ per class for the 20-shot table


def demo_config_text() -> str:
    return resources.files("phrasefuse.run").joinpath("demo.toml").read_text(encoding="utf-8")


def run_demo(work: str | os.PathLike, n: int = DEFAULT_N, progress: bool | None = None) -> Iterator:
    """Generate the data (once; it is deterministic), write WORK/demo.toml, run it. Yields a
    line about the data, then each stage's result."""
    from phrasefuse.run.pipeline import run_config
    from phrasefuse.synthetic import DEMO_CLASSES, generate_demo

    if n < MIN_N:
        raise BadInput(f"--n {n}: the demo needs at least {MIN_N} images (its 20-shot table needs 20 training "
                       f"images per class)")
    work = Path(work)
    make_folder(work, "--work")
    paths = generate_demo(work / "data", n=n, n_query=QUERY_IMAGES)
    yield (f"demo data: {n} labelled images of {len(DEMO_CLASSES)} classes (five look-alike pairs), "
           f"{QUERY_IMAGES} query-corpus images, pairs and label descriptions -> {paths['manifest'].parent}")
    config = work / "demo.toml"
    write_atomic(config, lambda tmp: Path(tmp).write_text(demo_config_text(), encoding="utf-8"))
    yield from run_config(config, progress=progress)
