import numpy as np
import pytest
import torch
from PIL import Image

from phrasefuse.errors import BadInput
from phrasefuse.extract.encoders import (FAMILIES, list_builtin, list_families, load_image_encoder, load_text_encoder,
                                         parse_spec, state_dict_sha256)


def unit_norm(x):
    return np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def images(n, size=(48, 40)):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("spec", ["clip", "open_clip", "nope:x", "timm:", "open_clip:"])
def test_bad_specs(spec):
    with pytest.raises(BadInput, match="expected FAMILY:NAME"):
        parse_spec(spec)


def test_spec_parts():
    s = parse_spec("open_clip:ViT-B-32@/ckpt/a@b.pt")
    assert (s.family, s.name, s.weights) == ("open_clip", "ViT-B-32", "/ckpt/a@b.pt")
    assert parse_spec("open_clip:cfg.json@").weights is None
    assert parse_spec("sentence-transformers:/m@x").name == "/m@x"


def test_tiny_open_clip_from_config_json(tiny_clip_spec):
    image_encoder = load_image_encoder(tiny_clip_spec, "cpu")
    text_encoder = load_text_encoder(tiny_clip_spec, "cpu")
    assert image_encoder.dim == text_encoder.dim == 32
    assert image_encoder.identity == text_encoder.identity  # one CLIP, one space
    v = image_encoder.encode_images(images(3))
    t = text_encoder.encode(["a red circle", "a blue square"])
    assert v.shape == (3, 32) and t.shape == (2, 32) and unit_norm(v) and unit_norm(t)
    # Random init is seeded: the same spec is the same model in every process.
    assert load_image_encoder(tiny_clip_spec, "cpu").weights_sha256 == image_encoder.weights_sha256


def test_open_clip_local_checkpoint(tiny_clip_config, tmp_path):
    import open_clip

    open_clip.add_model_config(tiny_clip_config)
    torch.manual_seed(123)
    model, _, transform = open_clip.create_model_and_transforms(tiny_clip_config.stem)
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    encoder = load_image_encoder(f"open_clip:{tiny_clip_config}@{ckpt}", "cpu")
    assert encoder.weights_sha256 == state_dict_sha256(model)
    assert encoder.weights_sha256 != load_image_encoder(f"open_clip:{tiny_clip_config}@", "cpu").weights_sha256
    pics = images(2)
    with torch.no_grad():
        expected = model.eval().encode_image(torch.stack([transform(p) for p in pics]), normalize=True).numpy()
    # Our pixels come from the PixelPlan (torch's uint8 resize): within two grey levels of PIL's.
    np.testing.assert_allclose(encoder.encode_images(pics), expected, atol=5e-4)


def test_missing_checkpoint_is_bad_input(tiny_clip_config, tmp_path):
    with pytest.raises(BadInput, match="not found"):
        load_image_encoder(f"open_clip:{tiny_clip_config}@{tmp_path}/missing.pt", "cpu")
    with pytest.raises(BadInput, match="cannot load"):
        load_image_encoder("open_clip:no-such-arch@", "cpu")


def test_timm_with_local_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False).eval()
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    encoder = load_image_encoder(f"timm:test_efficientnet@{weights}", "cpu")
    pics = images(2, size=(160, 140))
    x = torch.stack([encoder.transform(p) for p in pics])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.forward_head(model.forward_features(x), pre_logits=True), dim=-1)
    np.testing.assert_allclose(encoder.encode(x), expected.numpy(), atol=1e-4)
    with pytest.raises(BadInput, match="need a local weights file"):
        load_image_encoder("timm:test_efficientnet", "cpu")
    with pytest.raises(BadInput, match="does not fit"):
        load_image_encoder(f"timm:test_vit@{weights}", "cpu")


def test_builtin_text_encoder_is_the_real_minilm():
    encoder = load_text_encoder("builtin:all-minilm-l6-v2", "cpu")
    assert encoder.dim == 384 and encoder.identity["weights_sha256"]
    v = encoder.encode(["a photo of a dog", "a picture of a puppy", "quarterly tax report"])
    assert unit_norm(v)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3


def test_encoders_refuse_the_wrong_modality():
    with pytest.raises(BadInput, match="encode text only"):
        load_image_encoder("sentence-transformers:whatever", "cpu")
    with pytest.raises(BadInput, match="encode images only"):
        load_text_encoder("timm:resnet18@x.pth", "cpu")


def test_the_family_listing_says_which_families_embed_which_modality():
    assert list_families("image") == ["open_clip", "timm", "builtin"]
    assert list_families("text") == ["open_clip", "sentence-transformers", "builtin"]
    assert set(list_families("image")) | set(list_families("text")) == set(FAMILIES)
    assert list_builtin("image") == ["builtin:efficientnet-lite0"]
    assert list_builtin("text") == ["builtin:all-minilm-l6-v2"]
    with pytest.raises(BadInput, match="unknown built-in image encoder"):
        load_image_encoder("builtin:all-minilm-l6-v2", "cpu")


def test_cuda_request_without_cuda_is_bad_input():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(BadInput, match="no CUDA device"):
        load_text_encoder("builtin:all-minilm-l6-v2", "cuda")
