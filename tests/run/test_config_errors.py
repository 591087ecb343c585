"""A config's mistakes are reported all at once, in one line, each naming its key."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phrasefuse.errors import BadInput
from phrasefuse.run.config import load_config
from phrasefuse.run.pipeline import check_inputs


def write(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_every_mistake_of_a_config_is_named_in_one_line(tmp_path):
    config = write(tmp_path, """
colour = "blue"
[data]
manifest = "m.parquet"
text_columns = "title"
[encoders]
device = "gpu"
batch_size = 0
[[heads]]
kind = "forest"
seed = "one"
""")
    with pytest.raises(BadInput) as e:
        load_config(config)
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"{config}: 7 mistakes: ")
    for key in ("'colour'", "'data.text_columns'", "'encoders.device'", "'encoders.batch_size'", "'heads[0].name'",
                "'heads[0].kind'", "'heads[0].seed'"):
        assert f"key {key}" in line, (key, line)


def test_one_mistake_reads_as_before(tmp_path):
    config = write(tmp_path, '[data]\nmanifest = "m.parquet"\n[report]\ngallery = -1\n')
    with pytest.raises(BadInput, match=r"run\.toml: key 'report\.gallery': expected 0 or more") as e:
        load_config(config)
    assert "mistakes" not in str(e.value)


def test_missing_columns_and_files_are_reported_together_before_any_work(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "image": ["a.jpg"], "title": ["t"]}), tmp_path / "m.parquet")
    config = write(tmp_path, """
work = "w"
[data]
manifest = "m.parquet"
label_col = "class"
text_columns = ["title", "caption", "tags"]
label_descriptions = "nowhere.csv"
""")
    with pytest.raises(BadInput) as e:
        check_inputs(load_config(config))
    line = str(e.value)
    assert line.startswith(f"{config}: 4 mistakes: ") and "\n" not in line
    for part in ("key 'data.label_descriptions'", "column 'caption'", "column 'tags'", "column 'class'"):
        assert part in line, (part, line)
    assert "column 'title'" not in line and not (tmp_path / "w").exists()
