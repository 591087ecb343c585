"""A head's features for images it has never seen (`phrasefuse predict HEAD INPUT...`).

The head's meta.json records how each feature is made (`artifact.feature_provenance`), so
predict makes them itself, the way the stores were made:

  image    the recorded image encoder (or --model), its identity checked; an image whose bytes
           are already in the recorded store (same content key) is copied from it, not embedded;
  text     a text column of the input, embedded by its recorded encoder (absent: missing text,
           the head's missing-text path);
  phrases  the image embedding searched in the recorded index (or --index; its build id checked),
           the top-k phrases embedded by the recorded text model, averaged as `phrases` does.

Inputs: image files, folders, or any MANIFEST source (tables, tars, Parquet bytes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from phrasefuse.errors import BadInput
from phrasefuse.fuse.data import Blocks
from phrasefuse.manifests import Manifest, Source, image_chunks, read_manifest
from phrasefuse.manifests.sources import FOLDER_IMAGE_EXTS
from phrasefuse.manifests.tables import FILE_COL, ROW_COL
from phrasefuse.store import EmbeddingStore, encoder_identity


@dataclass
class Computed:
    """Features of new rows: the head's blocks, the prior's block, phrases, and per-row errors."""

    ids: pa.Array
    blocks: Blocks
    prior: tuple[np.ndarray, np.ndarray] | None  # (vectors, present) of the label prior's store
    phrases: dict[str, pa.Array]  # phrases feature name -> list<string> per row
    errors: pa.Array  # why a row has no image embedding (null: it has one)


def input_id_prefix(item: str | os.PathLike, several: bool) -> str:
    """What the ids of a folder or manifest INPUT start with: nothing when it is the only INPUT;
    among several, the INPUT as given and '/' (day1/IMG_0001.jpg, shards/00000.tar/000000001), as
    each input's own ids (paths relative to a folder, a table's id column, a tar's keys) may be
    another's too (two cameras' IMG_0001.jpg)."""
    if not several:
        return ""
    name = str(item)
    return name.rstrip("/") + "/"


def read_inputs(inputs: Sequence[str | os.PathLike], id_col: str | None = None,
                image_col: str | None = None, allow_outside_paths: bool = False) -> Manifest:
    """Image files (id: the path as given), folders and manifests (ids: their own, prefixed by
    `input_id_prefix` when several INPUTs are given), as one table (id, image, text columns, image
    byte locations); an id seen twice (the same image or input given twice) is refused. A folder's or
    manifest's images outside it (../, symlinks out) are refused unless `allow_outside_paths`, as in extract."""
    files = [str(i) for i in inputs if os.path.isfile(i) and str(i).lower().endswith(FOLDER_IMAGE_EXTS)]
    parts = []
    if files:
        n = len(files)
        parts.append(pa.table({"id": pa.array(files), "image": pa.array([os.path.abspath(f) for f in files]),
                               FILE_COL: pa.array(["(arguments)"] * n), ROW_COL: pa.array(np.arange(1, n + 1))}))
    bytes_col = None
    for item in inputs:
        if str(item) in files:
            continue
        m = read_manifest(Source(str(item), id_col, image_col), require_image=True,
                          allow_outside_paths=allow_outside_paths)
        if m.image_bytes and (bytes_col or len(inputs) > 1):
            raise BadInput(f"{item}: Parquet with image bytes: predict it on its own (one INPUT)")
        bytes_col = m.image_bytes
        prefix = input_id_prefix(item, len(inputs) > 1)
        ids = m.table["id"].cast(pa.string())
        parts.append(m.table.set_column(m.table.column_names.index("id"), "id",
                                        pc.binary_join_element_wise(prefix, ids, "") if prefix else ids))
    table = pa.concat_tables(parts, promote_options="permissive")
    counts = pc.value_counts(table["id"].combine_chunks())
    twice = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(twice):
        raise BadInput(f"{' '.join(map(str, inputs))}: id '{twice[0]['values']}' comes twice; give each image once")
    return Manifest(" ".join(map(str, inputs)), table, bytes_col)


def provenance(head) -> list[dict]:
    """Each feature record with its provenance; a head trained before they were recorded is refused."""
    records = list(head.meta["features"]) + ([head.meta["prior"]["store"]] if head.meta.get("prior") else [])
    for r in records:
        if not r.get("provenance"):
            raise BadInput(f"{head.path}: the head does not record how its feature '{r['name']}' is made (trained "
                           f"by an earlier phrasefuse); re-train it with 'phrasefuse fuse train' to predict on new "
                           f"images, or use 'predict HEAD --manifest M --out P' with its stores")
    return records


def compute(head, manifest: Manifest, *, index: str | None = None, model: str | None = None,
            device: str = "auto") -> Computed:
    """The head's feature blocks (and the prior's) for every row of `manifest`."""
    records = provenance(head)
    image_rec = next((r for r in records if r["provenance"]["kind"] == "image"), None)
    needs_image = any(r["provenance"]["kind"] in ("image", "phrases") for r in records)
    if needs_image and image_rec is None:
        raise BadInput(f"{head.path}: the head has phrases but no image feature to look them up from; "
                       f"use 'predict HEAD --manifest M --out P' with its stores")
    n = len(manifest)
    # indexes first: a moved one is refused before any model loads
    indexes = {r["name"]: open_index(r, index, head.path) for r in records if r["provenance"]["kind"] == "phrases"}
    image_emb, image_ok, errors = (embed_images(manifest, image_rec, model, device, head.path) if needs_image
                                   else (None, np.ones(n, bool), pa.nulls(n, pa.string())))
    made: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    phrases: dict[str, pa.Array] = {}
    for r in records:
        if r["name"] in made:
            continue
        kind = r["provenance"]["kind"]
        if kind == "image":
            made[r["name"]] = (image_emb, image_ok)
        elif kind == "text":
            made[r["name"]] = embed_column(manifest, r, device, head.path)
        else:
            emb, ok, phrases[r["name"]] = phrase_feature(image_emb, image_ok, r, indexes[r["name"]], device, head.path)
            made[r["name"]] = (emb, ok)
    names = [r["name"] for r in head.meta["features"]]
    blocks = Blocks([made[name][0] for name in names], np.stack([made[name][1] for name in names], axis=1))
    prior = made[head.meta["prior"]["store"]["name"]] if head.meta.get("prior") else None
    return Computed(manifest.ids, blocks, prior, phrases, errors)


# ---------------------------------------------------------------- images


def _encoder(head_path: Path, record: dict, spec: str, modality: str, device: str, fix: str,
             override: str | None = None):
    """The encoder a head feature's provenance records (spec `spec`, or `override`), its identity checked."""
    from phrasefuse.extract.recorded import load_recorded_encoder

    recorded = {"encoder": {**record["provenance"]["identity"], "spec": spec}}
    return load_recorded_encoder(recorded, modality, folder=head_path, kind="head", device=device, fix=fix,
                                 what=f"{record['provenance']['kind']} feature '{record['name']}': ",
                                 override=override)


def embed_images(manifest: Manifest, record: dict, model: str | None, device: str,
                 head_path: Path) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """(vectors (n, dim), has a vector, error reason or null): images whose bytes the recorded store
    already holds are copied from it; the others are embedded by the recorded encoder."""
    from phrasefuse.engine import LocalEngine
    from phrasefuse.extract.jobs import image_job

    prov = record["provenance"]
    spec = model or prov["encoder"]
    encoder = _encoder(head_path, record, prov["encoder"], "image", device, override=model,
                       fix="pass --model SPEC naming those weights (where they are now)")
    store = EmbeddingStore(record["path"])
    reuse = store.exists() and encoder_identity(store.meta["encoder"]) == encoder_identity(prov["identity"])
    known_keys = store.ids_and_keys()["key"].combine_chunks() if reuse else pa.array([], pa.string())
    ids, emb, known, failed = [], [], [], []
    workers = 0 if len(manifest) < 256 else None
    for chunk in image_chunks(manifest.table, manifest.image_bytes):
        job = image_job(chunk, known_keys, encoder, spec, batch_size=64, workers=workers, device=device)
        for batch in LocalEngine().map(job):
            ids += batch.ids
            emb.append(batch.emb)
            known += batch.known
            failed += batch.errors
    if known:
        ids += [i for i, _ in known]
        emb.append(store.embeddings_by_key(pa.array([k for _, k in known], pa.string())))
    n = len(manifest)
    out = np.zeros((n, encoder.dim), np.float32)
    pos = pc.index_in(pa.array(ids, pa.string()), value_set=manifest.ids).to_numpy(zero_copy_only=False)
    if len(pos):
        out[pos] = np.concatenate(emb)
    ok = np.zeros(n, bool)
    ok[pos] = True
    reasons = [None] * n
    if failed:
        where = pc.index_in(pa.array([i for i, _ in failed], pa.string()), value_set=manifest.ids).to_numpy()
        for j, (_, reason) in zip(where, failed):
            reasons[j] = reason
    return out, ok, pa.array(reasons, pa.string())


# ---------------------------------------------------------------- text columns and phrases


def embed_column(manifest: Manifest, record: dict, device: str,
                 head_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A text feature: the input's column, each distinct text embedded once; absent column: missing."""
    from phrasefuse.extract.jobs import text_column

    prov = record["provenance"]
    n, dim = len(manifest), int(record["dim"])
    col = prov.get("column")
    if not col or col not in manifest.table.column_names:
        return np.zeros((n, dim), np.float32), np.zeros(n, bool)
    texts = text_column(manifest, col)
    ok = pc.fill_null(pc.greater(pc.utf8_length(texts), 0), False).to_numpy(zero_copy_only=False)
    out = np.zeros((n, dim), np.float32)
    if ok.any():
        encoder = _encoder(head_path, record, prov["encoder"], "text", device,
                           fix="install that model where its spec says, or re-train the head")
        distinct = pc.unique(texts.filter(pa.array(ok)))
        vectors = encoder.encode(distinct.to_pylist(), batch_size=256)
        out[ok] = vectors[pc.index_in(texts.filter(pa.array(ok)), value_set=distinct).to_numpy()]
    return out, ok


def open_index(record: dict, override: str | None, head_path: Path):
    """The recorded phrase index (or --index), refused when it is missing or another build."""
    from phrasefuse.index.folder import PhraseIndex

    prov = record["provenance"]
    path = override or prov.get("index")
    if not path or not (Path(path) / "meta.json").is_file():
        raise BadInput(f"{path}: the phrase index of feature '{record['name']}' (head {head_path}) is not there; "
                       f"pass its new place with --index PATH")
    index = PhraseIndex(path)
    if index.meta.get("build_id") != prov.get("build_id"):
        raise BadInput(f"{path}: index build {str(index.meta.get('build_id'))[:12]}, but feature '{record['name']}' "
                       f"of head {head_path} was made with build {str(prov.get('build_id'))[:12]}; pass that index "
                       f"with --index PATH (or re-run 'phrases' and re-train)")
    return index


def phrase_feature(image_emb: np.ndarray, image_ok: np.ndarray, record: dict, index, device: str,
                   head_path: Path) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """(vectors, present, phrases per row): as `phrases` makes them, for the rows with an image vector."""
    from phrasefuse.index.phrases import PhraseSearch, list_column

    prov = record["provenance"]
    text_encoder = _encoder(head_path, record, prov["text_model"], "text", device,
                            fix="install the text model the phrases store was made with where its spec says, "
                                "or re-train the head")
    n = len(image_ok)
    out, ok = np.zeros((n, int(record["dim"])), np.float32), np.zeros(n, bool)
    rows_with_image = np.flatnonzero(image_ok)
    k = int(prov["k"])
    rows = np.full((n, k), -1, np.int64)
    if len(rows_with_image):
        search = PhraseSearch(index, text_encoder, k=k, score_weighted=prov.get("weighting") == "score",
                              text_batch_size=256)
        features, found_rows, _ = search(image_emb[rows_with_image])
        rows[rows_with_image, :found_rows.shape[1]] = found_rows
        has = (found_rows >= 0).any(axis=1)
        out[rows_with_image[has]] = features[has]
        ok[rows_with_image[has]] = True
    found = rows >= 0
    lists = list_column(index.phrases.take(pa.array(rows[found])), found)
    return out, ok, pc.if_else(pa.array(image_ok), lists, pa.nulls(n, lists.type))
