"""Hostile manifests: image paths outside the manifest's folder are refused unless
--allow-outside-paths; formula-like, very long and unicode texts are stored as text, never run."""

from __future__ import annotations

import csv
import hashlib
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phrasefuse.errors import BadInput
from phrasefuse.extract.jobs import extract_images, extract_texts
from phrasefuse.manifests import read_manifest
from phrasefuse.store import EmbeddingStore
from tests.conftest import run_cli


@pytest.fixture
def layout(fault_dataset, tmp_path):
    """data/manifest.parquet with data/images/in.jpg; outside.jpg next to data/; a symlink out."""
    source = fault_dataset.parent / pq.read_table(fault_dataset)["image"][0].as_py()
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    shutil.copy(source, data / "images" / "in.jpg")
    shutil.copy(fault_dataset.parent / pq.read_table(fault_dataset)["image"][1].as_py(), tmp_path / "outside.jpg")
    (data / "images" / "link-out.jpg").symlink_to(tmp_path / "outside.jpg")
    (data / "images" / "link-in.jpg").symlink_to(data / "images" / "in.jpg")
    return data


def manifest(data, images: list[str]):
    path = data / "manifest.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(images))], "image": images}), path)
    return path


@pytest.mark.parametrize("outside", ["../outside.jpg", "images/../../outside.jpg", "ABSOLUTE", "images/link-out.jpg"])
def test_paths_outside_the_manifest_folder_are_refused_naming_the_row(layout, outside):
    if outside == "ABSOLUTE":
        outside = str(layout.parent / "outside.jpg")
    path = manifest(layout, ["images/in.jpg", "images/link-in.jpg", str(layout / "images" / "in.jpg"), outside])
    with pytest.raises(BadInput, match=f"{path}: row 4: image '{outside}' resolves outside the manifest's folder "
                                       f".*--allow-outside-paths"):
        read_manifest(path, require_image=True)
    assert read_manifest(path, require_image=True, allow_outside_paths=True).table.num_rows == 4
    assert read_manifest(path).table.num_rows == 4  # reading ids and labels (fuse) opens no image


def test_cli_refuses_outside_paths_and_the_flag_allows_them(layout, tiny_clip_spec, tmp_path):
    path = manifest(layout, ["images/in.jpg", "../outside.jpg"])
    proc = run_cli("extract", "images", path, "--out", tmp_path / "img", "--model", tiny_clip_spec, "--workers", "0")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert f"{path}: row 2: image '../outside.jpg' resolves outside" in proc.stderr
    assert not (tmp_path / "img").exists()  # refused before any work
    summary = extract_images(path, tmp_path / "img", model=tiny_clip_spec, workers=0, progress=False,
                             allow_outside_paths=True)
    assert (summary.embedded, summary.failed) == (2, 0)


HOSTILE_TEXTS = {
    "f1": "=cmd|' /C calc'!A0",
    "f2": "=1+1",
    "f3": "2",
    "f4": "@SUM(1,2)",
    "f5": "+1-1",
    "py": "__import__('pathlib').Path('CANARY').touch()",
    "long": "lorem ipsum " * 20_000,
    "unicode": "日本語 🚀 עברית e\u0301 \u200b Ω",
    "007": "ids like 007 stay text",
}


def test_formula_long_and_unicode_texts_are_stored_as_text(tmp_path, tiny_clip_spec, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "m.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "title"])
        writer.writerows(HOSTILE_TEXTS.items())
    summary = extract_texts(path, "title", tmp_path / "title", model=tiny_clip_spec, progress=False)
    assert (summary.embedded, summary.failed) == (len(HOSTILE_TEXTS), 0)
    keys = dict(zip(*EmbeddingStore(tmp_path / "title").ids_and_keys().to_pydict().values()))
    # The key of each row is the hash of its text exactly as written: nothing evaluated or converted.
    assert keys == {i: hashlib.sha256(t.strip().encode()).hexdigest() for i, t in HOSTILE_TEXTS.items()}
    assert not (tmp_path / "CANARY").exists()
