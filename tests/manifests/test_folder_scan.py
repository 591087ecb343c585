"""A folder of images never scans the folders phrasefuse made inside it (b20): a run's work folder
(its plots are PNGs), a store, an index, a head. A user's own folder with a meta.json is data."""

from __future__ import annotations

import json

from phrasefuse.manifests import read_manifest
from phrasefuse.run.pipeline import files_fingerprint
from tests import inputs_data as data


def test_folder_scan_skips_phrasefuse_folders_and_keeps_labels(tmp_path):
    root = data.image_folder(tmp_path / "photos", splits=("train", "test"), per_class=2)
    before = read_manifest(root).table
    fingerprint = files_fingerprint(root)
    work = root / "work"
    (work / "plots").mkdir(parents=True)
    (work / "run-state.json").write_text('{"format": "phrasefuse-run-state", "stages": {}}')
    (work / "plots" / "confusion.png").write_bytes(data.jpeg(1))
    (root / "train" / "heads").mkdir()
    (root / "train" / "heads" / "meta.json").write_text(json.dumps({"format": "phrasefuse-head"}))
    (root / "train" / "heads" / "x.jpg").write_bytes(data.jpeg(2))
    after = read_manifest(root).table
    assert after["id"].to_pylist() == before["id"].to_pylist()
    assert after["label"].to_pylist() == before["label"].to_pylist()  # every image still at SPLIT/CLASS/x
    assert files_fingerprint(root) == fingerprint  # a run's output does not re-run the run that wrote it

    (root / "train" / "heads" / "meta.json").write_text(json.dumps({"format": "someone-else's"}))
    assert "train/heads/x.jpg" in read_manifest(root).table["id"].to_pylist()  # not ours: data
