"""Tampered or damaged head and store files: exit 2 naming the file, never a native crash or a hang.

A LightGBM model text is checked tree by tree before LightGBM parses it (cyclic or out-of-range
children, split features the head does not have, non-finite leaves); every head file's sha256 is
recorded in meta.json and checked on load; safetensors, meta.json and errors.parquet damage is a
BadInput naming the file.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phrasefuse.errors import BadInput
from phrasefuse.fuse.artifact import load_head, verify_head
from phrasefuse.fuse.lgbm_check import BadModel, checked_model_text
from phrasefuse.store import EmbeddingStore, StoreWriter, new_meta, verify_store
from tests.conftest import run_cli


def _encoder(dim: int) -> dict:
    return {"spec": "generated:img", "family": "generated", "name": "img",
            "weights_sha256": hashlib.sha256(b"img").hexdigest(), "dim": dim}


def write_data(folder: Path, n: int = 240, classes: int = 4, dim: int = 16) -> tuple[Path, Path]:
    """A manifest and an image store whose vectors separate the classes."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, n)
    x = 2.0 * rng.standard_normal((classes, dim))[y] + rng.standard_normal((n, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = [f"r{i:04d}" for i in range(n)]
    split = np.where(np.arange(n) % 10 < 6, "train", np.where(np.arange(n) % 10 < 8, "val", "test"))
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "label": [f"c{c}" for c in y], "split": split.tolist()}),
                   folder / "manifest.parquet")
    meta = new_meta(modality="image", encoder=_encoder(dim), dtype="float32", source={"column": "image"})
    with StoreWriter.open(folder / "img", meta, shard_size=100) as w:
        w.add(ids, [f"k{i}" for i in ids], x)
    return folder / "manifest.parquet", folder / "img"


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    from phrasefuse.fuse.train import train_head

    folder = tmp_path_factory.mktemp("tamper")
    manifest, img = write_data(folder)
    out = {}
    for kind in ("lgbm", "linear"):
        train_head(str(manifest), [f"image={img}"], folder / kind, kind=kind, seed=0)
        out[kind] = folder / kind
    return {"manifest": manifest, "img": img, **out}


def tampered_copy(src: Path, dst: Path, edit, drop_checksums: bool = True) -> Path:
    """A copy of the head at `src` whose lgbm.txt went through `edit`; by default its meta.json
    checksums are dropped too (as a careful tamperer would), so the structure check must catch it."""
    shutil.copytree(src, dst)
    model = dst / "lgbm.txt"
    model.write_text(edit(model.read_text()))
    if drop_checksums:
        meta = json.loads((dst / "meta.json").read_text())
        meta.pop("checksums", None)
        (dst / "meta.json").write_text(json.dumps(meta))
    return dst


def first(field: str, value: str):
    """Set the first `field=` line of the first tree (and drop tree_sizes, as LightGBM then parses trees one by one)."""
    def edit(text: str) -> str:
        text = re.sub(r"^tree_sizes=.*\n", "", text, count=1, flags=re.M)
        return re.sub(rf"^{field}=.*$", f"{field}={value}", text, count=1, flags=re.M)
    return edit


def tree_fields(text: str, field: str) -> list[str]:
    return re.search(rf"^{field}=(.*)$", text, flags=re.M).group(1).split()


TAMPERINGS = {
    "cycle_to_root": lambda t: first("right_child", "0 " * len(tree_fields(t, "right_child")))(
        first("left_child", "0 " * len(tree_fields(t, "left_child")))(t)),
    "child_out_of_range": lambda t: first("left_child", " ".join(["1000"] + tree_fields(t, "left_child")[1:]))(t),
    "leaf_out_of_range": lambda t: first("right_child", " ".join(["-1000"] + tree_fields(t, "right_child")[1:]))(t),
    "feature_out_of_range": lambda t: first("split_feature", " ".join(["4096"] + tree_fields(t, "split_feature")[1:]))(t),
    "negative_feature": lambda t: first("split_feature", " ".join(["-3"] + tree_fields(t, "split_feature")[1:]))(t),
    "nan_leaf": lambda t: first("leaf_value", " ".join(["nan"] + tree_fields(t, "leaf_value")[1:]))(t),
    "missing_leaves": lambda t: first("leaf_value", " ".join(tree_fields(t, "leaf_value")[1:]))(t),
    "more_features": lambda t: re.sub(r"^max_feature_idx=\d+", "max_feature_idx=9999", t, count=1, flags=re.M),
    "categorical": lambda t: first("num_cat", "1")(t),
    "garbage": lambda t: t[: len(t) // 3],
}


def _tree_start(text: str, number: int) -> int:
    return re.search(rf"^Tree={number}$", text, flags=re.M).start()


def _drop_last_iteration(text: str) -> str:
    """The model without its last round's trees, the end marker and parameters kept: LightGBM would
    load it as a sound model with one round fewer."""
    per_iteration = int(re.search(r"^num_tree_per_iteration=(\d+)", text, flags=re.M).group(1))
    last = len(re.findall(r"^Tree=\d+$", text, flags=re.M)) - per_iteration
    return text[:_tree_start(text, last)] + text[text.index("end of trees"):]


# A model text cut at fixed places of its structure (not at a fraction of its length, which lands in
# a different place whenever the trees differ): each must be refused although every tree before the
# cut is whole. Checksums are dropped, so only the structure check can tell.
CUTS = {
    "inside_a_tree": lambda t: t[:_tree_start(t, 1) + 40],
    "at_a_tree_boundary": lambda t: t[:_tree_start(t, 1)],
    "at_an_iteration_boundary": lambda t: t[:_tree_start(t, int(re.search(
        r"^num_tree_per_iteration=(\d+)", t, flags=re.M).group(1)))],
    "before_the_end_marker": lambda t: t[:t.index("end of trees")],
    "after_the_end_marker": lambda t: t[:t.index("end of trees") + len("end of trees\n")],
    "inside_the_parameters": lambda t: t[:t.index("end of parameters")],
    "last_round_dropped": _drop_last_iteration,
    "a_middle_tree_dropped": lambda t: t[:_tree_start(t, 1)] + t[_tree_start(t, 2):],
    "last_round_dropped_and_tree_sizes": lambda t: re.sub(r"^tree_sizes=.*\n", "", _drop_last_iteration(t),
                                                          count=1, flags=re.M),
}


@pytest.mark.parametrize("name", sorted(CUTS))
def test_lgbm_model_text_cut_at_a_fixed_place_is_refused_on_load_and_by_verify(heads, tmp_path, name):
    head = tampered_copy(heads["lgbm"], tmp_path / name, CUTS[name])
    with pytest.raises(BadInput, match=r"lgbm\.txt: .*(cut short|trees|tree_sizes|Tree=)"):
        load_head(head)
    problems = verify_head(head)
    assert problems and str(head) in problems[0] and "lgbm.txt" in problems[0]


def test_cli_on_a_cut_lgbm_head_exits_2_with_one_line(heads, tmp_path):
    from tests.conftest import invoke_cli

    head = tampered_copy(heads["lgbm"], tmp_path / "cut", CUTS["at_an_iteration_boundary"])
    for args in (("inspect", head, "--verify"),
                 ("predict", head, "--manifest", heads["manifest"], "--out", tmp_path / "p.parquet")):
        proc = invoke_cli(*args)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "lgbm.txt" in lines[0] and "cut short" in lines[0], lines
    assert not (tmp_path / "p.parquet").exists()


def test_lgbm_thread_count_is_fixed_by_the_environment(monkeypatch):
    from phrasefuse.fuse.heads.lgbm import THREADS_ENV, lgbm_threads

    monkeypatch.setenv(THREADS_ENV, "3")
    assert lgbm_threads(10) == lgbm_threads(10**9) == 3
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(BadInput, match=THREADS_ENV):
            lgbm_threads(10)
    monkeypatch.delenv(THREADS_ENV)
    assert lgbm_threads(10) == 1


@pytest.mark.parametrize("name", sorted(TAMPERINGS))
def test_tampered_lgbm_tree_is_refused_on_load_and_by_verify(heads, tmp_path, name):
    head = tampered_copy(heads["lgbm"], tmp_path / name, TAMPERINGS[name])
    with pytest.raises(BadInput, match="lgbm|head weights"):
        load_head(head)
    problems = verify_head(head)
    assert problems and str(head) in problems[0]


def test_every_head_file_has_a_checksum_and_a_changed_leaf_is_refused(heads, tmp_path):
    meta = json.loads((heads["lgbm"] / "meta.json").read_text())
    assert set(meta["checksums"]) == set(meta["files"]) == {"lgbm.txt", "weights.safetensors"}
    # a finite, in-range change: structurally sound, so only the checksum can tell
    head = tampered_copy(heads["lgbm"], tmp_path / "leaf", lambda t: re.sub(
        r"^leaf_value=(\S+)", "leaf_value=12.5", t, count=1, flags=re.M), drop_checksums=False)
    with pytest.raises(BadInput, match="sha256 differs"):
        load_head(head)
    assert any("lgbm.txt" in p for p in verify_head(head))


def test_sound_model_text_passes_the_check_unchanged_but_for_tree_sizes(heads):
    text = (heads["lgbm"] / "lgbm.txt").read_text()
    checked = checked_model_text(text, int(re.search(r"max_feature_idx=(\d+)", text).group(1)) + 1,
                                 int(re.search(r"num_class=(\d+)", text).group(1)))
    assert "tree_sizes=" not in checked and checked.count("Tree=") == text.count("Tree=")
    with pytest.raises(BadModel, match="max_feature_idx"):
        checked_model_text(text, 3, 4)


@pytest.mark.parametrize("damage", ["zeros", "truncated", "meta_no_labels", "meta_files_escape"])
def test_damaged_head_files_are_bad_input(heads, tmp_path, damage):
    head = tmp_path / damage
    shutil.copytree(heads["linear"], head)
    meta = json.loads((head / "meta.json").read_text())
    meta.pop("checksums")  # the loader itself must cope, not only the checksum
    if damage == "zeros":
        (head / "weights.safetensors").write_bytes(bytes(100))
    elif damage == "truncated":
        data = (head / "weights.safetensors").read_bytes()
        (head / "weights.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "meta_no_labels":
        del meta["labels"]
    else:
        meta["files"] = ["weights.safetensors", "../../etc/passwd"]
    (head / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BadInput, match=str(head)):
        load_head(head)


def test_cli_predict_and_verify_on_a_cyclic_lgbm_head_exit_2_with_one_line(heads, tmp_path, capsys):
    from tests.faults.test_exit_status import run_main

    head = tampered_copy(heads["lgbm"], tmp_path / "cyc", TAMPERINGS["cycle_to_root"])
    # predict in a subprocess: were the check gone, LightGBM would loop in native code (the timeout ends it)
    proc = run_cli("predict", head, "--manifest", heads["manifest"], "--out", tmp_path / "p.parquet", timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("phrasefuse:")]
    assert len(lines) == 1 and str(head) in lines[0]
    assert not (tmp_path / "p.parquet").exists()
    status, lines = run_main(capsys, "inspect", head, "--verify")
    assert status == 2 and len(lines) == 1 and str(head) in lines[0]


@pytest.mark.parametrize("damage", ["dtype", "dim_disagrees", "errors_junk", "errors_no_columns"])
def test_damaged_store_meta_or_errors_file_is_bad_input_and_verify_reports_it(heads, tmp_path, damage):
    store = tmp_path / "st"
    shutil.copytree(heads["img"], store)
    meta = json.loads((store / "meta.json").read_text())
    if damage == "dtype":
        meta["dtype"] = "float64"
    elif damage == "dim_disagrees":
        meta["encoder"]["dim"] = meta["dim"] + 1
    elif damage == "errors_junk":
        (store / "errors.parquet").write_text("junk\n")
    else:
        pq.write_table(pa.table({"x": [1]}), store / "errors.parquet")
    (store / "meta.json").write_text(json.dumps(meta))
    s = EmbeddingStore(store)
    if damage.startswith("errors"):
        with pytest.raises(BadInput, match="errors.parquet"):
            s.errors()
        assert any("errors.parquet" in p for p in verify_store(s))
        with pytest.raises(BadInput, match="errors.parquet"):  # the next job refuses, naming the file
            StoreWriter.open(store, s.meta)
    else:
        with pytest.raises(BadInput, match="meta.json: field '(dtype|encoder.dim)'"):
            s.meta


@pytest.mark.parametrize("edit", ["features_no_name", "features_not_a_list", "metrics_a_string"])
def test_inspect_of_a_hand_edited_head_meta_is_bad_input(heads, tmp_path, edit):
    from phrasefuse.inspect import describe

    head = tmp_path / edit
    shutil.copytree(heads["linear"], head)
    meta = json.loads((head / "meta.json").read_text())
    if edit == "features_no_name":
        del meta["features"][0]["name"]
    elif edit == "features_not_a_list":
        meta["features"] = 7
    else:
        meta["metrics"] = "x"
    (head / "meta.json").write_text(json.dumps(meta))
    for verify in (False, True):
        try:
            report = describe(head, verify=verify)
        except BadInput as e:
            assert str(head) in str(e)
        else:
            assert verify and report.problems  # a sound description, problems listed by --verify
