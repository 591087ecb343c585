"""`fuse ablate` on generated stores: what the K-shot tables say about the data they had."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from phrasefuse.fuse.ablate import ablate
from tests.fuse.conftest import write_synthetic


def test_shots_beyond_a_class_and_unseen_labels_are_said(tmp_path):
    data = write_synthetic(tmp_path / "d", n=600, image_signal=0.5, text_signal=0.0)
    table = pq.read_table(data.manifest)
    labels, split = table["label"].to_pylist(), table["split"].to_pylist()
    c0_train = [i for i, (l, s) in enumerate(zip(labels, split)) if l == "c0" and s == "train"]
    for i in c0_train[3:]:  # c0 keeps 3 train rows
        split[i] = "val"
    test_rows = [i for i, s in enumerate(split) if s == "test"]
    for i in test_rows[:4]:
        labels[i] = "only-in-test"
    table = table.set_column(table.column_names.index("split"), "split", pa.array(split))
    pq.write_table(table.set_column(table.column_names.index("label"), "label", pa.array(labels)),
                   tmp_path / "m.parquet")
    report = ablate(tmp_path / "m.parquet", [str(data.image)], "linear", shots=[1, 5], seeds=1).data
    five = report["tables"][1]
    assert five["regime"] == "5-shot" and five["mean_shots"] == (5 * 5 + 3) / 6
    assert "4.7 shots per label on average, not 5" in five["note"]
    assert report["tables"][0]["mean_shots"] == 1.0 and "on average" not in report["tables"][0]["note"]
    assert any(w.startswith("--shots 5: 1 of 6 labels have fewer than 5 train rows ('c0': 3)")
               for w in report["warnings"]), report["warnings"]
    assert any(w.startswith(f"4 of {len(test_rows)} test rows carry a label the train split lacks")
               for w in report["warnings"])
    assert five["rows"][0]["runs"][0]["metrics"]["unknown_labels"] == 4
    markdown = ablate(tmp_path / "m.parquet", [str(data.image)], "linear", shots=[5], seeds=1).markdown
    assert "## 5-shot, 4.7 shots per label on average" in markdown and "Warnings:" in markdown
    assert np.isfinite(five["rows"][0]["top1"]["mean"])


def test_ablate_says_how_far_it_is_without_a_terminal(tmp_path, capsys, monkeypatch):
    import phrasefuse.engine

    monkeypatch.setattr(phrasefuse.engine, "LOG_EVERY", 0.0)  # a line at every step: no clock raced
    data = write_synthetic(tmp_path / "d", n=300, image_signal=0.5, text_signal=0.0)
    ablate(data.manifest, [str(data.image)], "linear", shots=[2, 5], seeds=2)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ablate (linear head): ")]
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert "seeds/s, ETA " in lines[-1]
    ablate(data.manifest, [str(data.image)], "linear", shots=[2], seeds=1, progress=False)
    assert "ablate (" not in capsys.readouterr().err


def test_a_feature_name_with_a_pipe_or_a_newline_stays_in_its_markdown_cell(tmp_path):
    data = write_synthetic(tmp_path / "d", n=200, image_signal=0.5, text_signal=0.0)
    report = ablate(data.manifest, [f"im|g\nx={data.image}"], "linear", seeds=1, out=tmp_path / "abl")
    written = (tmp_path / "abl" / "ablation.md").read_text()
    assert written == report.markdown
    rows = [line for line in written.splitlines() if line.startswith("|")]
    assert rows[2].startswith("| im\\|g\\nx (image only) |")
    # every row of the table has the header's 5 cells: no '|' of a name opens a cell, no newline ends a row
    assert {len(re.findall(r"(?<!\\)\|", line)) for line in rows} == {6}
    assert not any(line.startswith("x (image only)") for line in written.splitlines())


def test_printed_notes_are_one_plain_line_and_the_rules_stay_in_the_files(tmp_path):
    data = write_synthetic(tmp_path / "d", n=300, image_signal=0.5, text_signal=0.0)
    report = ablate(data.manifest, [str(data.image)], "linear", shots=[1, 2], seeds=1, full=True,
                    out=tmp_path / "abl", progress=False)
    text = report.text()
    assert "shuffled priors" not in text and "chi-square" not in text and "likelihood" not in text
    assert "1 example per class: nothing can be held out" in text and "2 examples per class:" in text
    for table in report.data["tables"]:  # the full note is kept where the rules are read
        assert table["note"] in report.markdown and table["note"] in (tmp_path / "abl" / "ablation.md").read_text()
    assert "shuffled priors" in (tmp_path / "abl" / "ablation.md").read_text()
