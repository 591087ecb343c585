"""Decoding: every odd but valid image becomes a sane RGB input; JPEGs decode at reduced size."""

import io

import numpy as np
import pytest
from PIL import Image

import torch

from phrasefuse.extract.images import PixelPlan, decode, decode_tensor, image_pixels, stack


def encoded(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w=64, h=48):
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    return x


def solid(colour, w=40, h=30):
    return np.broadcast_to(np.array(colour, np.uint8), (h, w, 3))


def palette_image():
    """A palette image whose every pixel is index 3, a red that the PNG marks transparent."""
    image = Image.new("P", (40, 30), 3)
    image.putpalette([0, 0, 0, 10, 10, 10, 20, 20, 20, 200, 0, 0])
    return image


# Each odd image and the RGB pixels it must decode to (the classic bugs: CMYK not inverted,
# 16-bit clipped instead of scaled, alpha dropped instead of composited on white).
@pytest.mark.parametrize("make, expected, tolerance", [
    (lambda: encoded(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"), solid((255, 0, 0)), 3),  # no cyan: red
    (lambda: encoded(Image.new("RGBA", (40, 30), (255, 0, 0, 0)), "PNG"), solid((255, 255, 255)), 0),  # clear: white
    # grey 10 at alpha 128 over white: 10 * 128/255 + 255 * 127/255 = 132
    (lambda: encoded(Image.new("LA", (40, 30), (10, 128)), "PNG"), solid((132, 132, 132)), 1),
    (lambda: encoded(palette_image(), "PNG", transparency=3), solid((255, 255, 255)), 0),  # index 3: clear red
    (lambda: encoded(Image.fromarray(gradient().astype(np.uint16) * 257), "PNG"),
     np.repeat(gradient()[..., None], 3, axis=2), 1),  # 257 * v (16-bit) is v (8-bit)
    (lambda: encoded(Image.new("1", (40, 30), 1), "PNG"), solid((255, 255, 255)), 0),
    (lambda: encoded(Image.new("RGB", (40, 30), "red"), "GIF", save_all=True,
                     append_images=[Image.new("RGB", (40, 30), "blue")]), solid((255, 0, 0)), 0),  # the 1st frame
    (lambda: encoded(Image.new("RGB", (40, 30), "red"), "WEBP"), solid((255, 0, 0)), 8),  # lossy
], ids=["cmyk-jpeg", "rgba", "la", "palette-transparency", "16-bit", "1-bit", "animated-gif", "webp"])
def test_odd_images_decode_to_the_right_rgb_pixels(make, expected, tolerance):
    image = decode(make())
    assert image.mode == "RGB" and image.size == expected.shape[1::-1]
    difference = np.abs(np.asarray(image, np.int16) - np.asarray(expected, np.int16))
    assert difference.max() <= tolerance, (np.asarray(image)[0, :3], expected[0, :3])


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


# ---------------------------------------------------------------- the tensor path of the batch jobs


def photo(w=160, h=120, seed=0):
    """Smooth random colours: JPEG-like content (not noise)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((h // 8 + 1, w // 8 + 1, 3)) * 255).astype(np.uint8))
    return small.resize((w, h), Image.BILINEAR)


def rotated_jpeg():
    image = photo()
    exif = image.getexif()
    exif[0x0112] = 6
    return encoded(image, "JPEG", exif=exif)


@pytest.mark.parametrize("make", [
    lambda: encoded(photo(), "JPEG"),
    lambda: encoded(photo().convert("L"), "JPEG"),
    lambda: encoded(photo(), "JPEG", progressive=True),
    lambda: encoded(photo(), "JPEG", subsampling=0),
    rotated_jpeg,
    lambda: encoded(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"),
    lambda: encoded(photo(1600, 1200), "JPEG"),  # draft-decoded by Pillow
    lambda: encoded(photo(), "PNG"),
    lambda: encoded(Image.new("RGBA", (40, 30), (255, 0, 0, 0)), "PNG"),
], ids=["jpeg", "grey-jpeg", "progressive", "444", "exif-rotated", "cmyk", "big-jpeg", "png", "rgba"])
def test_decode_tensor_gives_the_pixels_of_decode(make):
    data = make()
    pixels = decode_tensor(data, resize_shorter=256)
    expected = np.asarray(decode(data, resize_shorter=256))
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, *expected.shape[:2])
    assert pixels.permute(1, 2, 0).is_contiguous()  # channels-last memory
    np.testing.assert_array_equal(pixels.permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize("data,reason", [
    (b"not an image at all", "not an image"),
    (encoded(Image.new("RGB", (64, 64), "red"), "JPEG")[:200], "truncated or corrupt"),
    (encoded(photo(), "JPEG")[:3000], "truncated or corrupt"),
])
def test_decode_tensor_bad_bytes_raise_the_same_reasons(data, reason):
    with pytest.raises(ValueError, match=reason):
        decode_tensor(data)


def test_decode_tensor_refuses_decompression_bombs(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="image too large"):
        decode_tensor(encoded(photo(), "JPEG"))


@pytest.fixture(scope="module")
def builtin_transform():
    from phrasefuse.extract.encoders import load_image_encoder

    return load_image_encoder("builtin:efficientnet-lite0", "cpu").transform


def test_plan_of_the_builtin_transform(builtin_transform):
    plan = PixelPlan.from_transform(builtin_transform)
    assert plan == PixelPlan(256, (224, 224), "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_plan_of_an_open_clip_transform(tiny_clip_config):
    import open_clip

    open_clip.add_model_config(tiny_clip_config)
    _, _, transform = open_clip.create_model_and_transforms(tiny_clip_config.stem)
    plan = PixelPlan.from_transform(transform)
    assert plan is not None and plan.crop == (plan.resize_shorter, plan.resize_shorter)
    assert plan.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_other_transforms_have_no_plan(builtin_transform):
    from torchvision import transforms as T

    assert PixelPlan.from_transform(T.Compose([T.RandomHorizontalFlip(), *builtin_transform.transforms])) is None
    assert PixelPlan.from_transform(T.Compose([T.Resize((224, 224)), *builtin_transform.transforms[1:]])) is None
    assert PixelPlan.from_transform(lambda image: image) is None


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1000, 300), (40, 30), (256, 256)])
def test_plan_matches_the_transform_within_two_grey_levels(builtin_transform, size):
    plan = PixelPlan.from_transform(builtin_transform)
    image = photo(*size, seed=sum(size))
    expected = builtin_transform(image)
    pixels = plan(image)
    assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.uint8
    assert torch.equal(plan(decode_tensor(encoded(image, "PNG"), 256)), pixels)  # tensor in, same pixels
    got = plan.normalise(pixels[None])[0]
    assert (got - expected).abs().max() * 255 * 0.5 <= 2.0 + 1e-4  # std 0.5: one grey level = 2/255
    # The normalisation itself is ToTensor + Normalize's arithmetic, bit for bit.
    reference = pixels.float().div(255).sub(torch.tensor([0.5] * 3).view(3, 1, 1)).div(0.5)
    assert torch.equal(got.contiguous(), reference)


def test_stack_keeps_channels_last_and_values():
    pixels = [torch.randint(0, 256, (8, 6, 3), dtype=torch.uint8).permute(2, 0, 1) for _ in range(3)]
    batch = stack(pixels)
    assert batch.shape == (3, 3, 8, 6) and batch.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(batch[i], p) for i, p in enumerate(pixels))
    floats = [torch.randn(3, 4, 4) for _ in range(2)]  # a transform's output: ordinary layout
    assert torch.equal(stack(floats), torch.stack(floats))


def test_image_pixels_takes_the_plan_or_else_the_transform(builtin_transform):
    data = encoded(photo(300, 200), "JPEG")
    plan = PixelPlan.from_transform(builtin_transform)
    pixels = image_pixels(data, plan, 256)
    assert pixels.dtype == torch.uint8 and torch.equal(pixels, plan(decode_tensor(data, 256)))
    # ...and those pixels, normalised, are the transform's own input within two grey levels
    assert (plan.normalise(pixels[None])[0] - builtin_transform(decode(data, 256))).abs().max() <= 2 * 2 / 255 + 1e-4
    as_floats = image_pixels(data, builtin_transform, 256)  # a transform without a plan runs as it is
    assert torch.equal(as_floats, builtin_transform(decode(data, 256)))
