"""`run` reusing an index or a query image store made elsewhere ([phrases] index / query_store): the
corpus embedded once is read by other work folders, never written; its encoder must be the run's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import invoke_cli, run_cli

CONFIG = """
work = "{work}"

[data]
manifest = "data/manifest.parquet"

[encoders]
image = "{spec}"
text = "{text_spec}"
batch_size = 32
workers = 0

[phrases]
{phrases}
k = 2

[[heads]]
name = "h"
kind = "linear"
features = ["image", "phrases"]
"""


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_clip_spec) -> Path:
    """A run that built its own query store and index (WORK/stores/query-image, WORK/index) in
    `first/work`, beside the demo data."""
    from phrasefuse.synthetic import generate_demo

    folder = tmp_path_factory.mktemp("reuse")
    generate_demo(folder / "data", n=60, n_query=40)
    config = write(folder, "first.toml", "first/work", tiny_clip_spec,
                   'pairs = "data/pairs.parquet"\nimages = "data/query_manifest.parquet"')
    stages = run_stages(config)
    assert stages["index"]["status"] == "ran" and stages["extract query images"]["summary"]["embedded"] == 40
    return folder


def write(folder: Path, name: str, work: str, spec: str, phrases: str, text_spec: str | None = None) -> Path:
    path = folder / name
    path.write_text(CONFIG.format(work=work, spec=spec, text_spec=text_spec or spec, phrases=phrases))
    return path


def run_stages(config: Path) -> dict[str, dict]:
    proc = invoke_cli("run", config, "--json")
    assert proc.returncode == 0, proc.stderr
    return {s["stage"]: s for s in json.loads(proc.stdout)["stages"]}


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` (hidden ones too): its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_reuses_another_runs_index(first_run, tiny_clip_spec):
    from phrasefuse.store import EmbeddingStore

    index = first_run / "first" / "work" / "index"
    before = snapshot(index)
    config = write(first_run, "second.toml", "second/work", tiny_clip_spec, 'index = "first/work/index"')
    proc = invoke_cli("run", config)  # the text the user reads
    assert proc.returncode == 0, proc.stderr
    assert f"[reused] index: the index {index} (" in proc.stdout  # as the stage, and again at the end:
    assert f"index: reused {index}\n" in proc.stdout
    work = first_run / "second" / "work"
    assert not (work / "index").exists() and not (work / "stores" / "query-image").exists()
    phrases = EmbeddingStore(work / "stores" / "phrases")
    assert phrases.num_rows() == 60 and phrases.meta["phrases"]["index"] == str(index)
    assert (work / "predictions" / "h.parquet").is_file()

    again = run_stages(config)  # nothing changed: every stage skipped, the index said reused again
    assert again.pop("index") == {"stage": "index", "status": "reused", "summary": {
        "reused_from": str(index), "build_id": json.loads((index / "meta.json").read_text())["build_id"]}}
    assert {s["status"] for s in again.values()} == {"skipped"}
    assert snapshot(index) == before  # read, never written

    # The index rebuilt where it is (another build id, other files): this run's phrases are made again.
    run_stages(write(first_run, "first-again.toml", "first/work", tiny_clip_spec,
                     'pairs = "data/pairs.parquet"\nimages = "data/query_manifest.parquet"\nmin_images = 2'))
    third = run_stages(config)
    assert third["phrases"]["status"] == "ran" and third["phrases"]["summary"]["written"] == 60


def test_a_run_reuses_a_query_store_and_builds_its_index(first_run, tiny_clip_spec):
    store = first_run / "first" / "work" / "stores" / "query-image"
    before = snapshot(store)
    config = write(first_run, "third.toml", "third/work", tiny_clip_spec,
                   'pairs = "data/pairs.parquet"\nquery_store = "first/work/stores/query-image"')
    stages = run_stages(config)
    assert stages["extract query images"] == {"stage": "extract query images", "status": "reused",
                                              "summary": {"reused_from": str(store)}}
    assert stages["index"]["status"] == "ran" and stages["phrases"]["status"] == "ran"
    work = first_run / "third" / "work"
    assert not (work / "stores" / "query-image").exists()
    meta = json.loads((work / "index" / "meta.json").read_text())
    assert meta["images"] == {"store": str(store), "rows": 40}  # built from the reused store
    assert snapshot(store) == before


def test_a_reused_index_of_another_image_encoder_is_refused(first_run, tiny_clip_config, tiny_clip_spec, tmp_path):
    other = tmp_path / "other-clip.json"
    other.write_text(json.dumps({**json.loads(tiny_clip_config.read_text()), "embed_dim": 16}))
    config = write(first_run, "other.toml", str(tmp_path / "w"), f"open_clip:{other}@", 'index = "first/work/index"',
                   text_spec=tiny_clip_spec)
    proc = run_cli("run", config)
    assert proc.returncode == 2, proc.stderr
    # the error's one line (open_clip warns, on its own line, that the tiny test model has random weights)
    lines = [x for x in proc.stderr.strip().splitlines() if not x.startswith("WARNING:root:No pretrained weights")]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert "'phrases.index'" in line and str(config) in line
    assert f"open_clip:{other}@ (dim 16" in line and f"{tiny_clip_spec} (dim 32" in line  # both encoders named
    assert not (tmp_path / "w" / "stores" / "phrases").exists()  # refused before the phrases
    # A second try is refused before any work: the run's image store vouches for the encoder.
    from phrasefuse.run.pipeline import run_config
    from phrasefuse.errors import BadInput

    with pytest.raises(BadInput, match="'phrases.index'"):
        next(run_config(config, progress=False))


@pytest.mark.parametrize("phrases, key", [
    ('index = "first/work/index"\npairs = "data/pairs.parquet"', "phrases.pairs"),
    ('index = "first/work/index"\nimages = "data/query_manifest.parquet"', "phrases.images"),
    ('query_store = "first/work/stores/query-image"\npairs = "data/pairs.parquet"\n'
     'images = "data/query_manifest.parquet"', "phrases.images"),
    ('min_images = 1', "phrases.pairs"),  # neither pairs nor index
    ('index = "first/work/stores/query-image"', "phrases.index"),  # a store is no index
    ('pairs = "data/pairs.parquet"\nquery_store = "first/work/index"', "phrases.query_store"),  # nor the reverse
    ('index = "first/nowhere"', "phrases.index"),
])
def test_conflicting_or_wrong_reuse_keys_are_one_line_exit_2(first_run, tiny_clip_spec, tmp_path, phrases, key):
    config = write(first_run, "bad.toml", str(tmp_path / "w"), tiny_clip_spec, phrases)
    proc = run_cli("run", config)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"'{key}'" in proc.stderr and str(config) in proc.stderr
    assert not (tmp_path / "w").exists()  # before any work
    if key == "phrases.pairs" and "index" in phrases:
        assert "drop 'pairs' to reuse that index, or drop 'index' to build one" in proc.stderr
