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


def _rows(values: dict[str, float]) -> list[dict]:
    return [{"features": f, "top1": {"mean": v, "std": 0.02}} for f, v in values.items()]


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_few_shot_reference_line_is_drawn_last_dashed_and_in_the_legend(tmp_path):
    """r25: a fused line equal to image-only's (text not kept) hid the image-only line drawn first: the
    reference is drawn last, dashed, on top, with a legend entry; the legend says what the bands are;
    the title names the split and the head."""
    same = {"image (image only)": 0.6, "image + phrases": 0.6, "image + phrases + label prior": 0.7}
    tables = [{"shots": k, "columns": ["top1"], "rows": _rows(same)} for k in (1, 2, 5)]
    fig = plots.few_shot_curves(tables, tmp_path / "f.png", "linear")
    ax = fig.axes[0]
    lines = ax.get_lines()
    reference = lines[-1]
    assert reference.get_label() == "image (image only): reference" and reference.get_linestyle() == "--"
    assert reference.get_zorder() > max(line.get_zorder() for line in lines[:-1])
    legend = ax.get_legend()
    assert "image (image only): reference" in [t.get_text() for t in legend.get_texts()]
    assert "band: ± 1 std over seeds" in legend.get_title().get_text()
    assert ax.get_title() == "Few-shot: linear head, test split"
    # the log axis's minor labels are mathtext, printed raw with parse_math off: there are none
    assert not [t.get_text() for t in ax.xaxis.get_minorticklabels() if t.get_text()]
    # outside the plotting area: it covers no line
    assert not _overlaps(legend.get_window_extent(), ax.get_window_extent())


def test_ablation_legend_is_outside_the_bars(tmp_path):
    """r25: the bar chart's legend covered bars: it sits outside the axes, overlapping no bar, with the
    image-only reference line dashed in it, and the title names the split and the head."""
    values = {"image (image only)": 0.9, "image + title": 0.95, "image + phrases": 0.2, "image + tags": 0.99}
    fig = plots.ablation_bars({"columns": ["top1"], "rows": _rows(values), "regime": "full", "seeds": 3},
                              tmp_path / "a.png", "linear")
    ax = fig.axes[0]
    legend = ax.get_legend()
    box = legend.get_window_extent()
    assert ax.patches and not any(_overlaps(box, bar.get_window_extent()) for bar in ax.patches)
    assert legend.get_lines()[0].get_linestyle() == "--"
    assert ax.get_title().startswith("Ablation: linear head, test split")


def test_confusion_matrix_is_normalised_per_class_with_a_colour_bar(tmp_path):
    """r25: each row is its true class's shares (a class of 1 row and one of 9 on the same 0-1 scale),
    drawn with a colour bar; the title given names head and split."""
    true = np.array([0] * 9 + [1])
    pred = np.array([0] * 6 + [1] * 3 + [1])
    matrix = plots.confusion_matrix(true, pred, 2)
    fig = plots.confusion(matrix, ["many", "one"], tmp_path / "c.png", "h head, test split (10 rows)")
    ax, bar_ax = fig.axes
    shown = ax.get_images()[0].get_array()
    assert np.allclose(shown, [[6 / 9, 3 / 9], [0, 1]]) and np.allclose(shown.sum(axis=1), 1)
    assert bar_ax.get_ylabel() == "share of the true class's rows"
    assert ax.get_title() == "h head, test split (10 rows)"
    assert "67%\n(6)" in [t.get_text() for t in ax.texts]


def test_glossary_is_written_as_the_readme_writes_it():
    """r25: the report's words ("text trust", "label prior", "prototype", "pseudo-shots", "second look")
    in README's plain wording, each one found there as written (markdown marks aside)."""
    import re
    from pathlib import Path

    readme = Path(__file__).resolve().parents[2].joinpath("README.md").read_text(encoding="utf-8")
    flat = " ".join(re.sub(r"[*`]", "", readme).split())
    assert set(page.GLOSSARY) == {"text trust", "label prior", "prototype", "pseudo-shots", "second look"}
    for word, text in page.GLOSSARY.items():
        assert f"- {word}: {text}" in flat, word
    assert "<h2>Words used here</h2>" in page._glossary_html()


def test_one_shot_text_kept_note_says_why_not_scored_by_nothing():
    """r25: ablation.md's 1-shot note said "as scored by nothing": it now says why text is never kept."""
    from phrasefuse.fuse.ablate import render_markdown

    rows = _rows({"image (image only)": 0.5})
    tables = [{"regime": f"{k}-shot", "shots": k, "seeds": 1, "columns": ["top1"], "rows": rows, "note": "n"}
              for k in (1, 2)]
    text = render_markdown({"head": "linear", "manifest": "m.csv", "test_rows": 4, "tables": tables})
    assert "scored by nothing" not in text
    assert "with 1 shot per class no row is left to score text on, so text is never kept" in text
    assert "as scored by cross-validation within the shots" in text  # 2 shots
