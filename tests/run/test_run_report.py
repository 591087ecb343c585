"""`run` finishes what it trained: the report stage of a run whose labels are in another column (b16),
whose test split is empty (b19), whose labels hold '$' (b03), whose config sits in its own image
folder (b20). Tiny generated images and the tiny random CLIP: a few seconds a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import invoke_cli

COLOURS = [(200, 30, 30), (30, 30, 200), (30, 200, 30)]


def square(path: Path, c: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.clip(np.array(COLOURS[c]) + np.random.default_rng(seed).normal(0, 20, (32, 32, 3)), 0, 255)
    Image.fromarray(a.astype(np.uint8)).save(path)


def manifest(folder: Path, labels: list[str], splits: list[str], n: int = 30, label_header: str = "label") -> None:
    lines = [f"id,image,{label_header},split"]
    for i in range(n):
        c = i % len(labels)
        square(folder / "img" / f"{i}.png", c, i)
        lines.append(f"r{i},img/{i}.png,{labels[c]},{splits[i % len(splits)]}")
    (folder / "m.csv").write_text("\n".join(lines) + "\n")


def config(folder: Path, spec: str, data: str = 'manifest = "m.csv"\n', name: str = "run.toml") -> Path:
    path = folder / name
    path.write_text(f'work = "work"\n[data]\n{data}[encoders]\nimage = "{spec}"\nworkers = 0\n'
                    '[[heads]]\nname = "h"\nkind = "linear"\nfeatures = ["image"]\n')
    return path


def run_ok(path: Path) -> dict[str, dict]:
    proc = invoke_cli("run", path, "--json")
    assert proc.returncode == 0, proc.stderr
    return {s["stage"]: s for s in json.loads(proc.stdout)["stages"]}


def report(folder: Path) -> str:
    return (folder / "work" / "report.html").read_text(encoding="utf-8")


def test_label_col_run_writes_the_report(tmp_path, tiny_clip_spec):
    """b16: [data] label_col names the labels' column: the report reads it as the heads did."""
    manifest(tmp_path, ["red", "blue"], ["train", "train", "train", "val", "test"], label_header="category")
    stages = run_ok(config(tmp_path, tiny_clip_spec, 'manifest = "m.csv"\nlabel_col = "category"\n'))
    assert stages["report"]["status"] == "ran"
    page = report(tmp_path)
    assert "Confusion matrix" in page and (tmp_path / "work" / "plots" / "confusion.png").is_file()


def test_empty_test_split_run_writes_a_report_that_says_so(tmp_path, tiny_clip_spec):
    """b19: no row with split = test: the heads train, the report says there is nothing to test on."""
    manifest(tmp_path, ["red", "blue"], ["train", "train", "train", "val"])
    run_ok(config(tmp_path, tiny_clip_spec))
    page = report(tmp_path)
    assert "no test rows" in page and "Confusion matrix" not in page


def test_dollar_labels_are_drawn_as_written(tmp_path, tiny_clip_spec):
    """b03: labels with two '$' (mathtext) in the confusion matrix: the run writes its report."""
    manifest(tmp_path, ["$10_to_$20", "under_$10", "$5 - $10"], ["train", "train", "train", "val", "test"])
    run_ok(config(tmp_path, tiny_clip_spec))
    assert "Confusion matrix" in report(tmp_path)


def test_config_inside_its_image_folder_skips_its_own_work_folder(tmp_path, tiny_clip_spec):
    """b20: manifest = "." and work = "work" inside it: the second run neither embeds its own plots nor
    loses the folder's labels, and (same images, same settings) skips every stage."""
    from phrasefuse.store import EmbeddingStore

    photos = tmp_path / "photos"
    for s, n in (("train", 6), ("val", 2), ("test", 2)):
        for c, name in enumerate(("cat", "dog")):
            for i in range(n):
                square(photos / s / name / f"{i}.png", c, 10 * c + i)
    path = config(photos, tiny_clip_spec, 'manifest = "."\n')
    run_ok(path)
    assert (photos / "work" / "plots" / "confusion.png").is_file()
    second = run_ok(path)
    assert {s["status"] for s in second.values()} == {"skipped"}, second
    ids = EmbeddingStore(photos / "work" / "stores" / "image").ids_and_keys()["id"].to_pylist()
    assert len(ids) == 20 and not any(i.startswith("work/") for i in ids)


def _correct(predictions: Path, ids: list[str], truth: dict[str, str]) -> np.ndarray:
    import pyarrow.parquet as pq

    table = pq.read_table(predictions, columns=["id", "label"]).to_pylist()
    by_id = {r["id"]: r["label"] for r in table}
    return np.array([by_id[i] == truth[i] for i in ids], dtype=bool)


def test_gallery_statement_is_counted_from_the_prediction_files(tmp_path, tiny_clip_spec):
    """r25: the gallery's "text fixed F and broke B" is the saved head's test predictions against
    image-only's, read back from WORK/predictions/*.parquet, and it names the head it is about."""
    import re

    import pyarrow.csv as pacsv

    manifest(tmp_path, ["red", "blue", "green"], ["train", "train", "train", "val", "test"], n=45)
    for i in range(0, 45, 2):  # half the images in the next class's colour: the heads have something to get wrong
        square(tmp_path / "img" / f"{i}.png", (i + 1) % 3, 100 + i)
    path = config(tmp_path, tiny_clip_spec)
    # a second head that predicts differently from the image-only baseline (2 shots per class, an mlp),
    # and the baseline named, so that the counts are not all zero
    path.write_text(path.read_text().replace('kind = "linear"', 'kind = "mlp"\nshots = 2')
                    + '[[heads]]\nname = "image-only"\nkind = "linear"\nfeatures = ["image"]\n')
    run_ok(path)
    rows = pacsv.read_csv(tmp_path / "m.csv").to_pylist()
    truth = {r["id"]: r["label"] for r in rows}
    test_ids = [r["id"] for r in rows if r["split"] == "test"]
    preds = tmp_path / "work" / "predictions"
    saved = _correct(preds / "h.parquet", test_ids, truth)
    base = _correct(preds / "image-only.parquet", test_ids, truth)
    fixed, broke = int((saved & ~base).sum()), int((base & ~saved).sum())
    assert fixed + broke > 0  # the two heads differ: the sentence is checked on numbers that are not all 0
    page = report(tmp_path)
    said = re.findall(r"On the test split \((\d+) rows\), the saved (\S+) head against the image-only head: "
                      r"text fixed (\d+) and broke (\d+)", page)
    assert said == [(str(len(test_ids)), "h", str(fixed), str(broke))], said
    # the confusion matrix names its head and split, never "best" (a fused head can be below image-only)
    assert "<h2>Confusion matrix: h head, test split</h2>" in page and "best head" not in page


def test_a_kept_label_prior_is_never_the_image_only_fallback(tmp_path, tiny_clip_spec):
    """r25: `selection.saved` = image-only names the network kept; a label prior kept on top of it
    (weight 13.9) changes predictions, so the report says what the head is made of instead."""
    from phrasefuse.report import page

    manifest(tmp_path, ["red", "blue"], ["train", "train", "train", "val", "test"])
    run_ok(config(tmp_path, tiny_clip_spec))
    meta = json.loads((tmp_path / "work" / "heads" / "h" / "meta.json").read_text())
    meta["selection"]["saved"] = "image-only"
    assert page.is_image_only_fallback({**meta, "prior": None})
    with_prior = {**meta, "prior": {"store": {"name": "phrases", "path": "p"}, "weight": 13.9}}
    assert not page.is_image_only_fallback(with_prior)
    said = page._text_effect("phrases-prior", with_prior, 6, 0, 1, 0, 5)
    assert "fallback" not in said and "label prior phrases, weight 13.9" in said
    assert "the saved phrases-prior head against the image-only head: text fixed 0 and broke 1" in said
