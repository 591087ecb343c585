"""The head registry: HEADS and the names the CLI offers agree, each kind's class says what it
can do, and fitting through the registry gives a head of that class that restores from its state."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from phrasefuse.fuse import HEAD_KINDS
from phrasefuse.fuse.data import Blocks, Task
from phrasefuse.fuse.heads import HEADS, LgbmHead, LinearHead, fit, head_params, restore


def test_the_cli_kinds_are_the_registered_heads():
    assert HEAD_KINDS == tuple(HEADS)
    assert all(cls.kind == kind for kind, cls in HEADS.items())


def test_the_cli_starts_without_numpy_or_torch():
    # Why HEAD_KINDS is spelled out in phrasefuse/fuse/__init__.py, not read from HEADS.
    code = "import sys, phrasefuse.cli; print(sorted({'numpy', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_each_kind_says_what_it_can_do():
    assert [k for k, c in HEADS.items() if c.learns_trust] == ["mlp"]
    assert [k for k, c in HEADS.items() if c.uses_projections] == ["lgbm"]
    assert [k for k, c in HEADS.items() if c.aligns_descriptions] == ["mlp"]
    assert LgbmHead.components({"components": 8}) == 8 and LinearHead.components({"components": 8}) is None
    # Boosting rounds see every row; optimiser steps scale with the batches of the pool.
    assert LgbmHead.refit_steps([10, 20], [50, 50], 100, head_params("lgbm")) == 15
    params = head_params("linear", {"batch_size": 10})
    assert LinearHead.refit_steps([5, 5], [50, 50], 100, params) == 10  # 1 epoch of 5 batches -> 10 batches


@pytest.mark.parametrize("kind", list(HEAD_KINDS))
def test_a_head_fitted_through_the_registry_restores_from_its_state(kind):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    image = (np.eye(3, 6)[y] + 0.3 * rng.standard_normal((60, 6))).astype(np.float32)
    text = rng.standard_normal((60, 4)).astype(np.float32)
    blocks = Blocks([image, text], np.ones((60, 2), bool))
    task = Task(["a", "b", "c"], False)
    params = head_params(kind, {"components": 2, "min_data_in_leaf": 2, "proj_dim": 8, "hidden": 8})
    head = fit(kind, blocks, y, task, ["image", "text"], [1.0, 0.5], params, seed=0, steps=20)
    assert type(head) is HEADS[kind] and head.steps > 0
    tensors, files = head.state()
    again = restore(head.architecture(), task, tensors, files)
    assert type(again) is HEADS[kind]
    np.testing.assert_allclose(again.predict(blocks), head.predict(blocks), atol=1e-6)
    assert np.mean(np.argmax(head.predict(blocks), 1) == y) > 0.7  # chance: 1/3
    assert len(head.trust()) == 2 and (head.trust()[1] == 0.5) == (not HEADS[kind].learns_trust)
