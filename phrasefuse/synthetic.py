"""Generated datasets (Pillow drawing, seeded, deterministic): for the demo, tests and benchmarks.

Nothing is downloaded: each class is a shape drawn in a colour on a noisy
background, saved as JPEG; metadata text (titles, tags) is web-like: noisy and
often missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "cross", "ring", "bar")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def draw(shape: str, colour: tuple[int, int, int], size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    w, h = size
    noise = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8) + np.uint8(rng.integers(120, 190))
    image = Image.fromarray(noise, "RGB")
    d = ImageDraw.Draw(image)
    s = int(min(w, h) * rng.uniform(0.25, 0.4))
    cx, cy = int(w * rng.uniform(0.35, 0.65)), int(h * rng.uniform(0.35, 0.65))
    box = (cx - s, cy - s, cx + s, cy + s)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - s), (cx - s, cy + s), (cx + s, cy + s)], fill=colour)
    elif shape == "cross":
        t = s // 3
        d.rectangle((cx - s, cy - t, cx + s, cy + t), fill=colour)
        d.rectangle((cx - t, cy - s, cx + t, cy + s), fill=colour)
    elif shape == "ring":
        d.ellipse(box, outline=colour, width=max(2, s // 4))
    elif shape == "bar":
        d.rectangle((cx - s, cy - s // 4, cx + s, cy + s // 4), fill=colour)
    return image


def generate_images(folder: str | os.PathLike, n: int, seed: int = 0, size: tuple[int, int] = (320, 240),
                    classes: tuple[str, ...] = CLASSES) -> Path:
    """Write n JPEGs and `manifest.parquet` (id, image, title, tags, label) into folder; return the manifest."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = {"id": [], "image": [], "title": [], "tags": [], "label": []}
    colour_names = list(COLOURS)
    for i in range(n):
        label = classes[i % len(classes)]
        colour = colour_names[int(rng.integers(len(colour_names)))]
        path = folder / "images" / f"{i:06d}.jpg"
        if not path.exists():
            draw(label, COLOURS[colour], size, rng).save(path, quality=90)
        else:
            rng.integers(0, 60, size=(size[1], size[0], 3))  # keep the stream identical on re-generation
        rows["id"].append(f"img-{i:06d}")
        rows["image"].append(f"images/{path.name}")
        # Web-like metadata: a third have no title, some titles are wrong.
        r = rng.random()
        rows["title"].append(None if r < 0.33 else f"a {colour} {label}" if r < 0.8 else f"photo {i}")
        rows["tags"].append([colour] + ([label] if rng.random() < 0.5 else []))
        rows["label"].append(label)
    manifest = folder / "manifest.parquet"
    pq.write_table(pa.table(rows), manifest)
    return manifest
