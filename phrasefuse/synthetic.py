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


# ---------------------------------------------------------------- the demo dataset
#
# Ten classes in five visually ambiguous twin pairs (the milk can that looks like a salt
# shaker): twins share shape and colour and differ only by a small cue that is often missing.
# Web-like metadata sometimes names the class (and sometimes the wrong twin), often is absent.
# A separate query corpus (other images, query phrases) feeds the prototype index.

DEMO_CLASSES = {
    # label: (shape, colour, cue, query phrases, label description)
    "milk can": ("can", (235, 235, 228), "lid", ["milk can", "metal milk churn", "dairy can"],
                 "A milk can is a tall metal container with a wide lid used to carry milk from the farm."),
    "salt shaker": ("can", (235, 235, 228), "dots", ["salt shaker", "salt cellar", "table salt dispenser"],
                    "A salt shaker is a small container with holes in its cap for sprinkling salt on food."),
    "tennis ball": ("ball", (200, 225, 60), "seam", ["tennis ball", "fuzzy tennis ball", "ball for tennis"],
                    "A tennis ball is a fuzzy yellow-green ball with a curved white seam, used in tennis."),
    "lime": ("ball", (200, 225, 60), "stem", ["lime", "green lime fruit", "citrus lime"],
             "A lime is a small round green citrus fruit with a sour taste."),
    "traffic cone": ("cone", (240, 120, 30), "stripes", ["traffic cone", "road cone", "safety cone"],
                     "A traffic cone is an orange cone placed on roads to redirect traffic."),
    "party hat": ("cone", (240, 120, 30), "pompom", ["party hat", "birthday hat", "cone party hat"],
                  "A party hat is a cone-shaped paper hat worn at birthday parties."),
    "basketball": ("ball", (215, 100, 35), "lines", ["basketball", "basket ball", "ball for basketball"],
                   "A basketball is an orange ball with black lines, bounced and thrown in the game of basketball."),
    "orange": ("ball", (215, 100, 35), "leaf", ["orange", "orange fruit", "fresh orange"],
               "An orange is a round citrus fruit with a bright orange peel."),
    "chess board": ("checks", (30, 30, 30), "none", ["chess board", "chessboard", "board for chess"],
                    "A chess board is a square board of 64 black and white squares on which chess is played."),
    "checkered flag": ("checks", (30, 30, 30), "pole", ["checkered flag", "racing flag", "finish line flag"],
                       "A checkered flag is a black and white flag waved at the finish of a motor race."),
}
GENERIC_PHRASES = ["white object", "round thing", "orange thing", "black and white pattern", "photo"]
TITLE_TEMPLATES = ["my {x}", "{x}", "a {x} on the table", "old {x}", "{x} for sale", "look at this {x}"]
NOISE_TITLES = ["IMG_{i:04d}", "untitled", "photo {i}", "DSC{i:05d}", "new upload"]


def _twin(label: str) -> str:
    labels = list(DEMO_CLASSES)
    i = labels.index(label)
    return labels[i + 1] if i % 2 == 0 else labels[i - 1]


def draw_object(label: str, rng: np.random.Generator, size: int = 160, cue_prob: float = 0.5) -> Image.Image:
    """One photo-like drawing of `label`: clutter, jittered colour/position/scale, a cue that may be absent."""
    shape, colour, cue, _, _ = DEMO_CLASSES[label]
    bg = rng.integers(60, 200, size=3)
    pixels = np.clip(bg + rng.normal(0, 18, size=(size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    d = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):  # clutter
        x, y = rng.integers(0, size, 2)
        d.line((int(x), int(y), int(x + rng.integers(-40, 40)), int(y + rng.integers(-40, 40))),
               fill=tuple(int(c) for c in rng.integers(0, 255, 3)), width=int(rng.integers(1, 4)))
    col = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in colour)
    s = int(size * rng.uniform(0.22, 0.32))
    cx, cy = (int(size * v) for v in rng.uniform(0.38, 0.62, 2))
    if shape == "can":
        d.rounded_rectangle((cx - s * 0.6, cy - s, cx + s * 0.6, cy + s), radius=s // 4, fill=col, outline=(90, 90, 90))
    elif shape == "ball":
        d.ellipse((cx - s, cy - s, cx + s, cy + s), fill=col)
    elif shape == "cone":
        d.polygon([(cx, cy - s), (cx - s * 0.7, cy + s), (cx + s * 0.7, cy + s)], fill=col)
    elif shape == "checks":
        cell = max(2, s // 3)
        for i in range(-3, 3):
            for j in range(-3, 3):
                fill = col if (i + j) % 2 else (235, 235, 235)
                d.rectangle((cx + i * cell, cy + j * cell, cx + (i + 1) * cell, cy + (j + 1) * cell), fill=fill)
    if rng.random() < cue_prob:
        t = max(2, s // 6)
        if cue == "lid":
            d.rectangle((cx - s * 0.75, cy - s - t, cx + s * 0.75, cy - s + t), fill=(150, 150, 150))
        elif cue == "dots":
            for k in (-1, 0, 1):
                d.ellipse((cx + k * 2 * t - 2, cy - s + t - 2, cx + k * 2 * t + 2, cy - s + t + 2), fill=(40, 40, 40))
        elif cue == "seam":
            d.arc((cx - s, cy - s // 2, cx + s, cy + s + s // 2), 200, 340, fill=(250, 250, 250), width=max(2, t // 2))
        elif cue == "stem":
            d.ellipse((cx - t, cy - s - t, cx + t, cy - s + t), fill=(60, 90, 30))
        elif cue == "stripes":
            d.rectangle((cx - s * 0.45, cy, cx + s * 0.45, cy + t), fill=(250, 250, 250))
        elif cue == "pompom":
            d.ellipse((cx - t * 1.5, cy - s - t * 2, cx + t * 1.5, cy - s + t), fill=(250, 60, 200))
        elif cue == "lines":
            d.line((cx - s, cy, cx + s, cy), fill=(20, 20, 20), width=max(2, t // 2))
            d.line((cx, cy - s, cx, cy + s), fill=(20, 20, 20), width=max(2, t // 2))
        elif cue == "leaf":
            d.ellipse((cx, cy - s - t, cx + 3 * t, cy - s + t), fill=(40, 140, 40))
        elif cue == "pole":
            d.rectangle((cx - 3 * (s // 3) - t, cy - 3 * (s // 3), cx - 3 * (s // 3), cy + 2 * s), fill=(120, 80, 40))
    return image.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR, fillcolor=tuple(int(c) for c in bg))


def _demo_split(n: int, rng: np.random.Generator) -> list[str]:
    """DEMO_SPLIT within each class (row i has class i mod the number of classes)."""
    names = list(DEMO_SPLIT)
    bounds = np.cumsum([DEMO_SPLIT[k] for k in names])
    fraction = np.empty(n)
    n_classes = len(DEMO_CLASSES)
    for c in range(n_classes):
        rows = np.arange(c, n, n_classes)
        fraction[rows] = (rng.permutation(len(rows)) + 0.5) / len(rows)
    return [names[j] for j in np.searchsorted(bounds, fraction).clip(0, len(names) - 1)]


def _metadata(label: str, i: int, rng: np.random.Generator) -> tuple[str | None, str | None, list[str]]:
    """Web-like title, description and tags: often missing, sometimes wrong."""
    named = label if rng.random() < 0.9 else _twin(label)  # a tenth of the named ones name the twin
    r = rng.random()
    title = None if r < 0.4 else (rng.choice(TITLE_TEMPLATES).format(x=named) if r < 0.85
                                  else rng.choice(NOISE_TITLES).format(i=i))
    description = None
    if rng.random() < 0.4:
        description = DEMO_CLASSES[named][4].split(" is ")[1].rstrip(".") if rng.random() < 0.7 else "picture from my phone"
    shape, _, _, _, _ = DEMO_CLASSES[label]
    tags = [shape] + ([named.split()[0]] if rng.random() < 0.4 else []) + (["photo"] if rng.random() < 0.5 else [])
    return title, description, tags


DEMO_SPLIT = {"train": 0.45, "val": 0.15, "test": 0.40}  # a large test split: the demo's gains are a few points


def generate_demo(folder: str | os.PathLike, n: int = 1000, n_query: int = 800, seed: int = 0) -> dict[str, Path]:
    """The demo's data: labelled images with noisy metadata and a train/val/test split, a
    query corpus with its pairs table, and label descriptions. Returns the paths of the
    tables it wrote."""
    folder = Path(folder)
    labels = list(DEMO_CLASSES)
    rng = np.random.default_rng(seed)
    out = {}
    for name, count, prefix in (("manifest", n, "img"), ("query_manifest", n_query, "q")):
        (folder / prefix).mkdir(parents=True, exist_ok=True)
        rows: dict[str, list] = {"id": [], "image": [], "label": []}
        meta: dict[str, list] = {"title": [], "description": [], "tags": []}
        pairs: dict[str, list] = {"query": [], "image_id": [], "weight": []}
        for i in range(count):
            label = labels[i % len(labels)]
            ident, path = f"{prefix}-{i:05d}", folder / prefix / f"{i:05d}.jpg"
            image = draw_object(label, rng)
            if not path.exists():
                image.save(path, quality=88)
            rows["id"].append(ident)
            rows["image"].append(f"{prefix}/{path.name}")
            rows["label"].append(label)
            if prefix == "img":
                for key, value in zip(meta, _metadata(label, i, rng)):
                    meta[key].append(value)
            else:  # query corpus: 1-3 queries per image, some generic, a few about the twin (noise)
                phrases = list(rng.choice(DEMO_CLASSES[label][3], size=int(rng.integers(1, 3)), replace=False))
                if rng.random() < 0.3:
                    phrases.append(str(rng.choice(GENERIC_PHRASES)))
                if rng.random() < 0.1:
                    phrases.append(str(rng.choice(DEMO_CLASSES[_twin(label)][3])))
                for p in phrases:
                    pairs["query"].append(p)
                    pairs["image_id"].append(ident)
                    pairs["weight"].append(float(rng.integers(1, 20)))  # click counts
        if prefix == "img":
            table = pa.table({**rows, **meta, "split": _demo_split(count, rng)})
        else:
            table = pa.table({"id": rows["id"], "image": rows["image"]})
        out[name] = folder / f"{name}.parquet"
        pq.write_table(table, out[name])
        if prefix == "q":
            out["pairs"] = folder / "pairs.parquet"
            pq.write_table(pa.table(pairs), out["pairs"])
    out["label_descriptions"] = folder / "label_descriptions.parquet"
    pq.write_table(pa.table({"label": labels, "description": [DEMO_CLASSES[l][4] for l in labels]}),
                   out["label_descriptions"])
    return out
