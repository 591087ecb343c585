"""Decoding: every odd but valid image becomes a sane RGB input; JPEGs decode at reduced size."""

import io

import numpy as np
import pytest
from PIL import Image

from phrasefuse.extract.images import decode


def encoded(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w=64, h=48):
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    return x


@pytest.mark.parametrize("make", [
    lambda: encoded(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"),
    lambda: encoded(Image.new("RGBA", (40, 30), (255, 0, 0, 0)), "PNG"),
    lambda: encoded(Image.new("LA", (40, 30), (10, 128)), "PNG"),
    lambda: encoded(Image.new("P", (40, 30), 3), "PNG", transparency=3),
    lambda: encoded(Image.fromarray(gradient().astype(np.uint16) * 257), "PNG"),
    lambda: encoded(Image.new("1", (40, 30), 1), "PNG"),
    lambda: encoded(Image.new("RGB", (40, 30), "red"), "GIF", save_all=True,
                    append_images=[Image.new("RGB", (40, 30), "blue")]),
    lambda: encoded(Image.new("RGB", (40, 30), "red"), "WEBP"),
], ids=["cmyk-jpeg", "rgba", "la", "palette-transparency", "16-bit", "1-bit", "animated-gif", "webp"])
def test_odd_images_decode_to_rgb(make):
    image = decode(make())
    assert image.mode == "RGB" and image.size in {(40, 30), (64, 48)}


def test_transparent_pixels_become_white():
    image = decode(encoded(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG"))
    assert image.getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_is_scaled_not_clipped():
    as16 = decode(encoded(Image.fromarray(gradient().astype(np.uint16) * 257), "PNG"))
    as8 = decode(encoded(Image.fromarray(gradient().astype(np.uint8)), "PNG"))
    assert np.abs(np.asarray(as16, np.int16) - np.asarray(as8, np.int16)).max() <= 1


def test_png_named_jpg_is_read_by_content():
    data = encoded(Image.new("RGB", (20, 10), "green"), "PNG")
    assert decode(data).getpixel((0, 0)) == (0, 128, 0)


def test_jpeg_draft_decodes_at_reduced_size_but_not_below_the_target():
    data = encoded(Image.new("RGB", (1600, 1200), "blue"), "JPEG")
    image = decode(data, resize_shorter=256)
    assert 256 <= min(image.size) < 1200
    assert min(decode(data).size) == 1200


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), "red")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90
    assert decode(encoded(image, "JPEG", exif=exif)).size == (20, 40)


@pytest.mark.parametrize("data,reason", [
    (b"not an image at all", "not an image"),
    (encoded(Image.new("RGB", (64, 64), "red"), "JPEG")[:200], "truncated or corrupt"),
])
def test_bad_bytes_raise_a_reason(data, reason):
    with pytest.raises(ValueError, match=reason):
        decode(data)
