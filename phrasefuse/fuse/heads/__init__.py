"""The three heads, on arrays: fit on feature blocks, predict probabilities, export state.

  linear  multinomial logistic regression (softmax; sigmoid per label for multi-label) on the
          concatenated normalised blocks, each text block multiplied by its trust scale.
  mlp     per block a linear projection ("tuning") layer, a learned scalar gate on each text
          block, modality dropout (a whole text block dropped, its missing indicator set, so
          the head learns to do without it), concatenation, a hidden layer plus a linear skip
          path; input dropout regularises (on bench/fuse.py's 400 rows per class, a plain MLP on
          1,280-dim vectors ended ~25 points below the linear probe); optional InfoNCE
          alignment of the image projection to frozen label-description embeddings.
  lgbm    LightGBM on each block projected on its most discriminant directions (see
          `discriminant_axes`); the trust scale of a text block is its `feature_contri`
          (split-gain multiplier); multi-class softmax, one-vs-rest boosters for multi-label.

Each kind is a class registered in HEADS (base.FittedHead's subclasses); its class attributes
say what it can do (`learns_trust`, `uses_projections`, `aligns_descriptions`), so callers ask
the class, never the kind's name. Modules: base.py (task, input transform, FittedHead),
torch_heads.py (linear, mlp and their training loop), nets.py (the torch networks), lgbm.py.

Everything a head needs to predict (block normalisation, projections, weights) is in
`state()`: safetensors tensors plus, for LightGBM, its own text model format. Nothing is
pickled.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from phrasefuse.fuse.data import Blocks
from phrasefuse.fuse.heads.base import SMALL_WORK, Align, FittedHead, Task, Transform, discriminant_axes
from phrasefuse.fuse.heads.lgbm import LgbmHead
from phrasefuse.fuse.heads.torch_heads import LinearHead, MlpHead, TorchHead, batch_size_for

HEADS: dict[str, type[FittedHead]] = {cls.kind: cls for cls in (LinearHead, MlpHead, LgbmHead)}

__all__ = ["HEADS", "SMALL_WORK", "Align", "FittedHead", "LgbmHead", "LinearHead", "MlpHead", "Task", "TorchHead",
           "Transform", "batch_size_for", "discriminant_axes", "fit", "head_params", "restore"]


def head_params(kind: str, overrides: dict | None = None) -> dict:
    """The kind's default hyper-parameters with `overrides` (None values ignored) on top."""
    params = dict(HEADS[kind].defaults)
    params.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return params


def fit(kind: str, blocks: Blocks, y: np.ndarray, task: Task, roles: Sequence[str], scales: Sequence[float],
        params: dict, seed: int, stop: tuple[Blocks, np.ndarray] | None = None, steps: int | None = None,
        transform: Transform | None = None, align: Align | None = None) -> FittedHead:
    """A head of `kind` fitted on `blocks` (see FittedHead.fit)."""
    return HEADS[kind].fit(blocks, y, task, roles, scales, params, seed, stop, steps, transform, align)


def restore(arch: dict, task: Task, tensors: dict[str, np.ndarray], files: dict[str, str]) -> FittedHead:
    """The inverse of `FittedHead.state` + `architecture` (an unknown kind: KeyError)."""
    return HEADS[arch["kind"]].restore(arch, task, tensors, files)
