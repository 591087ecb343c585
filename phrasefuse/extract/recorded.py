"""Reloading the encoder a folder's meta.json records, checked to be the same model.

A store, an index and a head each record the encoder that made their vectors (spec and identity:
family, name, weights checksum, dim). Whatever embeds new inputs to compare with those vectors
(`index lookup`, `--text-prototypes`, label texts, `predict` on new images) reloads that encoder
here, so a moved checkpoint or other weights fail the same way: exit 2, naming the folder and
what to do.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from phrasefuse.errors import BadInput
from phrasefuse.extract.encoders import ImageEncoder, TextEncoder, load_encoder
from phrasefuse.store import describe_encoder, encoder_identity

# How each kind of folder came by its vectors, for the message when the loaded model differs.
MADE_WITH = {"store": "the store was embedded with", "index": "the index was built from",
             "head": "the head was trained on"}


def load_recorded_encoder(meta: dict, modality: str, *, folder: str | os.PathLike, kind: str, fix: str,
                          what: str = "", device: str = "auto", override: str | None = None,
                          load: Callable[[str, str], ImageEncoder | TextEncoder] | None = None,
                          ) -> ImageEncoder | TextEncoder:
    """The encoder `meta["encoder"]` records (a store's, an index's, or a head feature's record),
    loaded for `modality` ("image", or "text": e.g. an open_clip image store's text tower) on
    `device`, or the `override` spec instead (the same weights where they are now: predict's
    --model). Refused (BadInput: `folder` of `kind` store|index|head, then `what`, then `fix`)
    when no spec is recorded, the spec cannot be loaded, or it loads another model. `load`
    (spec, device) -> encoder replaces the registry's loader (a per-process cache)."""
    recorded = meta["encoder"]
    spec = override or recorded.get("spec")
    if not spec:
        raise BadInput(f"{folder}: {what}meta.json records no encoder spec; {fix}")
    try:
        encoder = (load or (lambda s, d: load_encoder(s, modality, d)))(spec, device)
    except BadInput as e:
        raise BadInput(f"{folder}: {what}encoder {spec} cannot be loaded ({e}); {fix}") from None
    except Exception as e:  # noqa: BLE001 - a missing checkpoint or hub model is the user's to fix
        raise BadInput(f"{folder}: {what}encoder {spec} cannot be loaded ({type(e).__name__}: "
                       f"{str(e)[:160]}); {fix}") from None
    if encoder_identity(encoder.identity) != encoder_identity(recorded):
        raise BadInput(f"{folder}: {what}encoder {spec} loads {describe_encoder(encoder.identity)}, but "
                       f"{MADE_WITH[kind]} {describe_encoder(recorded)}; {fix}")
    return encoder
