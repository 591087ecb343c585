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

Torch heads train with AdamW on mini-batches and stop early on a validation set (or run a
given number of steps, chosen by cross-validation, when there is none). Everything a head
needs to predict (block normalisation, projections, weights) is in `state()`: safetensors
tensors plus, for LightGBM, its own text model format. Nothing is pickled.
"""

from __future__ import annotations

import copy
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from phrasefuse.fuse.data import Blocks, BlockNorm
from phrasefuse.fuse.metrics import example_scores

DEFAULTS: dict[str, dict] = {
    # Step counts, not epochs: a 50-row few-shot set and a 50,000-row set need similar
    # numbers of optimiser steps; patience is ~100 steps but at least 3 epochs.
    # tune_rows: training rows (stratified sample) on which text trust is tuned; the final
    # head trains on all of them. LightGBM's 100-class rounds cost the most: fewer.
    "linear": {"lr": 1e-2, "weight_decay": 1e-4, "batch_size": None, "max_steps": 4000,
               "patience_steps": 100, "default_steps": 300, "tune_rows": 10_000},
    "mlp": {"lr": 2e-3, "weight_decay": 0.05, "batch_size": None, "max_steps": 4000, "patience_steps": 100,
            "default_steps": 300, "proj_dim": 128, "hidden": 256, "dropout": 0.2, "input_dropout": 0.25,
            "modality_dropout": 0.25, "align_temperature": 0.07},
    "lgbm": {"components": 32, "learning_rate": 0.2, "num_leaves": 7, "max_rounds": 300,
             "early_stopping_rounds": 10, "default_rounds": 60, "lambda_l2": 1.0, "feature_fraction": 0.8,
             "max_bin": 63, "min_data_in_leaf": 20, "tune_rows": 5_000},
}
DROPOUT_GROUP = 16  # rows sharing one dropout mask (see GroupDropout)


def head_params(kind: str, overrides: dict | None = None) -> dict:
    params = dict(DEFAULTS[kind])
    params.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return params


@dataclass
class Task:
    vocab: list[str]
    multilabel: bool

    @property
    def num_classes(self) -> int:
        return len(self.vocab)


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
    """A trained head over some feature blocks, ready to predict."""

    kind: str
    task: Task
    transform: Transform
    roles: list[str]  # "image" | "text" per block
    scales: list[float]  # trust scale per block (linear, lgbm); 1 for mlp (it learns gates)
    params: dict
    steps: int  # optimiser steps (torch) or boosting rounds (lgbm) actually used
    net: object = None  # torch module (linear, mlp)
    boosters: list = field(default_factory=list)  # lgbm: one (multi-class) or one per label (None: no positives)

    def predict(self, blocks: Blocks) -> np.ndarray:
        """Probabilities (n, C): softmax for multi-class, sigmoid per label for multi-label."""
        if self.kind == "lgbm":
            return _lgbm_predict(self, blocks)
        return _torch_predict(self, blocks)

    def trust(self) -> list[float]:
        """Per block: the text trust the head uses (scale, or the mlp's learned gate)."""
        if self.kind == "mlp":
            return [float(g) for g in self.net.gates().detach().cpu().numpy()]
        return list(self.scales)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """(tensors for safetensors, text files by name) that `restore` turns back into this head."""
        tensors = self.transform.tensors()
        tensors["scales"] = np.asarray(self.scales, np.float32)
        files: dict[str, str] = {}
        if self.kind == "lgbm":
            if self.task.multilabel:
                for c, b in enumerate(self.boosters):
                    if b is not None:
                        files[f"lgbm-{c:05d}.txt"] = b.model_to_string()
            else:
                files["lgbm.txt"] = self.boosters[0].model_to_string()
        else:
            for name, t in self.net.state_dict().items():
                tensors[f"net.{name}"] = t.detach().cpu().numpy()
        return tensors, files

    def architecture(self) -> dict:
        """What `restore` needs besides the tensors (kept in meta.json)."""
        arch = {"kind": self.kind, "roles": self.roles, "scales": self.scales, "steps": self.steps,
                "widths": self.widths, "params": self.params}
        if self.kind == "mlp":
            arch["align_dim"] = getattr(self.net, "align_dim", 0)
        return arch

    @property
    def widths(self) -> list[int]:
        return self.transform.widths([m.shape[0] for m in self.transform.norm.mean])


def restore(arch: dict, task: Task, tensors: dict[str, np.ndarray], files: dict[str, str]) -> FittedHead:
    """The inverse of `FittedHead.state` + `architecture`."""
    n_blocks = len(arch["roles"])
    transform = Transform.from_tensors(tensors, n_blocks)
    head = FittedHead(arch["kind"], task, transform, list(arch["roles"]), [float(s) for s in arch["scales"]],
                      dict(arch["params"]), int(arch["steps"]))
    if head.kind == "lgbm":
        import lightgbm as lgb

        from phrasefuse.fuse.lgbm_check import checked_model_text

        def booster(name: str, n_classes: int | None):  # checked first: LightGBM trusts its model text
            return lgb.Booster(model_str=checked_model_text(files[name], sum(head.widths), n_classes))

        if task.multilabel:
            head.boosters = [booster(f"lgbm-{c:05d}.txt", None) if f"lgbm-{c:05d}.txt" in files
                             else None for c in range(task.num_classes)]
        else:
            head.boosters = [booster("lgbm.txt", task.num_classes)]
        return head
    import torch

    net = _build_net(head.kind, head.widths, head.roles, task.num_classes, head.params, int(arch.get("align_dim", 0)))
    state = {k[len("net."):]: torch.from_numpy(np.array(v)) for k, v in tensors.items() if k.startswith("net.")}
    net.load_state_dict(state)
    head.net = net.eval()
    return head


# ---------------------------------------------------------------- fitting


def fit(kind: str, blocks: Blocks, y: np.ndarray, task: Task, roles: Sequence[str], scales: Sequence[float],
        params: dict, seed: int, stop: tuple[Blocks, np.ndarray] | None = None, steps: int | None = None,
        transform: Transform | None = None, align: Align | None = None) -> FittedHead:
    """Fit one head on `blocks` (only the blocks it uses) and labels `y`.

    `stop`: (blocks, y) to stop early on; else run `steps` steps/rounds (or the
    default). `transform`: already fitted on these training rows (reused across a
    tuning grid); fitted here otherwise.
    """
    if transform is None:
        transform = Transform.fit(blocks, params.get("components") if kind == "lgbm" else None, y, task.num_classes)
    head = FittedHead(kind, task, transform, list(roles), [float(s) for s in scales], dict(params), 0)
    if kind == "lgbm":
        _lgbm_fit(head, blocks, y, seed, stop, steps)
    else:
        width = sum(head.widths)
        with _threads(batch_size_for(len(blocks), params.get("batch_size")) * width):
            _torch_fit(head, blocks, y, seed, stop, steps, align)
    return head


# ---------------------------------------------------------------- torch heads


def _build_net(kind: str, widths: Sequence[int], roles: Sequence[str], n_out: int, params: dict, align_dim: int = 0):
    import torch
    from torch import nn

    if kind == "linear":
        return nn.Sequential(nn.Linear(sum(widths), n_out))

    class GroupDropout(nn.Module):
        """Dropout with one mask per group of DROPOUT_GROUP consecutive rows of a shuffled
        batch: on CPU, drawing a random number per value costs more than the matmul it feeds."""

        def __init__(self, p: float) -> None:
            super().__init__()
            self.p = float(p)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training or self.p <= 0:
                return x
            groups = -(-len(x) // DROPOUT_GROUP)
            keep = torch.rand(groups, 1, x.shape[1], device=x.device) >= self.p
            mask = keep.expand(groups, DROPOUT_GROUP, x.shape[1]).reshape(-1, x.shape[1])[:len(x)]
            return x * mask.to(x.dtype) / (1 - self.p)

    class MlpNet(nn.Module):
        """Per block a linear projection ("tuning" layer), a gate on text blocks and modality
        dropout; the concatenated projections feed a hidden layer plus a linear skip path (so
        the head can always be at least the linear probe of its projections)."""

        def __init__(self) -> None:
            super().__init__()
            proj, hidden, dropout = int(params["proj_dim"]), int(params["hidden"]), float(params["dropout"])
            self.widths = [int(w) for w in widths]
            self.proj = nn.ModuleList(nn.Linear(w, proj) for w in self.widths)
            # gate = sigmoid(logit), 0.5 to start, on text blocks; the image block is not gated
            self.gate_logit = nn.Parameter(torch.zeros(len(self.widths)))
            self.register_buffer("gated", torch.tensor([r != "image" for r in roles]))
            self.modality_dropout = float(params["modality_dropout"])
            self.input_dropout = GroupDropout(params["input_dropout"])
            self.hidden = nn.Sequential(GroupDropout(dropout), nn.Linear(proj * len(self.widths), hidden), nn.GELU(),
                                        GroupDropout(dropout), nn.Linear(hidden, n_out))
            self.skip = nn.Linear(proj * len(self.widths), n_out)
            self.image_block = next((j for j, r in enumerate(roles) if r == "image"), None)
            self.align_dim = align_dim
            if align_dim:
                self.align = nn.Linear(proj, align_dim)

        def gates(self) -> torch.Tensor:
            return torch.where(self.gated, torch.sigmoid(self.gate_logit), torch.ones_like(self.gate_logit))

        def forward(self, x: torch.Tensor):
            parts = list(torch.split(x, self.widths, dim=1))
            if self.training and self.modality_dropout > 0:
                for j, part in enumerate(parts):
                    if self.gated[j]:  # the whole block gone, its missing indicator set
                        drop = torch.rand(len(part), 1, device=x.device) < self.modality_dropout
                        missing = torch.zeros_like(part)
                        missing[:, -1] = 1.0
                        parts[j] = torch.where(drop, missing, part)
            projected = [p(self.input_dropout(part)) for p, part in zip(self.proj, parts)]
            g = self.gates()
            z = torch.cat([h * g[j] for j, h in enumerate(projected)], dim=1)
            logits = self.hidden(z) + self.skip(z)
            image = projected[self.image_block] if self.image_block is not None else None
            return logits, image

    return MlpNet()


SMALL_WORK = 1_000_000  # values per step (torch) or in the training matrix (lgbm)


@contextmanager
def _threads(work: int):
    """One thread for small problems: below ~1M values per step, waking OpenMP threads costs
    more than it saves (10x slower on a busy 2-core machine), all cores above."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1 if work < SMALL_WORK else before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _loss(logits, target, multilabel: bool):
    import torch.nn.functional as F

    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, target)


def _info_nce(image_proj, align_layer, targets, y, multilabel: bool, temperature: float):
    """Pull each image's projection toward its label's frozen description embedding."""
    import torch.nn.functional as F

    z = F.normalize(align_layer(image_proj), dim=1)
    logits = z @ targets.T / temperature
    if not multilabel:
        return F.cross_entropy(logits, y)
    logp = F.log_softmax(logits, dim=1)
    n_pos = y.sum(dim=1)
    has = n_pos > 0
    if not has.any():
        return logits.sum() * 0.0
    return -((logp * y).sum(dim=1)[has] / n_pos[has]).mean()


def batch_size_for(n: int, configured: int | None) -> int:
    """~20 steps per epoch, between 32 and 1024 rows (whole set when smaller)."""
    if configured:
        return max(1, min(int(configured), n))
    return max(1, min(n, max(32, min(1024, math.ceil(n / 20)))))


def _torch_fit(head: FittedHead, blocks: Blocks, y: np.ndarray, seed: int, stop, steps: int | None,
               align: Align | None) -> None:
    import torch

    p = head.params
    device = _device()
    torch.manual_seed(seed)
    x = torch.from_numpy(head.transform.apply(blocks, head.scales if head.kind == "linear" else None)).to(device)
    target = _target(y, head.task.multilabel).to(device)
    use_align = head.kind == "mlp" and align is not None and align.weight > 0 and "image" in head.roles
    net = _build_net(head.kind, head.widths, head.roles, head.task.num_classes, p,
                     align.targets.shape[1] if use_align else 0).to(device)
    align_targets = torch.from_numpy(align.targets.astype(np.float32)).to(device) if use_align else None
    decay = [q for q in net.parameters() if q.ndim >= 2]
    no_decay = [q for q in net.parameters() if q.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": p["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=p["lr"])
    n = len(x)
    bs = batch_size_for(n, p.get("batch_size"))
    per_epoch = math.ceil(n / bs)
    # Validate after each epoch, but at least 10 steps apart (a few-shot epoch is one step);
    # patience: ~patience_steps steps, at least 3 validations.
    eval_every = max(1, math.ceil(10 / per_epoch))
    if stop is not None:
        max_steps = int(p["max_steps"])
        patience = max(3, math.ceil(p["patience_steps"] / (per_epoch * eval_every)))
        x_stop = torch.from_numpy(head.transform.apply(stop[0], head.scales if head.kind == "linear" else None))
        x_stop = x_stop.to(device)
        t_stop = _target(stop[1], head.task.multilabel).to(device)
        # A stop row whose label the head never saw (-1) counts wrong in the score, and has no
        # place in the loss (cross-entropy has no class for it).
        known_stop = torch.from_numpy(_known(stop[1], head.task.multilabel)).to(device)
    else:
        max_steps = int(steps or p["default_steps"])
    gen = torch.Generator().manual_seed(seed)
    best, best_score, best_loss, best_steps, bad, done, epoch = None, -math.inf, math.inf, 0, 0, 0, 0
    while done < max_steps:
        net.train()
        epoch += 1
        order = torch.randperm(n, generator=gen).to(device)
        for i in range(0, n, bs):
            idx = order[i:i + bs]
            logits, image = _forward(net, x[idx])
            loss = _loss(logits, target[idx], head.task.multilabel)
            if use_align:
                loss = loss + align.weight * _info_nce(image, net.align, align_targets, target[idx],
                                                       head.task.multilabel, p["align_temperature"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done >= max_steps:
                break
        if stop is None or (epoch % eval_every and done < max_steps):
            continue
        # Stop on the validation score that choices are made on (top-1 / per-image AP); the
        # loss only breaks ties (it keeps creeping down long after accuracy has settled).
        net.eval()
        with torch.no_grad():
            logits = _forward(net, x_stop)[0]
            loss_val = float(_loss(logits[known_stop], t_stop[known_stop], head.task.multilabel)) \
                if bool(known_stop.any()) else 0.0
            probs = torch.sigmoid(logits) if head.task.multilabel else logits
        score = float(np.nanmean(example_scores(probs.cpu().numpy(), stop[1], head.task.multilabel)))
        improved = score > best_score + 1e-9
        if improved or (score >= best_score - 1e-9 and loss_val < best_loss):
            best, best_score, best_loss, best_steps = copy.deepcopy(net.state_dict()), score, loss_val, done
        bad = 0 if improved else bad + 1
        if bad >= patience:
            break
    if stop is not None and best is not None:
        net.load_state_dict(best)
        head.steps = best_steps
    else:
        head.steps = done
    head.net = net.eval().cpu()


def _forward(net, x):
    out = net(x)
    return out if isinstance(out, tuple) else (out, None)


def _known(y: np.ndarray, multilabel: bool) -> np.ndarray:
    """Rows whose label is in the head's vocabulary (multi-class -1 = unseen in train)."""
    return np.ones(len(y), bool) if multilabel else y >= 0


def _target(y: np.ndarray, multilabel: bool):
    import torch

    return torch.from_numpy(y.astype(np.float32)) if multilabel else torch.from_numpy(y.astype(np.int64))


def _torch_predict(head: FittedHead, blocks: Blocks) -> np.ndarray:
    import torch

    x = head.transform.apply(blocks, head.scales if head.kind == "linear" else None)
    out = []
    net = head.net.eval()
    with torch.no_grad():
        for i in range(0, len(x), 8192):
            logits = _forward(net, torch.from_numpy(x[i:i + 8192]))[0]
            out.append((torch.sigmoid(logits) if head.task.multilabel else torch.softmax(logits, dim=1)).numpy())
    return np.concatenate(out) if out else np.zeros((0, head.task.num_classes), np.float32)


# ---------------------------------------------------------------- lightgbm


def _lgbm_params(head: FittedHead, n_rows: int, seed: int, objective: str, contri: list[float]) -> dict:
    p = head.params
    # Few-shot sets: a leaf may hold as few as 2 rows, else no split is ever possible.
    min_leaf = int(max(2, min(p["min_data_in_leaf"], n_rows // max(4, 2 * head.task.num_classes))))
    params = {"objective": objective, "learning_rate": p["learning_rate"], "num_leaves": p["num_leaves"],
              "min_data_in_leaf": min_leaf, "min_sum_hessian_in_leaf": 1e-3, "lambda_l2": p["lambda_l2"],
              "feature_fraction": p["feature_fraction"], "max_bin": p["max_bin"], "feature_contri": contri,
              "num_threads": 1 if n_rows * sum(head.widths) < SMALL_WORK else (os.cpu_count() or 1),
              "seed": seed, "deterministic": True, "verbose": -1}
    if objective == "multiclass":
        params["num_class"] = head.task.num_classes
    return params


def _lgbm_fit(head: FittedHead, blocks: Blocks, y: np.ndarray, seed: int, stop, steps: int | None) -> None:
    import lightgbm as lgb

    p = head.params
    x = head.transform.apply(blocks)
    contri = [float(s) for s, w in zip(head.scales, head.widths) for _ in range(w)]
    x_stop = head.transform.apply(stop[0]) if stop is not None else None
    rounds = int(p["max_rounds"]) if stop is not None else int(steps or p["default_rounds"])

    def train(labels: np.ndarray, objective: str, stop_labels: np.ndarray | None):
        params = _lgbm_params(head, len(x), seed, objective, contri)
        data = lgb.Dataset(x, labels, params={"max_bin": p["max_bin"], "verbose": -1}, free_raw_data=True)
        if stop is None:
            return lgb.train(params, data, num_boost_round=rounds)
        valid = lgb.Dataset(x_stop, stop_labels, reference=data)
        booster = lgb.train(params, data, num_boost_round=rounds, valid_sets=[valid],
                            callbacks=[lgb.early_stopping(int(p["early_stopping_rounds"]), verbose=False)])
        return booster

    if not head.task.multilabel:
        booster = train(y, "multiclass", stop[1] if stop is not None else None)
        head.boosters = [_trimmed(booster)]
        head.steps = head.boosters[0].current_iteration()
        return
    boosters, used = [], []
    for c in range(head.task.num_classes):
        if y[:, c].max() <= 0 or y[:, c].min() >= 1:  # nothing to separate: constant, no booster
            boosters.append(None)
            continue
        b = _trimmed(train(np.ascontiguousarray(y[:, c]), "binary",
                           np.ascontiguousarray(stop[1][:, c]) if stop is not None else None))
        boosters.append(b)
        used.append(b.current_iteration())
    head.boosters = boosters
    head.steps = int(round(np.mean(used))) if used else 0
    head.params = {**p, "constant_labels": [c for c, b in enumerate(boosters) if b is None],
                   "constant_values": [float(y[:, c].max()) if len(y) else 0.0
                                       for c, b in enumerate(boosters) if b is None]}


def _trimmed(booster):
    """The booster cut at its best iteration (early stopping), as a standalone model."""
    import lightgbm as lgb

    best = booster.best_iteration if booster.best_iteration and booster.best_iteration > 0 else None
    return lgb.Booster(model_str=booster.model_to_string(num_iteration=best))


def _lgbm_predict(head: FittedHead, blocks: Blocks) -> np.ndarray:
    x = head.transform.apply(blocks)
    n, C = len(x), head.task.num_classes
    if not head.task.multilabel:
        return np.asarray(head.boosters[0].predict(x), np.float32).reshape(n, C)
    out = np.zeros((n, C), np.float32)
    constants = dict(zip(head.params.get("constant_labels", []), head.params.get("constant_values", [])))
    for c, b in enumerate(head.boosters):
        out[:, c] = b.predict(x) if b is not None else constants.get(c, 0.0)
    return out
