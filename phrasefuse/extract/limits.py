"""The per-row memory bounds of the image readers (`ImageLimits`), apart from `extract.images`:
that module imports torch, and the CLI and `run` build the limits for jobs that may have nothing to
embed (and then load no model and import no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class ImageLimits:
    """Per-row memory bounds of the image readers (configurable: `extract images --max-image-mb
    --max-image-megapixels --max-aspect-ratio`; in a run config [encoders] max_image_mb,
    max_image_megapixels, max_aspect_ratio).
    A file over them is an error row, never a job killed by memory: a 3 GB (sparse) file would be
    read whole, a 1x20000 strip upscaled to the model's size on its short side (5 GB of pixels)."""

    max_bytes: int = 256 * 2**20  # a 100 MP JPEG is ~30 MB; a 16-bit 60 MP TIFF ~360 MB
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485  # Pillow's own bomb threshold (89 MP)
    max_aspect: float = 50.0  # wide panoramas are ~10:1; at 50:1 a 384-px model input is ~22 MB

    @classmethod
    def of(cls, max_image_mb: float | None = None, max_image_megapixels: float | None = None,
           max_aspect_ratio: float | None = None) -> "ImageLimits":
        """The limits from their user-facing units (None: the default); ValueError naming a bad one."""
        for name, value in (("max_image_mb", max_image_mb), ("max_image_megapixels", max_image_megapixels),
                            ("max_aspect_ratio", max_aspect_ratio)):
            if value is not None and not (isinstance(value, (int, float)) and value == value and value >= 1
                                          and value < 1e12):
                shown = f"{value:g}" if isinstance(value, (int, float)) else repr(value)
                raise ValueError(f"{name} {shown}: must be a number of at least 1")
        d = cls()
        return cls(max_bytes=int(max_image_mb * 2**20) if max_image_mb else d.max_bytes,
                   max_pixels=int(max_image_megapixels * 1e6) if max_image_megapixels else d.max_pixels,
                   max_aspect=float(max_aspect_ratio) if max_aspect_ratio else d.max_aspect)

    def refuse(self, size: tuple[int, int]) -> str | None:
        """Why an image of `size` (w, h) is over the limits; None when it is not."""
        w, h = size
        if w < 1 or h < 1:
            return f"image has no pixels ({w}x{h})"
        if w * h > self.max_pixels:
            return (f"image too large: {w}x{h} = {w * h / 1e6:.0f} MP is over the limit of "
                    f"{self.max_pixels / 1e6:.0f} MP (max_image_megapixels)")
        if max(w, h) / min(w, h) > self.max_aspect:
            return (f"image too elongated: {w}x{h} is over the aspect-ratio limit of {self.max_aspect:g}:1 "
                    f"(max_aspect_ratio)")
        return None


DEFAULT_LIMITS = ImageLimits()
