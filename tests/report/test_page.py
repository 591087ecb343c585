"""The report's gallery thumbnails (b17) and its plots' text (b03), without a run."""

from __future__ import annotations

import numpy as np
import pytest

from phrasefuse.extract.images import DEFAULT_LIMITS
from phrasefuse.manifests import Source, read_manifest
from phrasefuse.report import page, plots
from tests import inputs_data as data


@pytest.mark.parametrize("kind", ["tar", "parquet-binary", "parquet-struct", "folder"])
def test_gallery_thumbnails_read_images_as_extract_does(tmp_path, kind):
    """b17: a tar member at its offset, a Parquet bytes cell (binary or {bytes, path}), an image file: each
    row's thumbnail is its image (not 'image unreadable' for the shard or the Parquet file); a row with
    no image or a broken one is unreadable, and only that one."""
    broken = set()
    if kind == "tar":
        source = str(data.tar_shards(tmp_path / "s", shards=2, per_shard=3, corrupt="000010001")) + "/*.tar"
        broken = {"000010001"}
    elif kind == "parquet-binary":
        source = Source(str(data.bytes_parquet(tmp_path / "b.parquet", n=6)), id_col="key", image_col="jpg")
    elif kind == "parquet-struct":
        source = str(data.struct_parquet(tmp_path / "s.parquet", n=5))
        broken = {"s4"}  # its struct has no bytes
    else:
        source = str(data.image_folder(tmp_path / "f", per_class=2))
    manifest = read_manifest(source)
    rows = manifest.table.take(np.arange(manifest.table.num_rows)[::-1].copy())  # any subset, any order
    thumbs = page._thumbnails(manifest, rows, DEFAULT_LIMITS)
    assert set(thumbs) == set(manifest.table["id"].to_pylist())
    for ident, html in thumbs.items():
        assert ("image unreadable" in html) == (ident in broken), ident
        assert ("data:image/jpeg;base64," in html) == (ident not in broken), ident


@pytest.mark.parametrize("label", ["$10_to_$20", "$5 - $10", "50%_&_$x^2$", r"a\$b$"])
def test_plots_draw_dollar_labels_as_written(tmp_path, label):
    """b03: a label with two '$' is text, not mathtext (which failed with an empty ValueError, or drew
    a formula): every plot that shows labels or feature names writes its PNG."""
    vocab = [label, "plain", "under_$10"]
    matrix = plots.confusion_matrix(np.array([0, 1, 2, 0]), np.array([0, 1, 1, 2]), 3)
    plots.confusion(matrix, vocab, tmp_path / "c.png", f"{label} head")
    rows = [{"features": "image (image only)", "top1": {"mean": 0.5, "std": 0.1}},
            {"features": f"image + {label}", "top1": {"mean": 0.6, "std": 0.1}}]
    plots.ablation_bars({"columns": ["top1"], "rows": rows, "regime": "full", "seeds": 1}, tmp_path / "a.png")
    plots.few_shot_curves([{"shots": k, "columns": ["top1"], "rows": rows} for k in (1, 2)], tmp_path / "f.png")
    for name in ("c.png", "a.png", "f.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_confusion_matrix_of_no_rows():
    """b19: no test row (empty arrays are float64 in NumPy): an all-zero matrix, not a TypeError."""
    assert plots.confusion_matrix(np.array([]), np.array([]), 2).tolist() == [[0, 0], [0, 0]]
