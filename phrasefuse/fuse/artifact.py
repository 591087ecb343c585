"""The head folder (docs/formats.md, Head folder)::

    HEAD/meta.json              format, kind, task, label vocabulary, features (store path, encoder
                                identity, dim, role, trust), architecture and hyper-parameters, seed,
                                decision rule (multi-label), label prior, metrics, what was saved and why
    HEAD/weights.safetensors    block normalisation, discriminant projections (lgbm), torch weights,
                                label embeddings of the label prior
    HEAD/lgbm.txt               LightGBM's own text model (multi-class), or lgbm-NNNNN.txt per label

No pickle anywhere. The folder is built under a hidden sibling name and renamed into
place: it exists whole or not at all. Loading checks every store against the encoder
identity recorded at training, so a head never scores vectors of another model.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from phrasefuse.errors import BadInput
from phrasefuse.fuse.data import Blocks, Feature, load_blocks, parse_feature_arg
from phrasefuse.fuse.heads import FittedHead, Task, restore
from phrasefuse.fuse.labeltext import apply_prior, cosine_scores
from phrasefuse.folders import (atomic_folder, is_folder_of, library_versions, read_meta_json, readable_folder,
                                write_atomic, write_json_atomic)
from phrasefuse.store import EmbeddingStore, describe_encoder, encoder_identity

FORMAT = "phrasefuse-head"
FORMAT_VERSION = 1
META = "meta.json"
WEIGHTS = "weights.safetensors"


def feature_record(feature: Feature) -> dict:
    return {"name": feature.name, "path": str(feature.path), "modality": feature.modality,
            "encoder": dict(feature.store.meta["encoder"]), "dim": feature.dim,
            "source": feature.store.meta.get("source", {}), "provenance": feature_provenance(feature)}


def feature_provenance(feature: Feature) -> dict:
    """How the feature's vectors are made, so `predict` can make them for new images: the image
    encoder (spec and identity); a text column and its encoder; for phrases the index folder, its
    build id, k, weighting and text model."""
    meta = feature.store.meta
    encoder = meta["encoder"]
    made_by = {"encoder": encoder.get("spec"), "identity": encoder_identity(encoder)}
    if "phrases" in meta:
        p = meta["phrases"]
        index = p.get("index")
        return {"kind": "phrases", "index": os.path.abspath(index) if index else None,
                "build_id": p.get("build_id"), "k": p.get("k"), "weighting": p.get("weighting"),
                "text_model": p.get("text_model") or encoder.get("spec"), "index_encoder": p.get("index_encoder"),
                **made_by}
    if meta.get("modality") == "image":
        return {"kind": "image", **made_by}
    return {"kind": "text", "column": (meta.get("source") or {}).get("column"), **made_by}


# ---------------------------------------------------------------- saving


def save_head(out: str | os.PathLike, meta: dict, tensors: dict[str, np.ndarray], files: dict[str, str]) -> Path:
    """Write the head folder whole or not at all (an existing head at `out` is replaced)."""
    from safetensors.numpy import save

    with atomic_folder(out, FORMAT, "head") as tmp:
        arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        # bytes written by Python, not by safetensors' save_file: a full disk is an OSError with its errno
        write_atomic(tmp / WEIGHTS, lambda path: Path(path).write_bytes(save(arrays)))
        for name, text in files.items():
            write_atomic(tmp / name, lambda path, text=text: Path(path).write_text(text, encoding="utf-8"))
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta,
                "files": sorted([WEIGHTS, *files]), "checksums": file_checksums(tmp, [WEIGHTS, *files]),
                "versions": library_versions(),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        # last: a folder with meta.json is complete
        write_json_atomic(tmp / META, json.loads(json.dumps(full, default=_json_default)))
    return Path(out)


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


# ---------------------------------------------------------------- loading


def is_head(path: str | os.PathLike) -> bool:
    return is_folder_of(path, FORMAT)


@dataclass
class Head:
    """A loaded head: the fitted model plus what it reads and how it decides."""

    path: Path
    meta: dict
    fitted: FittedHead
    prior_labels: np.ndarray | None  # (C, d) label text embeddings for the label prior

    @property
    def task(self) -> Task:
        return self.fitted.task

    @property
    def vocab(self) -> list[str]:
        return self.fitted.task.vocab

    def features(self, overrides: Sequence[str] | None = None) -> list[Feature]:
        """The stores the head reads (recorded paths, or --feature overrides matched by
        name), each checked against the encoder identity recorded at training."""
        records = self.meta["features"]
        paths = {r["name"]: Path(r["path"]) for r in records}
        for arg in overrides or []:
            name, path = parse_feature_arg(arg)
            name = name or Path(path).resolve().name
            if name not in paths:
                raise BadInput(f"--feature {arg}: the head has no feature '{name}' (features: "
                               f"{', '.join(paths)}); pass NAME=PATH with one of these names")
            paths[name] = Path(path)
        return [checked_feature(r, paths[r["name"]], self.path) for r in records]

    def prior_feature(self, overrides: Sequence[str] | None = None) -> Feature | None:
        prior = self.meta.get("prior")
        if not prior:
            return None
        path = Path(prior["store"]["path"])
        for arg in overrides or []:
            name, p = parse_feature_arg(arg)
            if (name or Path(p).resolve().name) == prior["store"]["name"]:
                path = Path(p)
        return checked_feature(prior["store"], path, self.path)

    def inputs(self, ids: pa.Array, source: str,
               overrides: Sequence[str] | None = None) -> tuple[Blocks, np.ndarray | None]:
        """(feature blocks, prior cosine scores or None) for `ids`."""
        blocks = load_blocks(self.features(overrides), ids, source)
        prior = self.prior_feature(overrides)
        cos = None
        if prior is not None:
            pb = load_blocks([prior], ids, source)
            cos = cosine_scores(pb.arrays[0], pb.present[:, 0], self.prior_labels)
        return blocks, cos

    def predict(self, blocks: Blocks, cos: np.ndarray | None = None) -> np.ndarray:
        probs = self.fitted.predict(blocks)
        if cos is not None:
            probs = apply_prior(probs, cos, float(self.meta["prior"]["weight"]))
        return probs

    def decision(self) -> tuple[float | np.ndarray, int | None]:
        """(threshold, max labels) of a multi-label head."""
        d = self.meta.get("decision") or {}
        per_label = d.get("per_label")
        threshold = np.asarray(per_label, np.float32) if per_label else float(d.get("threshold", 0.5))
        return threshold, d.get("max_labels")


def checked_feature(record: dict, path: Path, head_path: Path) -> Feature:
    store = EmbeddingStore(path)
    if not store.exists():
        raise BadInput(f"{path}: feature '{record['name']}' of head {head_path} is not there (no meta.json); "
                       f"pass its new place with --feature {record['name']}=PATH")
    have, want = encoder_identity(store.meta["encoder"]), encoder_identity(record["encoder"])
    if have != want:
        raise BadInput(f"{path}: holds vectors of {describe_encoder(store.meta['encoder'])}, but head {head_path} "
                       f"was trained on {describe_encoder(record['encoder'])} for feature '{record['name']}'; "
                       f"pass a store made with that encoder")
    return Feature(record["name"], store)


def read_head_meta(path: str | os.PathLike) -> dict:
    return read_meta_json(path, fmt=FORMAT, version=FORMAT_VERSION, what="head", not_a="a phrasefuse head",
                          missing="pass a folder written by 'phrasefuse fuse train'", unreadable="re-train the head")


def file_checksums(folder: Path, names: Sequence[str]) -> dict[str, str]:
    """{file name: sha256 of its bytes}: meta.json records them; loading refuses a file that differs."""
    import hashlib

    sums = {}
    for name in sorted(names):
        h = hashlib.sha256()
        with open(Path(folder) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        sums[name] = h.hexdigest()
    return sums


def _check_files(path: Path, meta: dict) -> None:
    """Every file meta.json lists is a plain file name in the head folder, with the recorded checksum
    (heads written before checksums were recorded are checked for their structure only)."""
    names = meta.get("files")
    if not isinstance(names, list) or WEIGHTS not in names or not all(
            isinstance(n, str) and n == Path(n).name and not n.startswith(".") for n in names):
        raise BadInput(f"{path / META}: field 'files' is {names!r}; expected the head's file names; re-train the head")
    recorded = meta.get("checksums")
    if recorded is None:
        return
    if not isinstance(recorded, dict) or set(recorded) != set(names):
        raise BadInput(f"{path / META}: field 'checksums' does not list the head's files; re-train the head")
    try:
        have = file_checksums(path, names)
    except OSError as e:
        raise BadInput(f"{path}: head file unreadable ({e.strerror}: {e.filename}); re-train the head") from None
    for name in names:
        if have[name] != recorded[name]:
            raise BadInput(f"{path / name}: its sha256 differs from the one meta.json recorded (the file was "
                           f"changed or damaged); restore it or re-train the head")


def load_head(path: str | os.PathLike) -> Head:
    """The head at `path`, checked: files against meta.json's checksums, LightGBM trees for their
    structure; anything wrong with a head folder is a BadInput naming the file (exit 2)."""
    from safetensors.numpy import load_file

    path = readable_folder(path)  # a swap killed half-way: the previous head, read in place
    meta = read_head_meta(path)
    _check_files(path, meta)
    try:
        tensors = load_file(str(path / WEIGHTS))
        files = {name: (path / name).read_text(encoding="utf-8") for name in meta["files"] if name != WEIGHTS}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type on a damaged file
        raise BadInput(f"{path}: head files unreadable ({type(e).__name__}: {str(e)[:160]}); "
                       f"re-train the head") from None
    try:
        task = Task(list(meta["labels"]), meta["task"] == "multilabel")
        fitted = restore(meta["architecture"], task, tensors, files)
    except Exception as e:  # noqa: BLE001 - a tampered or truncated head is the user's input
        raise BadInput(f"{path}: head weights do not match meta.json ({type(e).__name__}: {str(e)[:160]}); "
                       f"re-train the head") from None
    return Head(path, meta, fitted, tensors.get("prior.labels"))


# ---------------------------------------------------------------- inspect


def describe_head(path: str | os.PathLike, verify: bool = False):
    """`phrasefuse inspect HEAD`: what a head reads, how it decides, how well it did."""
    from phrasefuse.folder_report import Report

    meta = read_head_meta(path)
    sel = meta.get("selection", {})
    fields = {
        "head": meta.get("kind"),
        "task": meta.get("task"),
        "labels": f"{len(meta.get('labels', []))} ({', '.join(meta.get('labels', [])[:8])}"
                  f"{', ...' if len(meta.get('labels', [])) > 8 else ''})",
    }
    for f in meta.get("features", []):
        fields[f"feature {f['name']}"] = (f"{f.get('role')}, trust {f.get('trust', 1.0):.2f}, "
                                          f"{describe_encoder(f['encoder'])}, {f['path']}")
    if meta.get("prior"):
        fields["label prior"] = f"{meta['prior']['store']['path']}, weight {meta['prior']['weight']}"
    if meta.get("decision"):
        d = meta["decision"]
        fields["decision"] = f"threshold {'per-label' if d.get('per_label') else d.get('threshold')}, " \
                             f"max labels {d.get('max_labels') or 'none'}"
    # as `fuse train` prints it: every part of the saved head, then why that head was kept
    fields["saved"] = saved_parts(meta)
    fields["why"] = f"{sel.get('saved')} head kept: {sel.get('reason')}"
    for split in ("val", "test"):
        m = (meta.get("metrics") or {}).get(split) or {}
        if m:
            fields[split] = "; ".join(f"{name} {format_metrics(v)}" for name, v in m.items() if v)
    fields["seed"] = meta.get("seed")
    fields["created"] = meta.get("created")
    report = Report("head", str(path), fields)
    if verify:
        report.verified = True
        report.problems = verify_head(path)
    return report


def saved_parts(meta: dict) -> str:
    """Every part of a saved head that changes its predictions, from its meta.json: features (text
    ones with their trust), the label prior and its weight, pseudo-shots."""
    feats = ", ".join(f["name"] + (f" (trust {f.get('trust', 1.0):.2f})" if f.get("role") != "image" else "")
                      for f in meta.get("features", []))
    parts = [f"features {feats}"]
    prior = meta.get("prior")
    if prior:
        parts.append(f"label prior {prior['store']['name']}, weight {prior['weight']:.3g}" if prior.get("weight")
                     else "no label prior (left out)")
    pseudo = (meta.get("selection") or {}).get("pseudo_shots")
    if pseudo:
        parts.append(f"{pseudo['rows']} pseudo-shot rows" if pseudo.get("per_label") else "no pseudo-shots (left out)")
    return "; ".join(parts)


def verify_head(path: str | os.PathLike) -> list[str]:
    problems = []
    try:
        head = load_head(path)
    except BadInput as e:
        return [str(e)]
    try:
        head.features()
        head.prior_feature()
    except BadInput as e:
        problems.append(str(e))
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a hand-edited feature record
        problems.append(f"{Path(path) / META}: malformed feature record ({type(e).__name__}: {e}); re-train the head")
    return problems


def format_metrics(m: dict) -> str:
    keys = ("top1", "top5", "macro_f1") if "top1" in m else ("mAP", "micro_precision", "micro_recall", "micro_f1")
    return " ".join(f"{k}={100 * m[k]:.1f}" for k in keys if k in m and m[k] == m[k])
