"""`fuse ablate --out`: a folder of the user's is refused (one line, exit 2) before any training, and
left as it was; an earlier ablation's folder is rewritten."""

from __future__ import annotations

import pytest

from phrasefuse.errors import BadInput
from phrasefuse.fuse.ablate import _check_out, ablate


def test_ablate_out_holding_the_users_files_is_refused_before_any_work(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "ablation.md").write_text("my notes")
    (mine / "thesis.tex").write_text("draft")
    with pytest.raises(BadInput) as e:
        ablate(tmp_path / "nowhere.parquet", ["image=nowhere"], "linear", out=mine)
    assert str(e.value).startswith(f"--out {mine}: holds files phrasefuse did not write") and "\n" not in str(e.value)
    assert (mine / "ablation.md").read_text() == "my notes"


def test_ablate_out_absent_empty_or_an_earlier_ablations_is_accepted(tmp_path):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "ablation.json").write_text("{}")
    (earlier / "ablation.md").write_text("|")
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "absent", tmp_path / "empty", earlier):
        _check_out(out)
