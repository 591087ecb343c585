"""The batch pixel path (decode_tensor + PixelPlan: uint8 resize and crop in the workers, one
normalisation per batch) embeds real photos as the encoder's own PIL transform does: cosine > 0.9999
(docs/guarantees.md), on the two photos scikit-learn ships, at several sizes and aspect ratios.

JPEGs at least twice the target size are decoded in draft mode (at 1/2, 1/4 or 1/8 size) on both
paths; against a full-size decode that costs a little more (measured 0.994-0.997), also checked."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from phrasefuse.extract.images import image_pixels, stack

# (crop box as fractions of the photo (left, top, right, bottom), resize to) per variant
VARIANTS = {
    "whole": ((0, 0, 1, 1), None),  # 640x427
    "square": ((0.2, 0, 0.87, 1), None),
    "tall": ((0.3, 0, 0.6, 1), None),
    "panorama": ((0, 0.3, 1, 0.65), None),
    "small": ((0, 0, 1, 1), (150, 100)),  # below the model's 224: resized up
    "large": ((0, 0, 1, 1), (1600, 1068)),  # over twice the target: decoded at reduced size (JPEG draft)
}


def photo_jpegs() -> dict[str, bytes]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    out = {}
    for name, array in zip(("china", "flower"), photos.images):
        image = Image.fromarray(array)
        w, h = image.size
        for variant, ((left, top, right, bottom), size) in VARIANTS.items():
            v = image.crop((round(left * w), round(top * h), round(right * w), round(bottom * h)))
            v = v.resize(size, Image.BICUBIC) if size else v
            buf = io.BytesIO()
            v.save(buf, "JPEG", quality=95)
            out[f"{name}-{variant}"] = buf.getvalue()
    return out


@pytest.fixture(scope="module")
def encoder():
    from phrasefuse.extract.encoders import load_image_encoder

    return load_image_encoder("builtin:efficientnet-lite0", "cpu")


def test_plan_embeddings_match_the_transform_on_real_photos(encoder):
    from phrasefuse.extract.images import decode

    assert encoder.plan is not None  # the built-in encoder takes the batch pixel path
    jpegs = photo_jpegs()
    assert len(jpegs) == 12
    # As extract runs: bytes -> uint8 pixels (plan) in the workers, then one batch through the model.
    by_plan = encoder.encode(stack([image_pixels(data, encoder.plan, encoder.resize_shorter)
                                    for data in jpegs.values()]))
    # The reference: the same decoded image through the encoder's own torchvision transform.
    same_decode = encoder.encode(torch.stack([encoder.transform(decode(data, encoder.resize_shorter))
                                              for data in jpegs.values()]))
    cosine = (by_plan * same_decode).sum(axis=1)  # both unit vectors
    assert cosine.min() > 0.9999, dict(zip(jpegs, cosine))
    # Against Pillow's full-size decode: the same, except the draft-decoded large JPEGs.
    full_decode = encoder.encode(torch.stack([encoder.transform(Image.open(io.BytesIO(data)).convert("RGB"))
                                              for data in jpegs.values()]))
    cosine = dict(zip(jpegs, (by_plan * full_decode).sum(axis=1)))
    assert all(c > 0.9999 for name, c in cosine.items() if not name.endswith("-large")), cosine
    assert all(0.99 < c for c in cosine.values()), cosine
    # Not a vacuous bound: different photos are far apart.
    assert (by_plan[0] @ by_plan[len(VARIANTS)]) < 0.9
