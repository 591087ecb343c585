"""The EfficientNet-Lite0 package checkpoint, mapped onto timm, must classify real photos."""

import numpy as np
import pytest
import torch
from PIL import Image

from phrasefuse.extract.builtin import load_efficientnet_lite0, map_state_dict


@pytest.fixture(scope="module")
def classifier():
    return load_efficientnet_lite0()


def top5(model, image):
    from phrasefuse.extract.encoders import load_image_encoder

    encoder = load_image_encoder("builtin:efficientnet-lite0", "cpu")
    x = torch.stack([encoder.transform(image)])
    with torch.no_grad():
        logits = model(x)[0]
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(int(i)) for i in logits.topk(5).indices]


def test_palace_photo_ranks_palace_in_top5(classifier):
    from sklearn.datasets import load_sample_image

    labels = top5(classifier, Image.fromarray(load_sample_image("china.jpg")))
    assert any(label.startswith("palace") for label in labels), labels


def test_flower_photo_ranks_daisy_in_top5(classifier):
    from sklearn.datasets import load_sample_image

    labels = top5(classifier, Image.fromarray(load_sample_image("flower.jpg")))
    assert "daisy" in labels, labels


def test_mapping_checks_every_shape(classifier):
    from phrasefuse.extract.builtin import checkpoint_path

    source = torch.load(checkpoint_path(), map_location="cpu", weights_only=True)
    source["_blocks.3._expand_conv.weight"] = torch.zeros(7, 7, 1, 1)
    with pytest.raises(ValueError, match="_blocks.3._expand_conv.weight"):
        map_state_dict(source, classifier)


def test_builtin_image_encoder_features():
    from phrasefuse.extract.encoders import load_image_encoder

    encoder = load_image_encoder("builtin:efficientnet-lite0", "cpu")
    assert encoder.dim == 1280
    assert encoder.preprocess["mean"] == [0.5, 0.5, 0.5]  # TF-Lite training normalisation
    v = encoder.encode_images([Image.new("RGB", (300, 200), (200, 30, 30))])
    assert np.isclose(np.linalg.norm(v), 1.0, atol=1e-5)
