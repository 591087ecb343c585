"""Shared fixtures: no network, a tiny random open_clip model, generated datasets, the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# CI runs the suite once: property tests draw the same examples on every run (derandomize) and
# never fail by the machine's speed (no deadline, no too-slow health checks).
settings.register_profile("phrasefuse", derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile("phrasefuse")

# No model hub at test time: everything loads from installed packages or files the tests write.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


# The longest files first (measured with --durations; docs/architecture.md, Tests). Under `--dist loadfile` a
# worker takes the next file when it is done with one; a long file taken last would run alone at
# the end, so the wall time is shortest when the long ones start first (the Makefile turns off
# xdist's own order, by number of tests, which put the long few-test files last). Files not
# listed keep their order, after these.
LONGEST_FIRST = [
    "tests/extract/test_ray_engine.py",
    "tests/faults/test_interrupt_replicas.py",
    "tests/faults/test_interrupts.py",
    "tests/run/test_run.py",
    "tests/index/test_cli.py",
    "tests/extract/test_replicas.py",
    "tests/fuse/test_cli.py",
    "tests/faults/test_kill_points.py",
    "tests/fuse/test_train.py",
    "tests/extract/test_jobs.py",
    "tests/fuse/test_cli_ablate.py",
    "tests/extract/test_sources.py",
    "tests/faults/test_exit_status.py",
    "tests/test_predict.py",
    "tests/test_readme.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(LONGEST_FIRST)))  # stable: a file stays whole


def pytest_configure(config: pytest.Config) -> None:
    """Each xdist worker gets its share of the cores for torch/OpenMP, also passed to the CLI
    processes the tests start (set before any test module imports torch). With every worker's
    tiny-model ops spread over all the cores, the workers' threads wait on each other at every
    operator: several times slower than one thread each. NumPy's OpenBLAS keeps its default (every
    core; it would follow OMP_NUM_THREADS): its sums, so some heads' validation choices, depend on
    its thread count. LightGBM gets one thread (PHRASEFUSE_LGBM_THREADS). A value set by the caller
    is kept."""
    # LightGBM's sums, so its trees and any model text a test cuts or compares, depend on its thread
    # count: every head of the suite is trained with one thread, however many cores or workers run it.
    os.environ.setdefault("PHRASEFUSE_LGBM_THREADS", "1")
    if getattr(config.option, "numprocesses", None):
        return  # the xdist controller: it runs no test, and its workers must compute their own share
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(cores))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))


@pytest.fixture(scope="session")
def tiny_clip_config(tmp_path_factory) -> Path:
    """Path to an open_clip model-config JSON of a tiny random CLIP (spec: open_clip:PATH@)."""
    path = tmp_path_factory.mktemp("clip") / "tiny-test-clip.json"
    path.write_text(json.dumps(TINY_CLIP_CONFIG))
    return path


@pytest.fixture(scope="session")
def tiny_clip_spec(tiny_clip_config) -> str:
    return f"open_clip:{tiny_clip_config}@"


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory) -> Path:
    """60 generated JPEGs (6 shape classes) and their manifest.parquet; read-only for tests."""
    from phrasefuse.synthetic import generate_images

    return generate_images(tmp_path_factory.mktemp("shapes"), 60, seed=0, size=(96, 72))


def invoke_cli(*args, check: bool = False) -> subprocess.CompletedProcess:
    """The same `phrasefuse` CLI (`phrasefuse.cli.main`: parsing, exit status, one-line errors) run
    in this process: no interpreter start and no model-library import per call. For tests of a
    command's behaviour; every command also keeps tests through `run_cli`, the real process."""
    import contextlib
    import io
    import signal

    from phrasefuse.cli import main

    out, err = io.StringIO(), io.StringIO()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main([str(a) for a in args])
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    proc = subprocess.CompletedProcess(["phrasefuse", *map(str, args)], status, out.getvalue(), err.getvalue())
    if check and status != 0:
        raise AssertionError(f"phrasefuse {' '.join(map(str, args))} exited {status}:\n{proc.stderr}")
    return proc


def run_cli(*args: str, check: bool = False, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """The real `phrasefuse` CLI in a subprocess (as users and acceptance checks run it)."""
    proc = subprocess.run([sys.executable, "-m", "phrasefuse", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"phrasefuse {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc
