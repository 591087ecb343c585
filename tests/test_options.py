"""Options and exit statuses that no other test exercised, each by its effect: `import
--encoder-family/--modality/--dtype`, `export --json`, `demo --n` below its minimum, and exit 1
(one line; a traceback with PHRASEFUSE_DEBUG=1) on an unexpected failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from phrasefuse.cli import app
from phrasefuse.interop import export_npy
from phrasefuse.store import EmbeddingStore, StoreWriter, l2_normalize, new_meta
from tests.conftest import run_cli
from tests.index.conftest import random_encoder


def invoke(*args) -> str:
    """The CLI in this process (Typer's runner); its stdout."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def write_store(path, modality: str, n: int = 20, dim: int = 8, seed: int = 0) -> np.ndarray:
    emb = l2_normalize(np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32))
    ids = [f"row-{i:03d}" for i in range(n)]  # one metadata for both towers: the same rows
    meta = new_meta(modality=modality, encoder=random_encoder(dim), dtype="float32",
                    source={"manifest": "generated", "column": modality})
    with StoreWriter.open(path, meta, shard_size=8) as writer:
        writer.add(ids, ids, emb)
    return emb


@pytest.fixture(scope="module")
def both_modalities(tmp_path_factory):
    """An export folder holding img_emb/ and text_emb/ (as a batch inference over both towers
    writes), without the meta.json that would name an encoder."""
    folder = tmp_path_factory.mktemp("both")
    write_store(folder / "img", "image", seed=1)
    text = write_store(folder / "text", "text", seed=2)
    export_npy(folder / "img", folder / "a")
    export_npy(folder / "text", folder / "b")
    both = folder / "both"
    shutil.copytree(folder / "a", both)
    shutil.copytree(folder / "b" / "text_emb", both / "text_emb")
    (both / "meta.json").unlink()
    return both, text


def test_import_modality_encoder_family_and_dtype(both_modalities, tmp_path):
    folder, text = both_modalities
    # Both towers there: without --modality the import is refused (exit 2, one line).
    proc = run_cli("import", folder, "--out", tmp_path / "refused", "--encoder-name", "x", "--weights-sha256", "y")
    assert proc.returncode == 2 and "--modality" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    invoke("import", folder, "--out", tmp_path / "t", "--modality", "text", "--encoder-name", "web-clip",
           "--encoder-family", "open_clip", "--weights-sha256", "abc", "--dtype", "float16")
    store = EmbeddingStore(tmp_path / "t")
    assert store.meta["modality"] == "text" and store.dtype == "float16"
    assert {k: store.meta["encoder"][k] for k in ("family", "name", "weights_sha256")} == \
        {"family": "open_clip", "name": "web-clip", "weights_sha256": "abc"}
    table = store.read_table()
    assert table.schema.field("emb").type.value_type == pa.float16()
    # The text tower's vectors, not the image tower's (same ids in both).
    np.testing.assert_allclose(store.embeddings()[1].astype(np.float32), text, atol=2e-3)


def test_export_json_is_one_document(both_modalities, tmp_path):
    folder, _ = both_modalities
    summary = json.loads(invoke("export", folder.parent / "img", "--format", "npy", "--out", tmp_path / "e",
                                "--json"))  # json.loads: nothing else on stdout
    assert summary["rows"] == 20 and summary["files"] == 3 and summary["dim"] == 8
    assert sorted(p.name for p in (tmp_path / "e" / "img_emb").iterdir()) == [f"img_emb_{n:05d}.npy" for n in range(3)]


def test_demo_refuses_too_few_images_before_any_work(tmp_path):
    proc = run_cli("demo", "--work", tmp_path / "demo", "--n", 5)
    assert proc.returncode == 2 and proc.stdout == ""
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("phrasefuse: error: --n 5: the demo needs at least")
    assert not (tmp_path / "demo").exists() or not any((tmp_path / "demo").iterdir())  # nothing generated


@pytest.mark.parametrize("debug", [False, True])
def test_an_unexpected_failure_exits_1_with_one_line_or_a_traceback_when_debugging(both_modalities, tmp_path, debug):
    folder, _ = both_modalities
    # A failure no check anticipates, planted after the first shard (phrasefuse/faultpoints.py).
    env = {**os.environ, "PHRASEFUSE_FAULT": "shard-written@1:fail"}
    env.pop("PHRASEFUSE_DEBUG", None)
    if debug:
        env["PHRASEFUSE_DEBUG"] = "1"
    proc = subprocess.run([sys.executable, "-m", "phrasefuse", "import", str(folder), "--out", str(tmp_path / "s"),
                           "--modality", "image", "--encoder-name", "x", "--weights-sha256", "y", "--shard-size", "8"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    if debug:
        assert lines[0] == "Traceback (most recent call last):" and lines[-1].startswith("RuntimeError: fault point")
    else:
        assert lines == ["phrasefuse: failed: RuntimeError: fault point shard-written (test fault PHRASEFUSE_FAULT) "
                         "(set PHRASEFUSE_DEBUG=1 for a traceback)"]
    assert EmbeddingStore(tmp_path / "s").num_rows() >= 8  # what was written before the failure is kept
