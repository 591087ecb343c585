"""Reading, hashing and decoding images: the per-item work that DataLoader workers do.

An item is read once: its bytes give the content key (sha256), and are decoded
only when the key is not already embedded. JPEGs decode at reduced size where
the target resolution allows (Pillow's draft mode: DCT scaling by 1/2, 1/4, 1/8).
Every failure becomes a reason string; nothing here raises for a bad image.

`PixelPlan` is an encoder's eval transform (resize the shorter side, centre-crop,
scale, normalise) split where it is cheapest: resize and crop on uint8 tensors per
image, in the workers, with torch's vectorised antialiased kernels (0.6 ms per 640x480
image here, against 5.8 ms for PIL's bicubic resize, ToTensor and Normalize); the
normalisation per batch, next to the model (on a GPU: a quarter of the bytes to copy).
The values match the PIL transform's within two grey levels (embeddings: cosine > 0.9999).
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import stat
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageOps

# Truncated files are errors, never silently half-decoded.
from PIL import ImageFile

# The limits live apart (no torch there): the CLI and `run` build them for jobs that may embed nothing.
from phrasefuse.extract.limits import DEFAULT_LIMITS, ImageLimits  # noqa: F401 - re-exported
from phrasefuse.manifests.sources import LINK_SIZE

ImageFile.LOAD_TRUNCATED_IMAGES = False
ORIENTATION = 0x0112  # the EXIF tag


def content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _draft_size(size: tuple[int, int], resize_shorter: int | None) -> tuple[int, int] | None:
    """The smallest decoded size that still resizes down to `resize_shorter`; None: no reduction."""
    w, h = size
    scale = (resize_shorter or 0) / max(1, min(w, h))
    if not 0 < scale < 1:
        return None
    return max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))


def prepare(image: Image.Image, resize_shorter: int | None = None) -> Image.Image:
    """Any PIL image -> RGB, EXIF-rotated; alpha composited on white; 16-bit and float scaled to 8 bits."""
    draft = _draft_size(image.size, resize_shorter) if image.format == "JPEG" else None
    if draft:  # draft keeps the decoded size >= the requested one
        image.draft("RGB", draft)
    image.load()
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # animated: the first frame
    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when there is nothing to turn
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        image = Image.fromarray(a.astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def _plain_jpeg(image: Image.Image, resize_shorter: int | None) -> bool:
    """A JPEG that simplejpeg decodes to Pillow's pixels: RGB or grey, upright, and not big enough
    for Pillow's draft mode to decode it smaller."""
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return False
    draft = _draft_size(image.size, resize_shorter)
    if draft and min(image.size[0] // draft[0], image.size[1] // draft[1]) >= 2:
        return False
    return image.getexif().get(ORIENTATION, 1) == 1


class OverLimits(ValueError):
    """An image over `ImageLimits` (the message is the reason recorded for its row)."""


@contextmanager
def decode_errors(limits: ImageLimits = DEFAULT_LIMITS):
    """Pillow's and libjpeg's failures -> ValueError(reason); decompression bombs are errors."""
    if limits.max_pixels > DEFAULT_LIMITS.max_pixels and limits.max_pixels > (Image.MAX_IMAGE_PIXELS or 0) \
            and Image.MAX_IMAGE_PIXELS is not None:
        Image.MAX_IMAGE_PIXELS = limits.max_pixels  # a cap the user raised: Pillow's bomb check follows it
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"image too large: {str(e).split('.')[0]}") from None
        except Image.UnidentifiedImageError:
            raise ValueError("not an image (unknown format)") from None
        except OverLimits:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ValueError(f"truncated or corrupt image ({str(e)[:120]})") from None
        except MemoryError:
            raise ValueError("image too large (out of memory decoding it)") from None


def open_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Bytes -> a lazily decoded PIL image whose size is within `limits` (header read only);
    raises ValueError(reason). Call inside `decode_errors`."""
    image = Image.open(io.BytesIO(data))
    reason = limits.refuse(image.size)
    if reason:
        raise OverLimits(reason)
    return image


def decode(data: bytes, resize_shorter: int | None = None, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Bytes -> RGB image; raises ValueError(reason) on anything that is not a sane image."""
    with decode_errors(limits):
        return prepare(open_image(data, limits), resize_shorter)


def decode_tensor(data: bytes, resize_shorter: int | None = None,
                  limits: ImageLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """Bytes -> (3, H, W) uint8, the pixels of `decode` laid out height, width, channel in memory
    (channels-last: what the resize kernels and the model want). A plain JPEG (RGB or grey,
    upright, too small for draft decoding) goes straight from libjpeg-turbo into an array with
    simplejpeg, skipping Pillow's image object and its two copies: 3.0 -> 2.3 ms for a 640x480
    JPEG here, the same pixels. Anything else, or a JPEG simplejpeg refuses, goes through Pillow."""
    with decode_errors(limits):
        image = open_image(data, limits)  # reads the header only: format, mode, size, EXIF; bomb check
        if _plain_jpeg(image, resize_shorter):
            try:
                return torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB")).permute(2, 0, 1)
            except ValueError:
                pass  # corrupt or unusual: Pillow decodes it, or says why not
        return as_tensor(prepare(image, resize_shorter))


def as_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> (3, H, W) uint8 over its (H, W, 3) bytes (channels-last), copied once."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def read_item(path: str | None, limits: ImageLimits = DEFAULT_LIMITS, *,
              read: bool = True) -> tuple[bytes | None, str | None]:
    """(bytes, None) or (None, reason). Only regular files (symlinks followed) of at most
    `limits.max_bytes` are read: a FIFO would block forever, a device or a sparse file never end.
    `read=False` makes only the checks that need no read (opens, is a regular file, size): (b"", None)
    when they pass; a command that streams many files checks them all first without holding any."""
    if not path:
        return None, "no image path"
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once (and fstat then refuses it).
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None, f"file not found: {path}"
    except OSError as e:  # a socket cannot be opened at all: say what it is
        kind = _special_kind(path)
        return None, f"is {kind}, not an image file: {path}" if kind else f"cannot read {path}: {e.strerror}"
    except (ValueError, TypeError, UnicodeError) as e:  # a NUL byte, unencodable characters
        return None, f"not a valid path ({str(e)[:80]}): {path!r}"
    try:
        return _read_regular(fd, path, limits, read)
    except OSError as e:
        return None, f"cannot read {path}: {e.strerror}"
    except MemoryError:
        return None, f"cannot read {path}: out of memory"
    finally:
        os.close(fd)


def _special_kind(path: str) -> str | None:
    """What the file at `path` is when it is not a regular file (symlinks followed); None otherwise."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return None if stat.S_ISREG(mode) else next((name for test, name in FILE_KINDS if test(mode)),
                                                "not a regular file")


def _read_regular(fd: int, path: str, limits: ImageLimits, read: bool = True) -> tuple[bytes | None, str | None]:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in FILE_KINDS if test(st.st_mode)), "not a regular file")
        return None, f"is {kind}, not an image file: {path}"
    if st.st_size > limits.max_bytes:
        return None, (f"file too large: {st.st_size / 2**20:.0f} MB is over the limit of "
                      f"{limits.max_bytes / 2**20:.0f} MB (max_image_mb): {path}")
    if not read:  # an empty file is found when it is read (st_size is 0 for /proc files that have content)
        return b"", None
    with os.fdopen(os.dup(fd), "rb") as f:
        data = f.read(limits.max_bytes + 1)  # the file may have grown since fstat
    if len(data) > limits.max_bytes:
        return None, f"file too large: over the limit of {limits.max_bytes / 2**20:.0f} MB (max_image_mb): {path}"
    if not data:
        return None, f"empty file: {path}"
    return data, None


def read_range(path: str, offset: int | None, size: int | None,
               limits: ImageLimits = DEFAULT_LIMITS) -> tuple[bytes | None, str | None]:
    """The `size` bytes at `offset` of `path` (a tar shard's image member): (bytes, None) or (None, reason)."""
    if offset is None and size == LINK_SIZE:
        return None, (f"the image member of this sample of {path} is a symbolic link (links are not followed); "
                      f"store the image itself in the tar")
    if offset is None or size is None:
        return None, f"no image member (.jpg, .jpeg, .png, .webp) in this sample of {path}"
    if size > limits.max_bytes:
        return None, (f"file too large: a {size / 2**20:.0f} MB tar member is over the limit of "
                      f"{limits.max_bytes / 2**20:.0f} MB (max_image_mb): {path}")
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except OSError as e:
        return None, f"cannot read {path}: {e.strerror}"
    if len(data) < size:
        return None, f"truncated tar member in {path} ({len(data)} of {size} bytes)"
    if not data:
        return None, f"empty image member in {path}"
    return data, None


def read_source(source, limits: ImageLimits = DEFAULT_LIMITS) -> tuple[bytes | None, str | None]:
    """An item's bytes from what `image_sources` gives: a path, (shard, offset, size), or the bytes."""
    if isinstance(source, bytes):
        if len(source) > limits.max_bytes:
            return None, (f"file too large: {len(source) / 2**20:.0f} MB of image bytes is over the limit of "
                          f"{limits.max_bytes / 2**20:.0f} MB (max_image_mb)")
        return (source, None) if source else (None, "no image bytes in this row")
    if isinstance(source, tuple):
        return read_range(*source, limits)
    return read_item(source, limits)


def image_sources(rows) -> list:
    """Per row of an Arrow table from `manifests.image_chunks`, where its bytes are: the path
    (`image`), (shard, offset, size) for tar members (`_offset`, `_size`), or the bytes (`_bytes`)."""
    if "_bytes" in rows.column_names:
        return [b or b"" for b in rows["_bytes"].to_pylist()]
    paths = rows["image"].to_pylist()
    if "_offset" in rows.column_names:
        return list(zip(paths, rows["_offset"].to_pylist(), rows["_size"].to_pylist()))
    return paths


@dataclass(frozen=True)
class PixelPlan:
    """Resize shorter side -> centre crop -> [0, 1] -> (x - mean) / std, as tensor operations."""

    resize_shorter: int
    crop: tuple[int, int]  # (height, width)
    interpolation: str  # "bicubic" | "bilinear"
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_transform(cls, transform: Callable) -> PixelPlan | None:
        """The plan of a torchvision Compose of exactly Resize(int), CenterCrop, [to-RGB], ToTensor,
        Normalize (timm's and open_clip's eval transforms); None for anything else, which then
        runs as it is, per image."""
        from torchvision import transforms as T

        rgb_steps = ("MaybeConvertMode", "_convert_to_rgb")  # no-ops: `decode` gives RGB already
        steps = [t for t in getattr(transform, "transforms", [None])
                 if getattr(t, "__name__", type(t).__name__) not in rgb_steps]
        if len(steps) != 4:
            return None
        resize, crop, to_tensor, normalize = steps
        if not (type(resize) is T.Resize and type(crop) is T.CenterCrop and type(normalize) is T.Normalize
                and type(to_tensor).__name__ in ("ToTensor", "MaybeToTensor")):
            return None
        size = resize.size[0] if isinstance(resize.size, (list, tuple)) and len(resize.size) == 1 else resize.size
        interpolation = getattr(resize.interpolation, "value", resize.interpolation)
        if not isinstance(size, int) or resize.max_size is not None or resize.antialias is False \
                or interpolation not in ("bicubic", "bilinear"):
            return None
        return cls(size, tuple(int(x) for x in crop.size), interpolation,
                   tuple(float(x) for x in normalize.mean), tuple(float(x) for x in normalize.std))

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """RGB image, or (3, H, W) uint8 from `decode_tensor` -> (3, crop_h, crop_w) uint8 laid out
        channels-last (so that a batch of them is the model's channels-last input without a copy)."""
        from torchvision.transforms.v2 import functional as F

        if isinstance(image, Image.Image):
            image = as_tensor(image)
        pixels = F.resize(image, [self.resize_shorter], interpolation=F.InterpolationMode(self.interpolation),
                          antialias=True)
        return F.center_crop(pixels, list(self.crop)).permute(1, 2, 0).contiguous().permute(2, 0, 1)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> float32, channels-last; the same arithmetic as ToTensor + Normalize."""
        mean = torch.tensor(self.mean, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, -1, 1, 1)
        pixels = pixels.contiguous(memory_format=torch.channels_last).float()  # no copy for `collate`'s batches
        return pixels.div_(255).sub_(mean).div_(std)


class ImageRows(torch.utils.data.Dataset):
    """Rows (id, where its bytes are: `image_sources`) -> items for the model. Items whose content key is in
    `known_keys` are not decoded: their embedding already exists. `to_pixels` is the
    encoder's (`ImageEncoder.to_pixels`): a PixelPlan, or its transform."""

    def __init__(self, ids: list[str], paths: list, to_pixels: Callable,
                 resize_shorter: int, known_keys: frozenset[str] = frozenset(),
                 limits: ImageLimits = DEFAULT_LIMITS):
        self.ids, self.paths = ids, paths
        self.to_pixels, self.resize_shorter = to_pixels, resize_shorter
        self.known_keys = known_keys
        self.limits = limits

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple:
        """(id, key, pixels | None, reason | None). Never raises: a bad row never stops the job."""
        try:
            data, reason = read_source(self.paths[i], self.limits)
        except Exception as e:  # noqa: BLE001 - e.g. a path of another type than str
            data, reason = None, f"cannot read {self.paths[i]!r} ({type(e).__name__}: {str(e)[:120]})"
        if data is None:
            return self.ids[i], None, None, reason
        key = content_key(data)
        if key in self.known_keys:
            return self.ids[i], key, None, None
        try:
            pixels = image_pixels(data, self.to_pixels, self.resize_shorter, self.limits)
        except ValueError as e:
            return self.ids[i], key, None, str(e)
        except Exception as e:  # noqa: BLE001 - a bad row never stops the job
            return self.ids[i], key, None, f"cannot preprocess ({type(e).__name__}: {str(e)[:120]})"
        return self.ids[i], key, pixels, None


def image_pixels(data: bytes, to_pixels: Callable, resize_shorter: int,
                 limits: ImageLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """Image bytes -> the model's input for one image, through an encoder's `to_pixels`."""
    if isinstance(to_pixels, PixelPlan):
        return to_pixels(decode_tensor(data, resize_shorter, limits))
    return to_pixels(decode(data, resize_shorter, limits))


def stack(pixels: list[torch.Tensor]) -> torch.Tensor:
    """Images of one shape -> a batch, keeping their memory layout (PixelPlan's: channels-last).
    In a DataLoader worker the batch is written straight into shared memory, as torch's
    default_collate does: no copy on the way to the main process."""
    first, n = pixels[0], len(pixels)
    if torch.utils.data.get_worker_info() is None:
        flat = first.new_empty(first.numel() * n)
    else:
        flat = first.new_empty(0).set_(first.untyped_storage()._new_shared(first.nbytes * n))
    if first.permute(1, 2, 0).is_contiguous():  # (3, H, W) seen over (H, W, 3) memory
        hwc = [p.permute(1, 2, 0) for p in pixels]
        return torch.stack(hwc, out=flat.view(n, *hwc[0].shape)).permute(0, 3, 1, 2)
    return torch.stack(pixels, out=flat.view(n, *first.shape))


def collate(items: list[tuple]) -> dict:
    """A batch: pixels of the decoded items, the rest as lists (a dict so DataLoader can pin it)."""
    good = [it for it in items if it[2] is not None]
    return {
        "ids": [it[0] for it in good],
        "keys": [it[1] for it in good],
        "pixels": stack([it[2] for it in good]) if good else None,
        "known": [(it[0], it[1]) for it in items if it[2] is None and it[3] is None],
        "errors": [(it[0], it[3]) for it in items if it[3] is not None],
    }


def worker_init(_: int, yield_to_model: bool = False) -> None:
    """A DataLoader worker: one thread. With `yield_to_model` (the model runs on these same CPU
    cores) it runs only on cores the model leaves idle: preempting one of the model's threads
    stalls all the others at the next barrier, so decoding at equal priority costs the model about
    twice its own CPU time (figures: docs/benchmarks.md)."""
    torch.set_num_threads(1)
    # Ctrl-C in a terminal reaches the whole process group: the main process stops the job and
    # shuts the workers down; a worker raising its own KeyboardInterrupt only prints tracebacks.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    if yield_to_model:
        if hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        else:  # not Linux: the lowest ordinary priority
            os.nice(19)
