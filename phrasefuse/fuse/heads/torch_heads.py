"""The torch heads (linear, mlp): AdamW on mini-batches, early stopping on a validation set
(or a given number of steps, chosen by cross-validation, when there is none). torch is
imported inside the functions; the networks are in nets.py."""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np

from phrasefuse.fuse.data import Blocks
from phrasefuse.fuse.heads.base import SMALL_WORK, Align, FittedHead
from phrasefuse.fuse.metrics import example_scores

PREDICT_BATCH = 8192
# Values (rows x classes) of one scoring forward pass (validation, predict): 64 MB of float32 logits.
# At 50,000 classes a whole 50,000-row split would be 10 GB of logits, and its softmax as much again.
LOGIT_VALUES = 1 << 24


def score_rows(num_classes: int) -> int:
    """Rows per scoring forward pass: PREDICT_BATCH, fewer when rows x classes would pass LOGIT_VALUES."""
    return max(1, min(PREDICT_BATCH, LOGIT_VALUES // max(1, num_classes)))


def batch_size_for(n: int, configured: int | None) -> int:
    """~20 steps per epoch, between 32 and 1024 rows (whole set when smaller)."""
    if configured:
        return max(1, min(int(configured), n))
    return max(1, min(n, max(32, min(1024, math.ceil(n / 20)))))


def steps_per_epoch(n: int, params: dict) -> int:
    return math.ceil(n / batch_size_for(n, params.get("batch_size")))


@dataclass
class TorchHead(FittedHead):
    """A head whose weights are a torch network (`build_net`), trained by `_torch_fit`."""

    # The design matrix carries each block multiplied by its trust scale (linear); otherwise
    # the network weighs the blocks itself.
    scales_design: ClassVar[bool] = False

    net: object = None  # the torch module

    @classmethod
    def build_net(cls, widths: Sequence[int], roles: Sequence[str], n_out: int, params: dict, align_dim: int = 0):
        raise NotImplementedError

    @classmethod
    def refit_steps(cls, fold_steps: Sequence[int], fold_rows: Sequence[int], pool_rows: int, params: dict) -> int:
        """As many epochs as the folds needed, in steps of the whole pool's batches."""
        epochs = [s / steps_per_epoch(n, params) for s, n in zip(fold_steps, fold_rows)]
        return max(1, int(round(np.mean(epochs) * steps_per_epoch(pool_rows, params))))

    def design(self, blocks: Blocks) -> np.ndarray:
        return self.transform.apply(blocks, self.scales if self.scales_design else None)

    def train(self, blocks: Blocks, y: np.ndarray, seed: int, stop: tuple[Blocks, np.ndarray] | None,
              steps: int | None, align: Align | None) -> None:
        with _threads(batch_size_for(len(blocks), self.params.get("batch_size")) * sum(self.widths)):
            _torch_fit(self, blocks, y, seed, stop, steps, align)

    def load(self, arch: dict, tensors: dict[str, np.ndarray], files: dict[str, str]) -> None:
        import torch

        net = self.build_net(self.widths, self.roles, self.task.num_classes, self.params, int(arch.get("align_dim", 0)))
        state = {k[len("net."):]: torch.from_numpy(np.array(v)) for k, v in tensors.items() if k.startswith("net.")}
        net.load_state_dict(state)
        self.net = net.eval()

    def weights(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        return {f"net.{name}": t.detach().cpu().numpy() for name, t in self.net.state_dict().items()}, {}

    def predict(self, blocks: Blocks) -> np.ndarray:
        import torch

        x = self.design(blocks)
        # Filled in place: a list of chunks then np.concatenate would hold the probabilities twice.
        out = np.empty((len(x), self.task.num_classes), np.float32)
        rows = score_rows(self.task.num_classes)
        net = self.net.eval()
        with torch.no_grad():
            for i in range(0, len(x), rows):
                logits = _forward(net, torch.from_numpy(x[i:i + rows]))[0]
                out[i:i + rows] = (torch.sigmoid(logits) if self.task.multilabel else torch.softmax(logits, dim=1)).numpy()
        return out


@dataclass
class LinearHead(TorchHead):
    """Multinomial logistic regression (softmax; sigmoid per label for multi-label) on the
    concatenated normalised blocks, each text block multiplied by its trust scale."""

    kind: ClassVar[str] = "linear"
    # Step counts, not epochs: a 50-row few-shot set and a 50,000-row set need similar
    # numbers of optimiser steps; patience is ~100 steps but at least 3 epochs.
    # tune_rows: training rows (stratified sample) on which text trust is tuned; the final
    # head trains on all of them.
    defaults: ClassVar[dict] = {"lr": 1e-2, "weight_decay": 1e-4, "batch_size": None, "max_steps": 4000,
                                "patience_steps": 100, "default_steps": 300, "tune_rows": 10_000}
    scales_design: ClassVar[bool] = True

    @classmethod
    def build_net(cls, widths: Sequence[int], roles: Sequence[str], n_out: int, params: dict, align_dim: int = 0):
        from phrasefuse.fuse.heads.nets import LinearNet

        return LinearNet(widths, n_out)


@dataclass
class MlpHead(TorchHead):
    """Per block a projection layer, a learned gate on each text block, modality dropout, a
    hidden layer plus a linear skip path (nets.MlpNet); optional InfoNCE alignment of the
    image projection to frozen label-description embeddings."""

    kind: ClassVar[str] = "mlp"
    defaults: ClassVar[dict] = {"lr": 2e-3, "weight_decay": 0.05, "batch_size": None, "max_steps": 4000,
                                "patience_steps": 100, "default_steps": 300, "proj_dim": 128, "hidden": 256,
                                "dropout": 0.2, "input_dropout": 0.25, "modality_dropout": 0.25,
                                "align_temperature": 0.07}
    learns_trust: ClassVar[bool] = True
    aligns_descriptions: ClassVar[bool] = True

    @classmethod
    def build_net(cls, widths: Sequence[int], roles: Sequence[str], n_out: int, params: dict, align_dim: int = 0):
        from phrasefuse.fuse.heads.nets import MlpNet

        return MlpNet(widths, roles, n_out, params, align_dim)

    def trust(self) -> list[float]:
        """Per block: the learned gate (1 for the image block)."""
        return [float(g) for g in self.net.gates().detach().cpu().numpy()]

    def architecture(self) -> dict:
        return {**super().architecture(), "align_dim": getattr(self.net, "align_dim", 0)}


# ---------------------------------------------------------------- training


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


def _forward(net, x):
    out = net(x)
    return out if isinstance(out, tuple) else (out, None)


def _known(y: np.ndarray, multilabel: bool) -> np.ndarray:
    """Rows whose label is in the head's vocabulary (multi-class -1 = unseen in train)."""
    return np.ones(len(y), bool) if multilabel else y >= 0


def _target(y: np.ndarray, multilabel: bool):
    import torch

    return torch.from_numpy(y.astype(np.float32)) if multilabel else torch.from_numpy(y.astype(np.int64))


def _optimiser(net, params: dict):
    """AdamW; weight decay on matrices only (not on biases, gates)."""
    import torch

    decay = [q for q in net.parameters() if q.ndim >= 2]
    no_decay = [q for q in net.parameters() if q.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": params["weight_decay"]},
                              {"params": no_decay, "weight_decay": 0.0}], lr=params["lr"])


class _BatchLoss:
    """The training loss of a batch: cross-entropy, plus the weighted InfoNCE alignment term."""

    def __init__(self, net, multilabel: bool, align: Align | None, temperature: float, device) -> None:
        import torch

        self.net, self.multilabel, self.align, self.temperature = net, multilabel, align, temperature
        self.targets = torch.from_numpy(align.targets.astype(np.float32)).to(device) if align is not None else None

    def __call__(self, x, target):
        logits, image = _forward(self.net, x)
        loss = _loss(logits, target, self.multilabel)
        if self.align is not None:
            loss = loss + self.align.weight * _info_nce(image, self.net.align, self.targets, target, self.multilabel,
                                                        self.temperature)
        return loss


class _EarlyStop:
    """Scores the network on the stop rows and keeps its best state.

    Stops on the validation score that choices are made on (top-1 / per-image AP); the loss
    only breaks ties (it keeps creeping down long after accuracy has settled)."""

    def __init__(self, head: TorchHead, stop: tuple[Blocks, np.ndarray], device, patience: int) -> None:
        import torch

        self.multilabel, self.y, self.patience = head.task.multilabel, stop[1], patience
        self.x = torch.from_numpy(head.design(stop[0])).to(device)
        self.target = _target(stop[1], self.multilabel).to(device)
        # A stop row whose label the head never saw (-1) counts wrong in the score, and has no
        # place in the loss (cross-entropy has no class for it).
        self.known = torch.from_numpy(_known(stop[1], self.multilabel)).to(device)
        self.classes = head.task.num_classes
        self.best, self.best_score, self.best_loss, self.best_steps, self.bad = None, -math.inf, math.inf, 0, 0

    def should_stop(self, net, done: int) -> bool:
        """Score after `done` steps; True once `patience` validations in a row did not improve."""
        import torch

        net.eval()
        # In chunks of `score_rows`: the stop rows' logits are never all held (rows x classes).
        # The loss: each chunk's mean times its count, summed, divided once: the mean over all known
        # rows (with one chunk exactly the earlier whole-set value: float32 mean x count is exact in float64).
        rows, total, values = score_rows(self.classes), 0.0, 0
        scores = np.empty(len(self.y), np.float64)
        with torch.no_grad():
            for i in range(0, len(self.y), rows):
                logits = _forward(net, self.x[i:i + rows])[0]
                known = self.known[i:i + rows]
                if bool(known.any()):
                    part = logits[known]
                    count = part.numel() if self.multilabel else len(part)
                    total += float(_loss(part, self.target[i:i + rows][known], self.multilabel)) * count
                    values += count
                probs = torch.sigmoid(logits) if self.multilabel else logits
                scores[i:i + rows] = example_scores(probs.cpu().numpy(), self.y[i:i + rows], self.multilabel)
        loss = total / values if values else 0.0
        score = float(np.nanmean(scores))
        improved = score > self.best_score + 1e-9
        if improved or (score >= self.best_score - 1e-9 and loss < self.best_loss):
            self.best, self.best_score, self.best_loss = copy.deepcopy(net.state_dict()), score, loss
            self.best_steps = done
        self.bad = 0 if improved else self.bad + 1
        return self.bad >= self.patience


def _epoch(net, opt, loss_of: _BatchLoss, x, target, batch: int, gen, done: int, max_steps: int) -> int:
    """One shuffled pass (or until `max_steps`); the steps done so far."""
    import torch

    net.train()
    order = torch.randperm(len(x), generator=gen).to(x.device)
    for i in range(0, len(x), batch):
        idx = order[i:i + batch]
        loss = loss_of(x[idx], target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += 1
        if done >= max_steps:
            break
    return done


def _torch_fit(head: TorchHead, blocks: Blocks, y: np.ndarray, seed: int, stop, steps: int | None,
               align: Align | None) -> None:
    import torch

    p = head.params
    device = _device()
    torch.manual_seed(seed)
    x = torch.from_numpy(head.design(blocks)).to(device)
    target = _target(y, head.task.multilabel).to(device)
    use_align = head.aligns_descriptions and align is not None and align.weight > 0 and "image" in head.roles
    net = head.build_net(head.widths, head.roles, head.task.num_classes, p,
                         align.targets.shape[1] if use_align else 0).to(device)
    loss_of = _BatchLoss(net, head.task.multilabel, align if use_align else None, p.get("align_temperature", 0.0),
                         device)
    opt = _optimiser(net, p)
    n = len(x)
    batch = batch_size_for(n, p.get("batch_size"))
    per_epoch = math.ceil(n / batch)
    # Validate after each epoch, but at least 10 steps apart (a few-shot epoch is one step);
    # patience: ~patience_steps steps, at least 3 validations.
    eval_every = max(1, math.ceil(10 / per_epoch))
    early = None
    if stop is not None:
        max_steps = int(p["max_steps"])
        early = _EarlyStop(head, stop, device, max(3, math.ceil(p["patience_steps"] / (per_epoch * eval_every))))
    else:
        max_steps = int(steps or p["default_steps"])
    gen = torch.Generator().manual_seed(seed)
    done, epoch = 0, 0
    while done < max_steps:
        epoch += 1
        done = _epoch(net, opt, loss_of, x, target, batch, gen, done, max_steps)
        if early is None or (epoch % eval_every and done < max_steps):
            continue
        if early.should_stop(net, done):
            break
    if early is not None and early.best is not None:
        net.load_state_dict(early.best)
        head.steps = early.best_steps
    else:
        head.steps = done
    head.net = net.eval().cpu()
