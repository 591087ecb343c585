"""`predict HEAD INPUT...` on new images (issue 14): features made as the head records them
(image encoder, text columns, phrases through the index), rows already embedded reused, a moved
index refused then found with --index, old heads and other encoders refused with exit 2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phrasefuse.errors import BadInput
from phrasefuse.fuse.evaluate import predict, predict_new
from phrasefuse.store import EmbeddingStore
from tests import inputs_data as data
from tests.conftest import invoke_cli, run_cli


@pytest.fixture(scope="module")
def trained(shapes_dataset, tiny_clip_spec, tmp_path_factory):
    """The shapes images -> tiny open_clip store, title store, a phrase index and phrases, and a
    linear head on image + title + phrases (with a label prior over the phrases)."""
    from phrasefuse.extract.jobs import extract_images, extract_texts
    from phrasefuse.fuse.train import train_head
    from phrasefuse.index.build import build_index
    from phrasefuse.index.phrases import generate_phrases

    work = tmp_path_factory.mktemp("predict")
    table = pq.read_table(shapes_dataset)
    pq.write_table(pa.table({"query": [f"a {lab} shape" for lab in table["label"].to_pylist()],
                             "image_id": table["id"]}), work / "pairs.parquet")
    extract_images(shapes_dataset, work / "img", model=tiny_clip_spec, workers=0, progress=False)
    extract_texts(shapes_dataset, "title", work / "title", model=tiny_clip_spec, progress=False)
    build_index(work / "pairs.parquet", work / "img", work / "index")
    generate_phrases(work / "index", work / "img", work / "phrases", k=3, text_model=tiny_clip_spec)
    train_head(shapes_dataset, [str(work / "img"), str(work / "title"), str(work / "phrases")], work / "head",
               kind="linear", label_prior=str(work / "phrases"))
    return work


def test_predict_files_and_a_folder_match_the_stores(trained, shapes_dataset, tmp_path):
    images = sorted((shapes_dataset.parent / "images").glob("*.jpg"))
    folder = tmp_path / "new"
    folder.mkdir()
    for p in images[10:14]:
        shutil.copy(p, folder / p.name)
    files = [str(p) for p in images[:3]]
    result = predict_new(trained / "head", files + [str(folder)], top_k=3, out=tmp_path / "p.jsonl")
    rows = result.as_dict()
    # several INPUTs: a folder's ids start with the folder as given (files keep their path as given)
    assert [r["id"] for r in rows] == files + [f"{folder}/{p.name}" for p in images[10:14]]
    assert all(len(r["top_labels"]) == 3 and len(r["phrases"]) == 3 and r["error"] is None for r in rows)
    # the same images through their stores (`predict --manifest`) give the same answer: these
    # were reused by content key, and the phrases were looked up the way `phrases` did
    predict(trained / "head", shapes_dataset, tmp_path / "m.parquet", top_k=3)
    by_store = {r["id"]: r for r in pq.read_table(tmp_path / "m.parquet").to_pylist()}
    names = [f["name"] for f in json.loads((trained / "head" / "meta.json").read_text())["features"]]
    phrases = EmbeddingStore(trained / "phrases").read_table(["id", "phrases"]).to_pydict()
    phrases = dict(zip(phrases["id"], phrases["phrases"]))
    for r, i in zip(rows, [0, 1, 2, 10, 11, 12, 13]):
        ref = by_store[f"img-{i:06d}"]
        assert r["label"] == ref["label"] and r["phrases"] == phrases[f"img-{i:06d}"]
        np.testing.assert_allclose(r["top_probs"], ref["top_probs"], atol=1e-3)
        # files come without a title: the missing-text path
        assert r["missing_features"] == (["title"] if "title" in names else [])
    written = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [w["id"] for w in written] == [r["id"] for r in rows]
    text = result.text()
    assert files[0] in text and "phrases:" in text and "%" in text


def test_predict_new_images_from_a_tar_and_a_bad_one(trained, tmp_path):
    shards = data.tar_shards(tmp_path / "shards", shards=1, per_shard=3, corrupt="000000001")
    result = predict_new(trained / "head", [str(shards / "00000.tar")], out=tmp_path / "p.csv")
    rows = {r["id"]: r for r in result.as_dict()}
    assert rows["000000001"]["label"] is None and "not an image" in rows["000000001"]["error"]
    assert rows["000000000"]["label"] is not None and rows["000000002"]["error"] is None
    assert "000000001" in (tmp_path / "p.csv").read_text()


def test_moved_index_is_refused_then_found_with_index(trained, shapes_dataset, tmp_path):
    image = str(sorted((shapes_dataset.parent / "images").glob("*.jpg"))[5])
    moved = tmp_path / "moved-index"
    shutil.move(trained / "index", moved)
    try:
        bad = run_cli("predict", trained / "head", image)
        assert bad.returncode == 2 and str(trained / "index") in bad.stderr and "--index" in bad.stderr
        assert predict_new(trained / "head", [image], index=str(moved)).as_dict()[0]["phrases"]
        # another index (another build) is refused, naming it
        other = tmp_path / "other"
        from phrasefuse.index.build import build_index

        build_index(_pairs(tmp_path, shapes_dataset), trained / "img", other)
        with pytest.raises(BadInput, match="index build .* but feature 'phrases'"):
            predict_new(trained / "head", [image], index=str(other))
    finally:
        shutil.move(moved, trained / "index")


def _pairs(tmp_path, manifest):
    ids = pq.read_table(manifest)["id"]
    path = tmp_path / "pairs2.parquet"
    pq.write_table(pa.table({"query": ["anything"] * len(ids), "image_id": ids}), path)
    return path


def test_other_encoder_and_old_heads_are_refused(trained, shapes_dataset, tmp_path):
    image = str(sorted((shapes_dataset.parent / "images").glob("*.jpg"))[0])
    with pytest.raises(BadInput, match="image feature 'img': encoder .* but the head was trained on"):
        predict_new(trained / "head", [image], model="builtin:efficientnet-lite0")
    old = tmp_path / "old-head"
    shutil.copytree(trained / "head", old)
    meta = json.loads((old / "meta.json").read_text())
    for f in meta["features"]:
        f.pop("provenance")
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BadInput, match="does not record how its feature 'img' is made.*re-train"):
        predict_new(old, [image])
    # `predict HEAD --manifest M --out P` keeps working for it
    assert predict(old, shapes_dataset, tmp_path / "p.parquet").rows == 60


# ---------------------------------------------------------------- ids, output files, printed lines


def _two_cameras(shapes_dataset, tmp_path):
    """day1/ and day2/, each holding an IMG_0001.jpg (different images), as two cameras write them."""
    images = sorted((shapes_dataset.parent / "images").glob("*.jpg"))
    for day, image in (("day1", images[0]), ("day2", images[1])):
        (tmp_path / day).mkdir()
        shutil.copy(image, tmp_path / day / "IMG_0001.jpg")
    return tmp_path / "day1", tmp_path / "day2"


def test_two_folders_with_the_same_file_names_get_ids_starting_with_their_input(trained, shapes_dataset, tmp_path):
    day1, day2 = _two_cameras(shapes_dataset, tmp_path)
    proc = invoke_cli("predict", trained / "head", f"{day1}/", day2, "--out", tmp_path / "p.parquet")
    assert proc.returncode == 0, proc.stderr
    assert pq.read_table(tmp_path / "p.parquet")["id"].to_pylist() == [f"{day1}/IMG_0001.jpg", f"{day2}/IMG_0001.jpg"]
    # one INPUT: ids relative to it, as before
    assert [r["id"] for r in predict_new(trained / "head", [str(day1)]).as_dict()] == ["IMG_0001.jpg"]
    # the same folder twice is the same images twice: refused, naming the id
    with pytest.raises(BadInput, match="IMG_0001.jpg' comes twice"):
        predict_new(trained / "head", [str(day1), f"{day1}/"])


@pytest.mark.parametrize("name", ["preds.txt", "preds", "preds.json", "preds.parquet.gz"])
def test_out_with_an_extension_of_no_known_format_is_refused_before_any_work(trained, shapes_dataset, tmp_path, name):
    image = sorted((shapes_dataset.parent / "images").glob("*.jpg"))[0]
    for args in ((image,), ("--manifest", shapes_dataset)):
        proc = invoke_cli("predict", trained / "nowhere", *args, "--out", tmp_path / name)
        lines = proc.stderr.strip().splitlines()
        # refused before the (missing) head is read: the one line is about --out and lists the formats
        assert proc.returncode == 2 and len(lines) == 1 and f"--out {tmp_path / name}" in lines[0], lines
        assert ".parquet, .csv, .jsonl" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_out_format_follows_the_extension(trained, shapes_dataset, tmp_path):
    import csv

    image = str(sorted((shapes_dataset.parent / "images").glob("*.jpg"))[0])
    rows = {}
    for name in ("p.parquet", "p.CSV", "p.jsonl"):
        proc = invoke_cli("predict", trained / "head", image, "--top-k", "2", "--out", tmp_path / name)
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "p.parquet").read_bytes()[:4] == b"PAR1"
    rows["parquet"] = pq.read_table(tmp_path / "p.parquet").to_pylist()[0]
    with open(tmp_path / "p.CSV", newline="", encoding="utf-8") as f:
        rows["csv"] = next(csv.DictReader(f))
    rows["jsonl"] = json.loads((tmp_path / "p.jsonl").read_text())
    assert rows["parquet"]["id"] == rows["csv"]["id"] == rows["jsonl"]["id"] == image
    assert json.loads(rows["csv"]["top_labels"]) == rows["parquet"]["top_labels"] == rows["jsonl"]["top_labels"]
    # probabilities: the same float32 in each, written as its shortest decimal in the text formats
    assert np.float32(rows["csv"]["probability"]) == np.float32(rows["jsonl"]["probability"]) == \
        np.float32(rows["parquet"]["probability"])
    assert json.loads(rows["csv"]["top_probs"]) == rows["jsonl"]["top_probs"]
    assert str(rows["jsonl"]["probability"]) == str(np.float32(rows["parquet"]["probability"]))


def test_csv_list_cells_are_json_arrays_that_read_back_exactly(tmp_path):
    import csv

    from phrasefuse.fuse.evaluate import write_predictions

    labels = [["a|b", "c"], ['say "hi", then\nleave', "|"], None]
    probs = [[0.7, 0.3], [0.5, 0.25], None]
    table = pa.table({"id": ["r0", "r1", "r2"], "top_labels": pa.array(labels, pa.list_(pa.string())),
                      "top_probs": pa.array(probs, pa.list_(pa.float32())),
                      "missing_features": pa.array([[], ["title"], []], pa.list_(pa.string()))})
    write_predictions(table, tmp_path / "p.csv")
    with open(tmp_path / "p.csv", newline="", encoding="utf-8") as f:
        read = list(csv.DictReader(f))
    assert [json.loads(r["top_labels"]) if r["top_labels"] else None for r in read] == labels
    assert [json.loads(r["top_probs"]) if r["top_probs"] else None for r in read] == probs  # float32, shortest
    assert read[0]["top_labels"] == '["a|b", "c"]' and read[0]["top_probs"] == "[0.7, 0.3]"
    assert [json.loads(r["missing_features"]) for r in read] == [[], ["title"], []]


def test_printed_lines_escape_control_characters_of_file_names(trained, shapes_dataset, tmp_path):
    images = sorted((shapes_dataset.parent / "images").glob("*.jpg"))
    folder = tmp_path / "new"
    folder.mkdir()
    shutil.copy(images[0], folder / "\x1b]0;pwned\x07a.jpg")  # OSC: sets the terminal's title
    shutil.copy(images[1], folder / "b.jpg: cat (100.0%)\nzz.jpg")  # a newline: a forged line
    proc = invoke_cli("predict", trained / "head", folder, "--out", tmp_path / "p.parquet")
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if not line.startswith(" ")]
    assert [line.split(": ", 1)[0] for line in rows[:2]] == ["\\x1b]0;pwned\\x07a.jpg", "b.jpg"]
    assert rows[1].startswith("b.jpg: cat (100.0%)\\nzz.jpg: ") and len(rows) == 3  # 2 images + the summary
    # the file keeps the ids exact
    assert sorted(pq.read_table(tmp_path / "p.parquet")["id"].to_pylist()) == sorted(p.name for p in folder.iterdir())
    # an error line naming a path stays one line, its escapes shown
    proc = invoke_cli("predict", trained / "head", tmp_path / "gone\x1b[2J\nphrasefuse: ok.jpg")
    assert proc.returncode == 2 and "\x1b" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---------------------------------------------------------------- labelled inputs


def _labelled_folder(shapes_dataset, tmp_path):
    """CLASS/ subfolders of 8 shapes images under their true labels, and one under a label the head
    never saw ('hexagon')."""
    table = pq.read_table(shapes_dataset).slice(0, 9).to_pylist()
    folder = tmp_path / "labelled"
    for i, row in enumerate(table):
        label = "hexagon" if i == 8 else row["label"]
        (folder / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(shapes_dataset.parent / row["image"], folder / label / f"{i}.jpg")
    return folder


def test_predict_on_a_labelled_folder_scores_it_and_names_unseen_labels(trained, shapes_dataset, tmp_path):
    import csv

    folder = _labelled_folder(shapes_dataset, tmp_path)
    proc = invoke_cli("predict", trained / "head", folder, "--out", tmp_path / "p.csv")
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "p.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:8] == ["id", "label", "probability", "top_labels", "top_probs", "predicted", "true_label",
                                 "correct"]
    assert all(r["true_label"] == r["id"].split("/")[0] for r in rows)
    assert all(r["predicted"] == r["label"] and r["correct"] == str(r["predicted"] == r["true_label"]).lower()
               for r in rows)
    unseen = [r for r in rows if r["true_label"] == "hexagon"]
    assert len(unseen) == 1 and unseen[0]["correct"] == "false"  # the head cannot predict it: wrong
    # the printed top-1 is the fraction of correct rows in the file
    right = sum(r["correct"] == "true" for r in rows)
    assert f"top-1 {100 * right / len(rows):.1f}% ({right} of {len(rows)} labelled rows correct)" in proc.stdout
    assert "per class: " in proc.stdout and "hexagon 0.0%" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("phrasefuse: warning:")]
    assert len(warnings) == 1 and "'hexagon'" in warnings[0] and "never saw" in warnings[0]
    # unlabelled image files: no truth columns, no score
    image = str(sorted((shapes_dataset.parent / "images").glob("*.jpg"))[0])
    plain = predict_new(trained / "head", [image])
    assert "true_label" not in plain.table.column_names and plain.scores is None and "top-1" not in plain.text()
    assert plain.table["predicted"].to_pylist() == plain.table["label"].to_pylist()


def test_predict_on_a_folder_of_symlinks_out_is_refused_unless_allowed(trained, shapes_dataset, tmp_path):
    """A folder whose images link elsewhere (`cp -rs`: a dataset kept once, linked into a project):
    refused with one line naming the flag, as extract refuses it; with --allow-outside-paths, scored."""
    real = _labelled_folder(shapes_dataset, tmp_path)
    linked = tmp_path / "linked"
    for image in sorted(real.rglob("*.jpg")):
        (linked / image.parent.name).mkdir(parents=True, exist_ok=True)
        (linked / image.parent.name / image.name).symlink_to(image)
    refused = invoke_cli("predict", trained / "head", linked, "--out", tmp_path / "r.csv")
    assert refused.returncode == 2 and "--allow-outside-paths" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "r.csv").exists()
    allowed = invoke_cli("predict", trained / "head", linked, "--allow-outside-paths", "--out", tmp_path / "a.csv")
    assert allowed.returncode == 0, allowed.stderr
    assert "of 9 labelled rows correct" in allowed.stdout


def test_predict_manifest_with_labels_scores_it_and_a_missing_label_col_is_refused(trained, shapes_dataset, tmp_path):
    summary = predict(trained / "head", shapes_dataset, tmp_path / "p.parquet")
    table = pq.read_table(tmp_path / "p.parquet")
    assert table["true_label"].to_pylist() == pq.read_table(shapes_dataset)["label"].to_pylist()
    assert summary.scores["top1"] == pytest.approx(np.mean(table["correct"].to_pylist()))
    assert summary.as_dict()["scores"]["scored"] == 60 and "top-1 " in summary.text()
    assert "training rows included" in summary.text()  # the manifest the head was trained on
    proc = invoke_cli("predict", trained / "head", shapes_dataset, "--label-col", "kind", "--out", tmp_path / "q.csv")
    assert proc.returncode == 2 and "--label-col kind" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_predict_manifest_shows_phrases_of_a_store_the_head_does_not_read(trained, shapes_dataset, tmp_path):
    """`run`'s predictions (an image-only head beside a phrases store): the phrases are in the file."""
    from phrasefuse.fuse.train import train_head

    train_head(shapes_dataset, [str(trained / "img")], tmp_path / "image-only", kind="linear")
    predict(tmp_path / "image-only", shapes_dataset, tmp_path / "p.parquet")
    assert "phrases" not in pq.read_table(tmp_path / "p.parquet").column_names
    predict(tmp_path / "image-only", shapes_dataset, tmp_path / "p.parquet", phrases_from=[trained / "phrases"])
    table = pq.read_table(tmp_path / "p.parquet")
    phrases = EmbeddingStore(trained / "phrases").read_table(["id", "phrases"]).to_pydict()
    assert dict(zip(table["id"].to_pylist(), table["phrases"].to_pylist())) == dict(zip(phrases["id"], phrases["phrases"]))


def test_inspect_of_a_head_names_every_part_it_saved(trained):
    """As `fuse train` prints it: the label prior and its weight beside the features."""
    meta = json.loads((trained / "head" / "meta.json").read_text())
    text = invoke_cli("inspect", trained / "head", check=True).stdout
    saved = next(line for line in text.splitlines() if line.lstrip().startswith("saved "))
    for f in meta["features"]:
        assert f["name"] in saved
    prior = f"label prior phrases, weight {meta['prior']['weight']:.3g}" if meta["prior"]["weight"] else \
        "no label prior (left out)"
    assert prior in saved and f"{meta['selection']['saved']} head kept: " in text
