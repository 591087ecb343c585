"""load_recorded_encoder: the encoder a folder's meta.json records, reloaded and checked."""

import pytest

from phrasefuse.errors import BadInput
from phrasefuse.extract.encoders import load_text_encoder
from phrasefuse.extract.recorded import load_recorded_encoder


def test_the_recorded_encoder_loads_and_is_checked(tiny_clip_spec, tmp_path):
    identity = load_text_encoder(tiny_clip_spec, "cpu").identity
    meta = {"encoder": identity}
    kw = dict(folder=tmp_path / "store", kind="store", device="cpu", fix="re-extract the store")
    # a store of image vectors of this CLIP: its text tower is the same model
    assert load_recorded_encoder(meta, "text", **kw).identity == identity
    assert load_recorded_encoder(meta, "image", **kw).dim == identity["dim"]

    other = {"encoder": {**identity, "weights_sha256": "0" * 64}}
    with pytest.raises(BadInput, match=rf"^{tmp_path / 'store'}: encoder .* loads .* but the store was embedded "
                                       r"with .*weights 000000000000\); re-extract the store$"):
        load_recorded_encoder(other, "text", **kw)

    moved = {"encoder": {**identity, "spec": f"open_clip:{tmp_path / 'gone.json'}@"}}
    with pytest.raises(BadInput, match=r"store: label texts: encoder open_clip:.*gone.json@ cannot be loaded "
                                       r"\(.*not found\); re-extract the store$"):
        load_recorded_encoder(moved, "text", what="label texts: ", **kw)
    # the same weights where they are now (predict's --model)
    assert load_recorded_encoder(moved, "text", override=tiny_clip_spec, **kw).identity == identity

    with pytest.raises(BadInput, match="records no encoder spec; re-extract the store"):
        load_recorded_encoder({"encoder": {k: v for k, v in identity.items() if k != "spec"}}, "text", **kw)
