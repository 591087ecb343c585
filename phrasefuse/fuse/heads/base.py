"""What every head shares: the task, the input transform (block normalisation, lgbm's
discriminant projections) and `FittedHead`, the base class of the registered head kinds
(heads/__init__.py HEADS). A kind's class attributes say what it can do; its methods fit,
predict and export its state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np

from phrasefuse.fuse.data import Blocks, BlockNorm, Task

SMALL_WORK = 1_000_000  # values per step (torch) or in the training matrix (lgbm): below, one thread


@dataclass
class Align:
    """Frozen label-description embeddings (C, d), unit rows, and the InfoNCE weight W."""

    targets: np.ndarray
    weight: float


# ---------------------------------------------------------------- input transform


@dataclass
class Transform:
    """Block normalisation (all heads) and, for lgbm, a per-block projection on its most
    discriminant directions, fitted on the training rows."""

    norm: BlockNorm
    axes: list[np.ndarray] | None = None  # (dim, k) per block (lgbm)

    @classmethod
    def fit(cls, blocks: Blocks, components: int | None = None, y: np.ndarray | None = None,
            num_classes: int = 0) -> "Transform":
        norm = BlockNorm.fit(blocks)
        if not components:
            return cls(norm)
        axes = []
        for j, x in enumerate(blocks.arrays):
            have = blocks.present[:, j]
            rows = (x[have] - norm.mean[j]) / norm.rms[j]
            axes.append(discriminant_axes(rows, y[have], num_classes, min(components, x.shape[1])))
        return cls(norm, axes)

    def select(self, which: Sequence[int]) -> "Transform":
        return Transform(self.norm.select(which), None if self.axes is None else [self.axes[j] for j in which])

    def widths(self, block_dims: Sequence[int]) -> list[int]:
        """Columns per block in the design matrix (coordinates + the missing indicator)."""
        if self.axes is None:
            return [d + 1 for d in block_dims]
        return [a.shape[1] + 1 for a in self.axes]

    def apply(self, blocks: Blocks, scales: Sequence[float] | None = None) -> np.ndarray:
        design = self.norm.apply(blocks, scales)
        if self.axes is None:
            return design
        parts, offset = [], 0
        for j, x in enumerate(blocks.arrays):
            d = x.shape[1]
            parts.append(design[:, offset:offset + d] @ self.axes[j])
            parts.append(design[:, offset + d:offset + d + 1])
            offset += d + 1
        return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)

    def tensors(self) -> dict[str, np.ndarray]:
        out = self.norm.tensors()
        for j, a in enumerate(self.axes or []):
            out[f"axes.{j}"] = a.astype(np.float32)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], n_blocks: int) -> "Transform":
        axes = [tensors[f"axes.{j}"] for j in range(n_blocks)] if "axes.0" in tensors else None
        return cls(BlockNorm.from_tensors(tensors, n_blocks), axes)


def discriminant_axes(rows: np.ndarray, y: np.ndarray, num_classes: int, k: int) -> np.ndarray:
    """(dim, k): the k directions that best separate the classes (or labels) relative to the
    total spread (shrunk LDA: top eigenvectors of St^-1 Sb), signs fixed.

    Trees split one coordinate at a time: on raw embedding coordinates (or on principal
    components, which follow variance, not classes) they need hundreds of features and
    rounds; a few discriminant directions carry the class signal, and a boosting round
    costs in proportion to the number of features.
    """
    n, d = rows.shape
    if n < 2:
        return np.eye(d, k, dtype=np.float32)
    x = rows.astype(np.float32)
    centred = x - x.mean(axis=0)
    total = (centred.T @ centred).astype(np.float64) / n
    shrink = d / (n + d)  # few rows (few shots): lean on the identity
    total = (1 - shrink) * total + shrink * np.trace(total) / d * np.eye(d)
    if y.ndim == 1:  # class means
        onehot = np.zeros((n, num_classes), np.float32)
        onehot[np.arange(n)[y >= 0], y[y >= 0]] = 1.0
    else:  # multi-label: the mean of the rows carrying each label
        onehot = (y > 0.5).astype(np.float32)
    counts = onehot.sum(axis=0).astype(np.float64)
    means = (onehot.T @ centred).astype(np.float64) / np.maximum(counts, 1)[:, None]
    between = (means * counts[:, None]).T @ means / n
    inv_chol = np.linalg.inv(np.linalg.cholesky(total))
    values, vectors = np.linalg.eigh(inv_chol @ between @ inv_chol.T)
    axes = inv_chol.T @ vectors[:, np.argsort(values)[::-1][:k]]
    signs = np.sign(axes[np.argmax(np.abs(axes), axis=0), np.arange(axes.shape[1])])
    axes = axes * np.where(signs == 0, 1, signs)
    if axes.shape[1] < k:
        axes = np.concatenate([axes, np.zeros((d, k - axes.shape[1]))], axis=1)
    return axes.astype(np.float32)


# ---------------------------------------------------------------- fitted heads


@dataclass
class FittedHead:
    """A trained head over some feature blocks, ready to predict. One subclass per head kind."""

    kind: ClassVar[str] = ""
    defaults: ClassVar[dict] = {}  # hyper-parameters (head_params overrides them)
    # Text trust learned while fitting (the mlp's gates and modality dropout); otherwise each
    # text block's trust scale is tuned on a grid (select.tune_trust).
    learns_trust: ClassVar[bool] = False
    # Each block projected on its most discriminant directions before fitting (lgbm).
    uses_projections: ClassVar[bool] = False
    # Can pull its image projection toward label-description embeddings (--align-descriptions).
    aligns_descriptions: ClassVar[bool] = False

    task: Task
    transform: Transform
    roles: list[str]  # "image" | "text" per block
    scales: list[float]  # trust scale per block (linear, lgbm); 1 for mlp (it learns gates)
    params: dict
    steps: int = 0  # optimiser steps (torch) or boosting rounds (lgbm) actually used

    @classmethod
    def components(cls, params: dict) -> int | None:
        """Discriminant directions per block for `Transform.fit` (None: no projection)."""
        return params.get("components") if cls.uses_projections else None

    @classmethod
    def fit(cls, blocks: Blocks, y: np.ndarray, task: Task, roles: Sequence[str], scales: Sequence[float],
            params: dict, seed: int, stop: tuple[Blocks, np.ndarray] | None = None, steps: int | None = None,
            transform: Transform | None = None, align: Align | None = None) -> "FittedHead":
        """Fit one head on `blocks` (only the blocks it uses) and labels `y`.

        `stop`: (blocks, y) to stop early on; else run `steps` steps/rounds (or the
        default). `transform`: already fitted on these training rows (reused across a
        tuning grid); fitted here otherwise.
        """
        if transform is None:
            transform = Transform.fit(blocks, cls.components(params), y, task.num_classes)
        head = cls(task, transform, list(roles), [float(s) for s in scales], dict(params), 0)
        head.train(blocks, y, seed, stop, steps, align)
        return head

    @classmethod
    def restore(cls, arch: dict, task: Task, tensors: dict[str, np.ndarray], files: dict[str, str]) -> "FittedHead":
        """The inverse of `state` + `architecture`."""
        transform = Transform.from_tensors(tensors, len(arch["roles"]))
        head = cls(task, transform, list(arch["roles"]), [float(s) for s in arch["scales"]], dict(arch["params"]),
                   int(arch["steps"]))
        head.load(arch, tensors, files)
        return head

    @classmethod
    def refit_steps(cls, fold_steps: Sequence[int], fold_rows: Sequence[int], pool_rows: int, params: dict) -> int:
        """Steps for the final fit on the whole pool, from those each cross-validation fold used."""
        raise NotImplementedError

    def train(self, blocks: Blocks, y: np.ndarray, seed: int, stop: tuple[Blocks, np.ndarray] | None,
              steps: int | None, align: Align | None) -> None:
        """Fit this head's weights in place (and set `steps`)."""
        raise NotImplementedError

    def load(self, arch: dict, tensors: dict[str, np.ndarray], files: dict[str, str]) -> None:
        """Set this head's weights from its saved state."""
        raise NotImplementedError

    def predict(self, blocks: Blocks) -> np.ndarray:
        """Probabilities (n, C): softmax for multi-class, sigmoid per label for multi-label."""
        raise NotImplementedError

    def trust(self) -> list[float]:
        """Per block: the text trust the head uses (its scale, or a learned gate)."""
        return list(self.scales)

    def weights(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """This kind's own (tensors, text files) for `state`."""
        raise NotImplementedError

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """(tensors for safetensors, text files by name) that `restore` turns back into this head."""
        tensors = self.transform.tensors()
        tensors["scales"] = np.asarray(self.scales, np.float32)
        own_tensors, files = self.weights()
        tensors.update(own_tensors)
        return tensors, files

    def architecture(self) -> dict:
        """What `restore` needs besides the tensors (kept in meta.json)."""
        return {"kind": self.kind, "roles": self.roles, "scales": self.scales, "steps": self.steps,
                "widths": self.widths, "params": self.params}

    @property
    def widths(self) -> list[int]:
        return self.transform.widths([m.shape[0] for m in self.transform.norm.mean])
