"""The torch networks of the linear and mlp heads (imported only when a torch head is built:
torch loads in seconds, and `phrasefuse --help` must not wait for it)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

DROPOUT_GROUP = 16  # rows sharing one dropout mask (see GroupDropout)


class LinearNet(nn.Sequential):
    """One linear layer on the concatenated blocks (saved as `0.weight`, `0.bias`)."""

    def __init__(self, widths: Sequence[int], n_out: int) -> None:
        super().__init__(nn.Linear(sum(widths), n_out))


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

    def __init__(self, widths: Sequence[int], roles: Sequence[str], n_out: int, params: dict,
                 align_dim: int = 0) -> None:
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
