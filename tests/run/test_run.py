"""`phrasefuse run CONFIG.toml`: config validation, a tiny pipeline end to end, stages skipped
on a second run, embed-once across runs, and a head change re-running only that head."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import invoke_cli, run_cli
from tests.extract.test_noop import NOOP_PROBE

TINY = """
work = "work"

[data]
manifest = "data/manifest.parquet"
text_columns = ["title", "tags"]
label_descriptions = "data/label_descriptions.parquet"

[encoders]
image = "{spec}"
text = "{spec}"
batch_size = 32
workers = 0

[phrases]
pairs = "data/pairs.parquet"
images = "data/query_manifest.parquet"
k = 2

[[heads]]
name = "fused"
kind = "{kind}"
features = ["image", "title", "phrases"]
pseudo_shots = true

[ablation]
head = "linear"
seeds = 1
shots = [1, 2]
rows = [["image"], ["image", "title"], ["image", "phrases"]]
shot_rows = [["image"], ["image", "phrases"], ["image", "phrases", "label-prior"], ["image", "pseudo-shots"]]
label_prior = "phrases"
pseudo_shots = true

[report]
gallery = 6
"""


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """A few dozen demo images (10 look-alike classes), query corpus, pairs, label descriptions."""
    from phrasefuse.synthetic import generate_demo

    folder = tmp_path_factory.mktemp("run")
    generate_demo(folder / "data", n=60, n_query=40)
    return folder


def write_config(folder: Path, spec: str, kind: str = "linear", name: str = "run.toml") -> Path:
    path = folder / name
    path.write_text(TINY.format(spec=spec, kind=kind))
    return path


def stages(proc) -> dict[str, dict]:
    assert proc.returncode == 0, proc.stderr
    return {s["stage"]: s for s in json.loads(proc.stdout)["stages"]}


def assert_predictions_and_zeroshot(folder: Path) -> None:
    """WORK/predictions/<head>.parquet: every manifest row, ranked probabilities of known labels;
    WORK/zeroshot.json: the label prior alone, on the test split."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    manifest = pq.read_table(folder / "data" / "manifest.parquet")
    labels = set(manifest["label"].to_pylist())
    work = folder / "work"
    for name in ("fused", "image-only"):
        predictions = pq.read_table(work / "predictions" / f"{name}.parquet")
        assert sorted(predictions["id"].to_pylist()) == sorted(manifest["id"].to_pylist())
        assert set(predictions["label"].to_pylist()) <= labels
        for top_labels, top_probs in zip(predictions["top_labels"].to_pylist(), predictions["top_probs"].to_pylist()):
            assert set(top_labels) <= labels and top_probs == sorted(top_probs, reverse=True) and sum(top_probs) <= 1 + 1e-5
        assert predictions.column_names[:5] == ["id", "label", "probability", "top_labels", "top_probs"]
        # every head's predictions show the run's phrases, the image-only head's too (README: Outputs)
        assert "phrases" in predictions.column_names and predictions["phrases"].null_count < predictions.num_rows
    zeroshot = json.loads((work / "zeroshot.json").read_text())
    assert zeroshot["split"] == "test" and 0 < zeroshot["coverage"] <= 1
    if "split" in manifest.column_names:
        assert zeroshot["rows"] == pc.sum(pc.equal(manifest["split"], "test")).as_py()
    assert 0 <= zeroshot["metrics"]["top1"] <= 1 and zeroshot["labels"] == len(labels)


def run_in_process(config: Path) -> dict[str, dict]:
    """The stages of `run CONFIG` called as the library (the CLI's `run --json`: the end-to-end test's first run)."""
    from phrasefuse.run.pipeline import StageResult, run_config

    return {r.stage: r.as_dict() for r in run_config(config, progress=False) if isinstance(r, StageResult)}


def test_tiny_config_end_to_end_then_skips_then_retrains_only_the_head(demo_data, tiny_clip_spec):
    config = write_config(demo_data, tiny_clip_spec)
    proc = invoke_cli("run", config, "--json")  # cli.main in this process (`run` as a process: the exit-2 tests)
    first = stages(proc)
    assert json.loads(proc.stdout)["ablation"]["tables"][0]["regime"] == "full"  # --json has the table too
    assert set(first) == {"extract image", "extract title", "extract tags", "extract query images", "index",
                          "phrases", "head fused", "head image-only", "zeroshot", "ablation", "report"}
    assert all(s["status"] == "ran" for s in first.values())
    assert first["extract image"]["summary"]["embedded"] == 60
    assert first["extract query images"]["summary"]["embedded"] == 40
    assert_predictions_and_zeroshot(demo_data)

    work = demo_data / "work"
    page = (work / "report.html").read_text(encoding="utf-8")
    for section in ("Ablation", "Few-shot", "Heads", "Confusion matrix", "Gallery", "text kept"):
        assert section in page
    from phrasefuse.report.page import is_image_only_fallback

    # "image-only fallback" only when the saved head predicts as image-only does (no prior kept on it)
    fallback = is_image_only_fallback(json.loads((work / "heads" / "fused" / "meta.json").read_text()))
    assert ("is the image-only fallback" in page) == fallback
    if not fallback:
        assert "data:image/jpeg;base64," in page  # the gallery
    assert page.count("data:image/png;base64,") == 3
    for png in ("ablation.png", "few_shot.png", "confusion.png"):
        assert (work / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ablation = json.loads((work / "ablation" / "ablation.json").read_text())
    assert [t["regime"] for t in ablation["tables"]] == ["full", "1-shot", "2-shot"]
    one_shot = {r["features"]: r for r in ablation["tables"][1]["rows"]}
    prior_row = one_shot["image + phrases + label prior (phrases)"]
    # 1 shot: no untested default changes a prediction: phrases are left out, and the label prior's
    # weight is its temperature fitted on the shots (0 unless it beats shuffled priors)
    assert prior_row["prior_chosen_by"] == "1 shot: the prior's temperature fitted on the shots"
    assert one_shot["image + phrases"]["text_kept"] == 0
    image_only = one_shot["image (image only)"]
    assert one_shot["image + phrases"]["top1"] == image_only["top1"]
    if prior_row["prior_weights"] == [0.0]:
        assert prior_row["top1"] == image_only["top1"]
    assert one_shot["image + pseudo-shots"]["pseudo_kept"] == [0]  # nothing held out: left out
    assert one_shot["image + pseudo-shots"]["top1"] == image_only["top1"]
    two_shot = {r["features"]: r for r in ablation["tables"][2]["rows"]}
    assert len(two_shot["image + pseudo-shots"]["pseudo_kept"]) == 1
    fused_meta = json.loads((work / "heads" / "fused" / "meta.json").read_text())
    assert fused_meta["selection"]["pseudo_shots"]["index"] == str(work / "index")
    assert "pseudo-shots from" in page

    # Same config again (the library: the CLI's `run --json` is the first run): every stage is
    # skipped, and the summaries say nothing was embedded.
    second = run_in_process(config)
    assert all(s["status"] == "skipped" for s in second.values()), second
    assert second["extract image"]["summary"]["embedded"] == 0
    assert second["extract image"]["summary"]["present"] == 60
    assert second["phrases"]["summary"]["written"] == 0
    # The same in a fresh process: no model library is even imported (torch, open_clip, faiss, lightgbm).
    probe = subprocess.run([sys.executable, "-c", NOOP_PROBE, "run", str(config), "--json"], capture_output=True,
                           text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == {"code": 0, "heavy": []}, probe.stderr

    # Only the head's kind changes: that head, the image-only baseline of the same kind and the
    # report re-run; nothing is re-embedded, the index and the ablation stay.
    write_config(demo_data, tiny_clip_spec, kind="mlp")
    third = run_in_process(config)
    ran = {name for name, s in third.items() if s["status"] == "ran"}
    assert ran == {"head fused", "head image-only", "report"}
    assert json.loads((work / "heads" / "fused" / "meta.json").read_text())["kind"] == "mlp"


def test_lost_run_state_still_embeds_nothing_twice(demo_data, tiny_clip_spec):
    """Without run-state.json every stage runs again, and the stores say nothing was re-embedded."""
    config = write_config(demo_data, tiny_clip_spec, name="again.toml")
    text = config.read_text()  # no [ablation]: what is embedded is the point, not the ablation's tables
    config.write_text(text[:text.index("[ablation]")] + text[text.index("[report]"):])
    assert "ablation" not in run_in_process(config)
    (demo_data / "work" / "run-state.json").unlink()
    again = run_in_process(config)
    for name in ("extract image", "extract title", "extract query images"):
        summary = again[name]["summary"]
        assert summary["embedded"] == 0 and summary["reused"] == 0
        assert summary["no_text"] == summary["errors"] and summary["failed"] == 0  # texts missing, retried each run
        assert summary["present"] > 0 and summary["present"] + summary["no_text"] == summary["rows"]
    # The index is rebuilt (its inputs can no longer be vouched for) and the phrases, derived from
    # it, are regenerated whole: a phrases store never mixes rows of two indexes.
    assert again["index"]["status"] == "ran" and again["phrases"]["summary"]["written"] == 60


@pytest.mark.parametrize("edit, key", [
    (("[report]", "[report]\ncolour = 3"), "report.colour"),
    (('k = 2', 'k = "two"'), "phrases.k"),
    (('features = ["image", "title", "phrases"]', 'features = ["image", "caption"]'), "heads[0].features"),
    (('kind = "linear"\nfeatures', 'kind = "svm"\nfeatures'), "heads[0].kind"),
    (('shots = [1, 2]', 'shots = [0]'), "ablation.shots"),
    (('manifest = "data/manifest.parquet"', 'manifest = "data/nowhere.parquet"'), "data.manifest"),
    (('[data]\nmanifest = "data/manifest.parquet"', '[data]'), "data.manifest"),
    (('seeds = 1', 'seeds = true'), "ablation.seeds"),
    (('pseudo_shots = true\n\n[ablation]', 'pseudo_shots = "yes"\n\n[ablation]'), "heads[0].pseudo_shots"),
    (('pseudo_shots = true\n\n[ablation]', 'pseudo_shots = true\nshots = 0\n\n[ablation]'), "heads[0].shots"),
])
def test_invalid_config_is_refused_before_any_work(tmp_path, demo_data, edit, key):
    """The library's one-line error naming the key (the CLI prints it, exit 2: the tests below)."""
    from phrasefuse.errors import BadInput
    from phrasefuse.run.pipeline import run_config

    text = TINY.format(spec="builtin:efficientnet-lite0", kind="linear").replace("work = \"work\"",
                                                                                  f"work = \"{tmp_path / 'w'}\"")
    assert edit[0] in text
    config = demo_data / f"bad-{key.replace('[', '').replace(']', '')}.toml"
    config.write_text(text.replace(edit[0], edit[1]))
    with pytest.raises(BadInput) as refused:
        next(run_config(config, progress=False))
    error = str(refused.value)
    assert f"'{key}'" in error and str(config) in error and "\n" not in error
    assert not (tmp_path / "w").exists()


def test_a_head_takes_shots_as_fuse_train_does(tmp_path, demo_data):
    """[[heads]] shots = K: the head `fuse train --shots K --seed S` trains (tests/fuse/test_fewshot.py)."""
    from phrasefuse.run.config import load_config

    text = TINY.format(spec="builtin:efficientnet-lite0", kind="linear")
    config = demo_data / "shots.toml"
    config.write_text(text.replace("pseudo_shots = true\n\n[ablation]", "pseudo_shots = true\nshots = 5\n\n[ablation]"))
    assert load_config(config).heads[0].shots == 5


def test_invalid_config_through_the_cli_exits_2_with_one_line(tmp_path, demo_data):
    text = TINY.format(spec="builtin:efficientnet-lite0", kind="linear").replace("work = \"work\"",
                                                                                  f"work = \"{tmp_path / 'w'}\"")
    config = tmp_path / "bad.toml"
    config.write_text(text.replace("k = 2", 'k = "two"'))
    proc = run_cli("run", config)
    assert proc.returncode == 2, proc.stderr
    assert "'phrases.k'" in proc.stderr and str(config) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_config_that_is_not_toml(tmp_path):
    config = tmp_path / "broken.toml"
    config.write_text("[data\nmanifest = ")
    proc = run_cli("run", config)
    assert proc.returncode == 2 and "not valid TOML" in proc.stderr


def test_example_config_is_valid():
    """manifests/example.toml and the demo's config parse (their paths need data, not checked here)."""
    from phrasefuse.run.config import load_config

    root = Path(__file__).resolve().parents[2]
    for name in ("example.toml", "demo.toml"):
        config = load_config(root / "manifests" / name)
        assert config.heads and config.ablation
