"""Exit 2 (one line naming the file, row, column or key) where the contract says bad input, before
any work where a config check can tell; data that must not silently change does not. The CLI runs
in-process through `cli.main` (its exit status and stderr are the point; no subprocess needed)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phrasefuse import cli
from phrasefuse.errors import MAX_SEED, BadInput
from phrasefuse.store import EmbeddingStore
from tests.faults.test_tampered_heads import write_data


def run_main(capsys, *args) -> tuple[int, list[str]]:
    """(exit status, stderr lines) of `phrasefuse ARGS` run in this process (its signal handlers,
    which `cli.main` installs, are put back after)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([str(a) for a in args])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    err = capsys.readouterr().err
    return exit_info.value.code, [ln for ln in err.splitlines() if ln.startswith("phrasefuse:")]


@contextlib.contextmanager
def read_only_folder(folder: Path):
    """A folder no one may write into: a read-only tmpfs (root ignores chmod), else chmod 555."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                                                   capture_output=True).returncode == 0
    if not mounted:
        folder.chmod(0o555)
    try:
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        else:
            folder.chmod(0o755)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from phrasefuse.fuse.train import train_head

    folder = tmp_path_factory.mktemp("exit2")
    manifest, img = write_data(folder, n=160)
    train_head(str(manifest), [f"image={img}"], folder / "head", kind="linear", seed=0)
    t = pq.read_table(manifest)
    pq.write_table(pa.table({"query": t["label"], "image_id": t["id"]}), folder / "pairs.parquet")
    (folder / "a_file").write_text("x")
    (folder / "a_dir").mkdir()
    return folder


def commands(d: Path, out: Path) -> dict[str, list]:
    m, img = d / "manifest.parquet", d / "img"
    return {
        "fuse train": ["fuse", "train", "--manifest", m, "--feature", f"image={img}", "--head", "linear", "--out", out],
        "index build": ["index", "build", "--pairs", d / "pairs.parquet", "--images", img, "--out", out],
        "export": ["export", img, "--out", out],
        "ablate": ["fuse", "ablate", "--manifest", m, "--feature", f"image={img}", "--head", "linear", "--seeds", "1",
                   "--out", out],
    }


@pytest.mark.parametrize("name", ["fuse train", "index build", "export", "ablate"])
def test_outputs_under_a_file_or_in_a_read_only_folder_exit_2(capsys, data, tmp_path, name):
    status, lines = run_main(capsys, *commands(data, data / "a_file" / "out")[name])
    assert status == 2 and len(lines) == 1 and "a_file" in lines[0], lines
    with read_only_folder(tmp_path / "ro") as ro:
        status, lines = run_main(capsys, *commands(data, ro / "out")[name])
        assert status == 2 and len(lines) == 1 and str(ro) in lines[0], lines
        assert not list(ro.iterdir())


def test_ablate_out_a_file_and_predict_out_a_folder_exit_2(capsys, data):
    status, lines = run_main(capsys, *commands(data, data / "a_file")["ablate"])
    assert status == 2 and "a_file" in lines[0]
    status, lines = run_main(capsys, "predict", data / "head", "--manifest", data / "manifest.parquet",
                             "--out", data / "a_dir")
    assert status == 2 and "a_dir" in lines[0] and "is a folder" in lines[0]


@pytest.mark.parametrize("seed", [2**64 + 1, -1, MAX_SEED + 1])
def test_seeds_every_library_cannot_take_exit_2(capsys, data, seed):
    args = commands(data, data / "never")["fuse train"] + ["--seed", seed]
    status, lines = run_main(capsys, *args)
    assert status == 2 and "--seed" in lines[0]
    assert not (data / "never").exists()
    status, lines = run_main(capsys, *commands(data, data / "never")["ablate"][:-4], "--seeds", "3", "--seed",
                             MAX_SEED - 1)
    assert status == 2 and "--seed" in lines[0]


def test_a_user_column_named_like_phrasefuse_s_own_is_refused(tmp_path):
    from phrasefuse.manifests import read_manifest

    for name in ("_file", "_row"):
        pq.write_table(pa.table({"id": ["a"], name: ["x"]}), tmp_path / f"m{name}.parquet")
        with pytest.raises(BadInput, match=f"column '{name}' is reserved"):
            read_manifest(tmp_path / f"m{name}.parquet")


def write_config(tmp_path: Path, manifest: Path, extra_data: str = "", heads: str = "", encoders: str = "") -> Path:
    config = tmp_path / "c.toml"
    config.write_text(f'work = "w"\n[data]\nmanifest = "{manifest}"\n{extra_data}\n[encoders]\n'
                      f'image = "open_clip:/nowhere.json@"\n{encoders}\n{heads}')
    return config


@pytest.mark.parametrize("extra_data,heads,encoders,key", [
    ('text_columns = ["nope"]', "", "", "data.text_columns"),
    ('text_columns = ["query-image"]', "", "", "data.text_columns"),
    ('label_col = "nope"', "", "", "data.label_col"),
    ("", '[[heads]]\nname = "h"\nkind = "mlp"\nalign_descriptions = -0.5', "", "heads[0].align_descriptions"),
    ("", '[[heads]]\nname = "h"\nkind = "lgbm"\nalign_descriptions = 0.5', "", "heads[0].align_descriptions"),
    ("", '[[heads]]\nname = "h"\nkind = "linear"\nseed = 18446744073709551617', "", "heads[0].seed"),
    ("", "", "max_aspect_ratio = 0", "encoders.max_aspect_ratio"),
    ("", "", 'max_image_mb = "big"', "encoders.max_image_mb"),
    ("", "", "workers = -1", "encoders.workers"),
])
def test_config_mistakes_are_refused_before_any_work(capsys, data, tmp_path, extra_data, heads, encoders, key):
    config = write_config(tmp_path, data / "manifest.parquet", extra_data, heads, encoders)
    status, lines = run_main(capsys, "run", config)
    assert status == 2 and len(lines) == 1 and f"'{key}'" in lines[0], lines
    assert not (tmp_path / "w").exists()  # refused before the work folder (or a model) was touched


def test_a_recursive_manifest_glob_is_accepted_by_the_config_as_by_the_cli(data, tmp_path):
    from phrasefuse.run.config import load_config
    from phrasefuse.run.pipeline import check_inputs, files_fingerprint

    nested = tmp_path / "parts" / "a" / "b"
    nested.mkdir(parents=True)
    (nested / "m.parquet").write_bytes((data / "manifest.parquet").read_bytes())
    config = write_config(tmp_path, "parts/**/*.parquet")
    check_inputs(load_config(config))  # no "does not exist"
    assert files_fingerprint(tmp_path / "parts/**/*.parquet") != files_fingerprint(tmp_path / "parts/*.parquet")


def test_a_work_path_that_is_a_file_exits_2(capsys, data, tmp_path):
    (tmp_path / "w").write_text("not a folder")
    status, lines = run_main(capsys, "run", write_config(tmp_path, data / "manifest.parquet"))
    assert status == 2 and "'work'" in lines[0], lines


def npy_folder(folder: Path, emb: np.ndarray, ids: list[str]) -> Path:
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    np.save(folder / "img_emb" / "img_emb_0.npy", emb)
    pq.write_table(pa.table({"id": ids}), folder / "metadata" / "metadata_0.parquet")
    return folder


@pytest.mark.parametrize("scale", [1e20, 1e-25, 1e30])
def test_import_keeps_the_direction_of_vectors_whose_norm_overflows_in_float32(tmp_path, scale):
    from phrasefuse.interop import import_npy

    base = np.random.default_rng(0).normal(size=(4, 32))
    emb = (base * scale).astype(np.float32)
    assert np.isfinite(emb).all()
    import_npy(npy_folder(tmp_path / "x", emb, list("abcd")), tmp_path / "st", encoder_name="X", weights_sha256="s")
    ids, stored = EmbeddingStore(tmp_path / "st").embeddings()
    expected = base / np.linalg.norm(base, axis=1, keepdims=True)
    np.testing.assert_allclose(stored, expected, atol=1e-5)


@pytest.mark.parametrize("bad_id", ["", "   "])
def test_import_refuses_an_empty_id_like_manifests(tmp_path, bad_id):
    from phrasefuse.interop import import_npy

    folder = npy_folder(tmp_path / "x", np.eye(3, dtype=np.float32), ["a", bad_id, "c"])
    with pytest.raises(BadInput, match="row 1 has no 'id'"):
        import_npy(folder, tmp_path / "st", encoder_name="X", weights_sha256="s")
    assert not EmbeddingStore(tmp_path / "st").shard_paths()


def test_pairs_ids_are_compared_exactly(tmp_path):
    from phrasefuse.index.pairs import read_pairs

    pq.write_table(pa.table({"query": ["second", "first", "blank"], "image_id": [" a", "a", "  "]}),
                   tmp_path / "pairs.parquet")
    data = read_pairs(tmp_path / "pairs.parquet", pa.array(["a", " a"]), True)
    phrases = data.phrases.to_pylist()
    image_of = dict(zip([phrases[p] for p in data.phrase], data.image_row.tolist()))
    assert image_of == {"second": 1, "first": 0}  # " a" is the store's second id, not "a"
    assert data.counts.no_image_id == 1


def test_json_lines_with_mixed_types_are_read_as_text_or_refused(tmp_path):
    from phrasefuse.extract.jobs import text_column
    from phrasefuse.manifests import read_manifest

    (tmp_path / "m.jsonl").write_text('{"id":"a","label":1,"title":"red ball","tags":["x", 1]}\n'
                                      '{"id":"b","label":"1","title":"red ball","tags":[2]}\n'
                                      '{"id":"c","label":2,"title":7,"tags":null}\n')
    m = read_manifest(tmp_path / "m.jsonl")
    assert m.table["label"].to_pylist() == ["1", "1", "2"]
    assert text_column(m, "title").to_pylist() == ["red ball", "red ball", "7"]
    assert text_column(m, "tags").to_pylist() == ["x, 1", "2", None]
    (tmp_path / "n.jsonl").write_text('{"id":"a","label":"x"}\n{"id":"b","label":["x"]}\n')
    with pytest.raises(BadInput, match=r"n.jsonl: row 2: column 'label' mixes lists"):
        read_manifest(tmp_path / "n.jsonl")


@pytest.mark.parametrize("weights", [[1e300, 2e300, 1e300], [1e-300, 3e-300, 1e-300], [1e45, 1e45, 1e45]])
def test_prototype_weights_that_under_or_overflow_float32_keep_the_phrase(weights):
    from phrasefuse.index.prototypes import prototypes

    emb = np.eye(3, dtype=np.float32)
    protos, ok = prototypes(np.array([0, 0, 0]), np.array([0, 1, 2]), emb, 1, np.array(weights))
    w = np.asarray(weights) / max(weights)
    assert ok.all()
    np.testing.assert_allclose(protos[0], w / np.linalg.norm(w), atol=1e-6)


def test_a_text_feature_with_no_text_at_all_says_so(tmp_path):
    from phrasefuse.fuse.data import Feature, load_blocks
    from phrasefuse.store import StoreWriter, new_meta
    from tests.faults.test_tampered_heads import _encoder

    meta = new_meta(modality="text", encoder=_encoder(4), dtype="float32", source={"column": "title"})
    with StoreWriter.open(tmp_path / "title", meta) as w:
        w.add_errors(["a", "b"], ["missing text", "empty text"])
    with pytest.raises(BadInput, match="has no vectors at all"):
        load_blocks([Feature("title", EmbeddingStore(tmp_path / "title"))], pa.array(["a", "b"]), "m.parquet")


def test_forked_children_leave_ctrl_c_to_the_main_process():
    """A Ctrl-C in a terminal reaches every process of the group: a forked helper (decode worker)
    must neither raise nor print; the main process alone says 'interrupted' once."""
    from phrasefuse.extract.images import worker_init

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, cli._interrupt)
    try:
        pid = os.fork()
        if pid == 0:  # the child: its inherited handler must ignore the signal
            code = 0
            try:
                os.kill(os.getpid(), signal.SIGINT)
                worker_init(0)
                code = 0 if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else 3
            except BaseException:  # noqa: BLE001
                code = 4
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        with pytest.raises(cli.Interrupted):  # the main process itself still stops
            cli._interrupt(signal.SIGINT, None)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def test_ctrl_c_to_the_whole_process_group_with_decode_workers_exits_130_with_one_line(fault_dataset, tiny_clip_spec,
                                                                                        tmp_path):
    """As a terminal does: SIGINT to the main process and its DataLoader workers at once, while the
    job is paused at a known point (rows buffered, workers alive)."""
    from tests.faults.conftest import pause_at

    proc = pause_at("rows-buffered@6", "extract", "images", fault_dataset, "--out", tmp_path / "img", "--model",
                    tiny_clip_spec, "--workers", "2", "--batch-size", "1", "--shard-size", "4",
                    mark_dir=tmp_path, sigint=True, start_new_session=True)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if not ln.startswith("WARNING:root:No pretrained weights")]
    assert len(lines) == 1 and lines[0].startswith("phrasefuse: interrupted"), stderr
