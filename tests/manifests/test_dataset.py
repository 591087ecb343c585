import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phrasefuse.errors import BadInput
from phrasefuse.manifests import hash_split, read_manifest, read_table
from tests.conftest import run_cli


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_keeps_string_ids_resolves_paths_and_splits_labels(tmp_path):
    m = read_manifest(write(tmp_path / "data" / "m.csv",
                            "id,image,labels,split\n007,img/a.jpg,cat|dog,\n8,/abs/b.jpg,,val\n"))
    rows = m.table.to_pylist()
    assert [r["id"] for r in rows] == ["007", "8"]
    assert rows[0]["image"] == str(tmp_path / "data" / "img" / "a.jpg")
    assert rows[1]["image"] == "/abs/b.jpg"
    assert rows[0]["labels"] == ["cat", "dog"]
    assert rows[1]["split"] == "val"
    assert rows[0]["split"] == hash_split(pa.array(["007"]))[0].as_py()


def test_glob_of_files_resolves_relative_to_each_file(tmp_path):
    write(tmp_path / "a" / "part.jsonl", json.dumps({"id": "x", "image": "x.jpg", "labels": ["p", "q"]}) + "\n")
    write(tmp_path / "b" / "part.jsonl", json.dumps({"id": "y", "image": "y.jpg", "labels": ["r"]}) + "\n")
    m = read_manifest(str(tmp_path / "*" / "part.jsonl"))
    assert dict(zip(m.table["id"].to_pylist(), m.table["image"].to_pylist())) == {
        "x": str(tmp_path / "a" / "x.jpg"), "y": str(tmp_path / "b" / "y.jpg")}
    assert m.table["labels"].to_pylist() == [["p", "q"], ["r"]]


def test_parquet_integer_ids_and_labels_become_strings(tmp_path):
    pq.write_table(pa.table({"id": [1, 2], "label": [3, 4]}), tmp_path / "m.parquet")
    m = read_manifest(tmp_path / "m.parquet")
    assert m.table["id"].to_pylist() == ["1", "2"]
    assert m.table["label"].to_pylist() == ["3", "4"]


def test_hash_split_is_md5_of_id_80_10_10():
    ids = [f"item-{i}" for i in range(5000)]
    got = hash_split(pa.array(ids)).to_pylist()

    def naive(i):
        b = int(hashlib.md5(i.encode()).hexdigest()[:8], 16) % 100
        return "train" if b < 80 else "val" if b < 90 else "test"

    assert got == [naive(i) for i in ids]
    assert 0.77 < got.count("train") / len(got) < 0.83


@pytest.mark.parametrize("name,text,expected", [
    ("m.csv", "image\na.jpg\n", "no 'id' column"),
    ("m.csv", "id,image\n1,a.jpg\n2,b.jpg\n1,c.jpg\n", "row 3: id '1' is duplicated (first at"),
    ("m.csv", "id,image\n1,a.jpg\n,b.jpg\n", "row 2: column 'id' is empty"),
    ("m.csv", "id,split\n1,train\n2,holdout\n", "row 2: column 'split' is 'holdout'"),
    ("m.jsonl", '{"id": "1", "label": ["a", "b"]}\n', "column 'label' has type list"),
    ("m.jsonl", '{"id": "1", "labels": 5}\n', "column 'labels' has type"),
    ("m.txt", "id\n1\n", "unknown manifest format '.txt'"),
    ("m.jsonl", '{"id": "1"\n', "cannot read as manifest"),
    ("m.csv", "id,image\n", "has no rows"),
])
def test_bad_manifests_name_file_row_and_column(tmp_path, name, text, expected):
    path = write(tmp_path / name, text)
    with pytest.raises(BadInput) as err:
        read_manifest(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file_and_empty_glob(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        read_manifest(tmp_path / "nope.csv")
    with pytest.raises(BadInput, match="no file matches"):
        read_table(str(tmp_path / "*.parquet"))


def test_require_image(tmp_path):
    with pytest.raises(BadInput, match="no 'image' column"):
        read_manifest(write(tmp_path / "m.csv", "id,title\n1,hi\n"), require_image=True)


def test_cli_refuses_bad_manifest_before_any_work(tmp_path):
    manifest = write(tmp_path / "m.csv", "id,image\n1,a.jpg\n1,b.jpg\n")
    out = tmp_path / "store"
    proc = run_cli("extract", "images", manifest, "--out", out, "--model", "open_clip:nonexistent-arch@")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "duplicated" in lines[0] and str(manifest) in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
