"""`phrasefuse demo`: a dataset generated here (phrasefuse.synthetic), run through the
pipeline config phrasefuse/run/demo.toml with the built-in offline encoders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from phrasefuse.errors import BadInput
from phrasefuse.folders import make_folder, write_atomic

DEFAULT_N = 1000
QUERY_IMAGES = 800
MIN_N = 500  # 45% train: 20+ per class for the 20-shot table


def demo_config_text() -> str:
    return resources.files("phrasefuse.run").joinpath("demo.toml").read_text(encoding="utf-8")


@dataclass
class DemoData:
    """The generated dataset, announced before the run's stages."""

    images: int
    classes: int
    query_images: int
    folder: Path

    def as_dict(self) -> dict:
        return {"images": self.images, "classes": self.classes, "query_images": self.query_images,
                "folder": str(self.folder)}

    def text(self) -> str:
        return (f"demo data: {self.images} labelled images of {self.classes} classes (five look-alike pairs), "
                f"{self.query_images} query-corpus images, pairs and label descriptions -> {self.folder}")


def run_demo(work: str | os.PathLike, n: int = DEFAULT_N, progress: bool | None = None) -> Iterator:
    """Generate the data (once; it is deterministic), write WORK/demo.toml, run it. Yields the
    data's `DemoData`, then each stage's result."""
    from phrasefuse.run.pipeline import run_config
    from phrasefuse.synthetic import DEMO_CLASSES, generate_demo

    if n < MIN_N:
        raise BadInput(f"--n {n}: the demo needs at least {MIN_N} images (its 20-shot table needs 20 training "
                       f"images per class)")
    from phrasefuse.folders import mark_run_folder
    from phrasefuse.run.config import work_problem

    work = Path(work)
    problem = work_problem(work, "choose a new or empty --work folder")  # the demo's config says work = "."
    if problem:
        raise BadInput(f"--work {problem}")
    make_folder(work, "--work")
    mark_run_folder(work)  # first: the folder is a run's from now on (data and config follow)
    paths = generate_demo(work / "data", n=n, n_query=QUERY_IMAGES)
    yield DemoData(n, len(DEMO_CLASSES), QUERY_IMAGES, paths["manifest"].parent)
    config = work / "demo.toml"
    write_atomic(config, lambda tmp: Path(tmp).write_text(demo_config_text(), encoding="utf-8"))
    yield from run_config(config, progress=progress)
