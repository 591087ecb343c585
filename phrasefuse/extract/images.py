"""Reading, hashing and decoding images: the per-item work that DataLoader workers do.

An item is read once: its bytes give the content key (sha256), and are decoded
only when the key is not already embedded. JPEGs decode at reduced size where
the target resolution allows (Pillow's draft mode: DCT scaling by 1/2, 1/4, 1/8).
Every failure becomes a reason string; nothing here raises for a bad image.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

# Truncated files are errors, never silently half-decoded.
from PIL import ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = False


def content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def prepare(image: Image.Image, resize_shorter: int | None = None) -> Image.Image:
    """Any PIL image -> RGB, EXIF-rotated; alpha composited on white; 16-bit and float scaled to 8 bits."""
    if resize_shorter and image.format == "JPEG":
        w, h = image.size
        scale = resize_shorter / max(1, min(w, h))
        if scale < 1:  # draft keeps the decoded size >= the requested one
            image.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
    image.load()
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # animated: the first frame
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        image = Image.fromarray(a.astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def decode(data: bytes, resize_shorter: int | None = None) -> Image.Image:
    """Bytes -> RGB image; raises ValueError(reason) on anything that is not a sane image."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            return prepare(image, resize_shorter)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"image too large: {str(e).split('.')[0]}") from None
        except Image.UnidentifiedImageError:
            raise ValueError("not an image (unknown format)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ValueError(f"truncated or corrupt image ({str(e)[:120]})") from None


def read_item(path: str | None) -> tuple[bytes | None, str | None]:
    """(bytes, None) or (None, reason)."""
    if not path:
        return None, "no image path"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, f"file not found: {path}"
    except IsADirectoryError:
        return None, f"is a folder, not an image: {path}"
    except OSError as e:
        return None, f"cannot read {path}: {e.strerror}"
    if not data:
        return None, f"empty file: {path}"
    return data, None


class ImageRows(torch.utils.data.Dataset):
    """Rows (id, path) -> items for the model. Items whose content key is in
    `known_keys` are not decoded: their embedding already exists."""

    def __init__(self, ids: list[str], paths: list[str | None], transform: Callable,
                 resize_shorter: int, known_keys: frozenset[str] = frozenset()):
        self.ids, self.paths = ids, paths
        self.transform, self.resize_shorter = transform, resize_shorter
        self.known_keys = known_keys

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple:
        """(id, key, pixels | None, reason | None)."""
        data, reason = read_item(self.paths[i])
        if data is None:
            return self.ids[i], None, None, reason
        key = content_key(data)
        if key in self.known_keys:
            return self.ids[i], key, None, None
        try:
            pixels = self.transform(decode(data, self.resize_shorter))
        except ValueError as e:
            return self.ids[i], key, None, str(e)
        except Exception as e:  # noqa: BLE001 - a bad row never stops the job
            return self.ids[i], key, None, f"cannot preprocess ({type(e).__name__}: {str(e)[:120]})"
        return self.ids[i], key, pixels, None


def collate(items: list[tuple]) -> dict:
    """A batch: pixels of the decoded items, the rest as lists (a dict so DataLoader can pin it)."""
    good = [it for it in items if it[2] is not None]
    return {
        "ids": [it[0] for it in good],
        "keys": [it[1] for it in good],
        "pixels": torch.stack([it[2] for it in good]) if good else None,
        "known": [(it[0], it[1]) for it in items if it[2] is None and it[3] is None],
        "errors": [(it[0], it[3]) for it in items if it[3] is not None],
    }


def worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode; the main process owns the cores for the model
