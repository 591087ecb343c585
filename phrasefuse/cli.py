"""phrasefuse: better image classifiers by adding text to images.

Embed every image and text of a dataset once (extract), generate phrases for
images that have none (index, phrases), then train light heads on the cached
embeddings in seconds (fuse).

This module only parses arguments, calls one function and prints. Heavy
libraries are imported inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Optional, Protocol

import click
import typer

from phrasefuse.errors import BadInput, check_seed, printable, printable_lines
from phrasefuse.extract import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL
from phrasefuse.fuse import HEAD_KINDS
from phrasefuse.index import DEFAULT_LOOKUP_K, DEFAULT_PHRASES_K, DEFAULT_TARGET_RECALL
from phrasefuse.index.kinds import KINDS as INDEX_KINDS

app = typer.Typer(help=__doc__.split("\n\nThis module")[0], no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None)


def _version(value: bool) -> None:
    if value:
        from phrasefuse import __version__

        typer.echo(f"phrasefuse {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Better image classifiers by adding text to images."""
extract_app = typer.Typer(help="Embed every image or text of a manifest once, into an embedding store.",
                          no_args_is_help=True)
app.add_typer(extract_app, name="extract")


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Dtype(str, Enum):
    float32 = "float32"
    float16 = "float16"


SHARD_SIZE_HELP = "Rows per shard; a killed job loses at most the shard it was filling."
MANIFEST_HELP = ("Dataset manifest: a table (Parquet, CSV/TSV, JSON Lines, or a quoted glob), a folder of images "
                 "(CLASS/ subfolders give the label), WebDataset tars ('shards/{00000..00099}.tar'), or Parquet "
                 "with image bytes.")
ALLOW_OUTSIDE_HELP = ("Read images outside the manifest's folder (../, absolute paths, symlinks out); "
                      "refused by default.")
ID_COL_HELP = "Column holding the row ids (default 'id'; tars: the sample key)."
IMAGE_COL_HELP = ("Column holding image paths or bytes (binary, or a struct {bytes, path}) (default 'image'; "
                  "tars: the image member's extension).")
MAP_LABEL_COL_HELP = "Column (tars: .json field or member extension) read as the label (default 'label'; tars: .cls)."


def _source(manifest: str, id_col: Optional[str], image_col: Optional[str], label_col: Optional[str] = None):
    from phrasefuse.manifests import source_with

    return source_with(manifest, id_col, image_col, label_col)


class Engine(str, Enum):
    local = "local"
    ray = "ray"


ENGINE_HELP = "local: this machine; ray: model actors on a Ray cluster (pip install 'phrasefuse[ray]'), same store."
RAY_ADDRESS_HELP = "--engine ray: cluster address (default: $RAY_ADDRESS, else a Ray started on this machine)."
RAY_ACTORS_HELP = "--engine ray: model actors (default: one per GPU, else one per CPU but one)."


REPLICAS_HELP = ("Model processes on the CPU, each single-threaded and reading its own images (--workers then "
                 "unused); default 1: the model in this process over every core, which was faster on a quiet "
                 "machine (docs/benchmarks.md). auto: one per core when the model runs on the CPU "
                 "with --engine local, on 2 or more cores, for 2,000 rows or more and a model of 1M parameters or "
                 "more (fewer when 3 GB each do not fit in the available memory). Each replica holds its own model "
                 "and batch.")


def _ray_options(engine: Engine, address: Optional[str], actors: Optional[int]):
    from phrasefuse.engine import RayOptions

    if engine is not Engine.ray and (address is not None or actors is not None):
        raise BadInput("--ray-address and --ray-actors apply to --engine ray; add --engine ray or drop them")
    return RayOptions(address=address, actors=actors)


@extract_app.command("images")
def extract_images(
    manifest: str = typer.Argument(..., metavar="MANIFEST", help=MANIFEST_HELP),
    out: Path = typer.Option(..., "--out", help="Embedding store folder (created, or resumed)."),
    id_col: Optional[str] = typer.Option(None, "--id-col", help=ID_COL_HELP),
    image_col: Optional[str] = typer.Option(None, "--image-col", help=IMAGE_COL_HELP),
    label_col: Optional[str] = typer.Option(None, "--label-col", help=MAP_LABEL_COL_HELP),
    model: str = typer.Option(DEFAULT_IMAGE_MODEL, "--model", help="Encoder spec: open_clip:ARCH@PRETRAINED, timm:ARCH@WEIGHTS, or the built-in default."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per model call."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decoding processes (default: min(cores, 4); 0 decodes in the main process)."),
    device: Device = typer.Option(Device.auto, "--device", help="auto picks CUDA when visible."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N rows of the manifest."),
    shard_size: int = typer.Option(10_000, "--shard-size", help=SHARD_SIZE_HELP),
    dtype: Dtype = typer.Option(Dtype.float32, "--dtype", help="Stored float type."),
    allow_outside_paths: bool = typer.Option(False, "--allow-outside-paths", help=ALLOW_OUTSIDE_HELP),
    engine: Engine = typer.Option(Engine.local, "--engine", help=ENGINE_HELP),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    ray_actors: Optional[int] = typer.Option(None, "--ray-actors", help=RAY_ACTORS_HELP),
    replicas: str = typer.Option("1", "--replicas", help=REPLICAS_HELP),
    max_image_mb: Optional[float] = typer.Option(None, "--max-image-mb", help="Image files larger than this are error rows (default 256)."),
    max_image_megapixels: Optional[float] = typer.Option(None, "--max-image-megapixels", help="Images with more pixels are error rows (default 89.5, Pillow's bomb limit)."),
    max_aspect_ratio: Optional[float] = typer.Option(None, "--max-aspect-ratio", help="Images longer than this times their width (or wider) are error rows (default 50)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON document."),
) -> None:
    """Embed the images of MANIFEST into the store --out.

    Already-embedded ids are skipped and identical image bytes are embedded once,
    so re-running (after a crash, or with a larger manifest) only does what is missing.
    Unreadable images go to STORE/errors.parquet; the job goes on.
    """
    from phrasefuse.extract.jobs import extract_images

    summary = extract_images(_source(manifest, id_col, image_col, label_col), out, model=model, batch_size=batch_size, workers=workers, device=device.value,
                  limit=limit, shard_size=shard_size, dtype=dtype.value, allow_outside_paths=allow_outside_paths,
                  engine=engine.value, ray=_ray_options(engine, ray_address, ray_actors),
                  limits=_image_limits(max_image_mb, max_image_megapixels, max_aspect_ratio),
                  progress=False if as_json else None, replicas=replicas)
    _print(summary, as_json)


def _image_limits(max_image_mb, max_image_megapixels, max_aspect_ratio):
    from phrasefuse.extract.limits import ImageLimits

    try:
        return ImageLimits.of(max_image_mb, max_image_megapixels, max_aspect_ratio)
    except ValueError as e:
        raise BadInput(f"--{str(e).replace('_', '-')}") from None


@extract_app.command("texts")
def extract_texts(
    manifest: str = typer.Argument(..., metavar="MANIFEST", help=MANIFEST_HELP),
    col: str = typer.Option(..., "--col", help="Text column (title, description, tags...; lists are joined; tars: txt or a .json field)."),
    id_col: Optional[str] = typer.Option(None, "--id-col", help=ID_COL_HELP),
    image_col: Optional[str] = typer.Option(None, "--image-col", help=IMAGE_COL_HELP),
    label_col: Optional[str] = typer.Option(None, "--label-col", help=MAP_LABEL_COL_HELP),
    out: Path = typer.Option(..., "--out", help="Embedding store folder (created, or resumed)."),
    model: str = typer.Option(DEFAULT_TEXT_MODEL, "--model", help="Encoder spec: sentence-transformers:NAME_OR_PATH, open_clip:ARCH@PRETRAINED, or the built-in default."),
    batch_size: int = typer.Option(256, "--batch-size", help="Texts per model call."),
    device: Device = typer.Option(Device.auto, "--device"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N rows of the manifest."),
    shard_size: int = typer.Option(10_000, "--shard-size", help=SHARD_SIZE_HELP),
    dtype: Dtype = typer.Option(Dtype.float32, "--dtype", help="Stored float type."),
    engine: Engine = typer.Option(Engine.local, "--engine", help=ENGINE_HELP),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    ray_actors: Optional[int] = typer.Option(None, "--ray-actors", help=RAY_ACTORS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON document."),
) -> None:
    """Embed the text column --col of MANIFEST into the store --out.

    Each distinct text is embedded once. Missing and empty texts are recorded in
    STORE/errors.parquet (heads treat those ids as having no text).
    """
    from phrasefuse.extract.jobs import extract_texts

    summary = extract_texts(_source(manifest, id_col, image_col, label_col), col, out, model=model, batch_size=batch_size,
                  device=device.value, limit=limit,
                  shard_size=shard_size, dtype=dtype.value, engine=engine.value,
                  ray=_ray_options(engine, ray_address, ray_actors), progress=False if as_json else None)
    _print(summary, as_json)


# ---------------------------------------------------------------- fuse: heads on cached embeddings

fuse_app = typer.Typer(help="Train, evaluate and ablate heads on cached embeddings (seconds; nothing is re-embedded).",
                       no_args_is_help=True)
app.add_typer(fuse_app, name="fuse")


HeadKind = Enum("HeadKind", {kind: kind for kind in HEAD_KINDS}, type=str)  # one list: phrasefuse.fuse


FEATURE_HELP = ("Embedding store (repeatable): image, metadata text, phrases. NAME=PATH names the feature "
                "(default: the folder name).")
PSEUDO_HELP = ("Phrase index of the image feature's encoder: prototypes of query phrases matched to a label text "
               "(margin over the 2nd) offered as extra training rows; kept only when they clearly win on held-out "
               "rows (never at 1 shot).")
# The same value and words in `fuse train` and `fuse ablate` (kept in sync by sharing the string).
LABEL_PRIOR_HELP = ("The label prior's text feature: a NAME among the --feature stores (e.g. phrases), or a store "
                    "PATH. Its cosine to each label's text is added to the head's log-probabilities, weighted on "
                    "held-out rows (val split, else cross-validation within the training rows or shots); weight 0 "
                    "unless it clearly helps. In 'fuse ablate', rows listing 'label-prior' use it.")
LABEL_COL_HELP = "Label column (default: 'label', else 'labels'; a list column means multi-label)."


@fuse_app.command("train")
def fuse_train(
    manifest: str = typer.Option(..., "--manifest", help="Dataset manifest with id, labels and (optionally) split."),
    id_col: Optional[str] = typer.Option(None, "--id-col", help=ID_COL_HELP),
    image_col: Optional[str] = typer.Option(None, "--image-col", help=IMAGE_COL_HELP),
    feature: list[str] = typer.Option(..., "--feature", metavar="STORE", help=FEATURE_HELP),
    head: HeadKind = typer.Option(..., "--head", help="Which head (linear: logistic regression; mlp: torch; lgbm: LightGBM)."),
    out: Path = typer.Option(..., "--out", help="Head folder (written whole; an existing head is replaced)."),
    label_col: Optional[str] = typer.Option(None, "--label-col", help=LABEL_COL_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation, shuffling and subsampling."),
    multilabel: bool = typer.Option(False, "--multilabel", help="Multi-label (sigmoid) head even on a string column ('a|b')."),
    threshold: float = typer.Option(0.3, "--threshold", help="Multi-label: global decision threshold."),
    per_label_thresholds: bool = typer.Option(False, "--per-label-thresholds", help="Multi-label: tune one threshold per label on val."),
    max_labels: Optional[int] = typer.Option(None, "--max-labels", help="Multi-label: at most N labels per image."),
    label_descriptions: Optional[str] = typer.Option(None, "--label-descriptions", help="Table (label, description): label texts for --align-descriptions and --label-prior."),
    align_descriptions: float = typer.Option(0.0, "--align-descriptions", help="mlp: weight W of an InfoNCE loss pulling image projections to frozen label-description embeddings."),
    text_model: str = typer.Option(DEFAULT_TEXT_MODEL, "--text-model", help="Text encoder for --align-descriptions."),
    label_prior: Optional[str] = typer.Option(None, "--label-prior", metavar="NAME|STORE", help=LABEL_PRIOR_HELP),
    shots: Optional[int] = typer.Option(None, "--shots", metavar="K", help="Train on K labelled rows per class drawn with --seed exactly as 'fuse ablate --shots K' draws them (its row for that seed); choices by cross-validation within them."),
    tune_rows: Optional[int] = typer.Option(None, "--tune-rows", help="linear/lgbm: training rows used to tune text trust (default 10,000 / 5,000; all rows train the final head)."),
    pseudo_shots: Optional[str] = typer.Option(None, "--pseudo-shots", metavar="INDEX", help=PSEUDO_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Train a head on --feature stores; report it beside the image-only head; save the better one."""
    from phrasefuse.fuse.train import train_head

    check_seed(seed)
    report = train_head(_source(manifest, id_col, image_col), feature, out, kind=head.value, seed=seed, label_col=label_col, multilabel=multilabel,
                        threshold=threshold, per_label_thresholds=per_label_thresholds, max_labels=max_labels,
                        label_descriptions=label_descriptions, align_descriptions=align_descriptions,
                        text_model=text_model, label_prior=label_prior, tune_rows=tune_rows,
                        pseudo_shots=pseudo_shots, shots=shots)
    _warn(report.warnings)
    _print(report, as_json)


@fuse_app.command("eval")
def fuse_eval(
    head: Path = typer.Argument(..., metavar="HEAD", help="Head folder from 'fuse train'."),
    manifest: str = typer.Option(..., "--manifest", help="Manifest with ids and labels."),
    id_col: Optional[str] = typer.Option(None, "--id-col", help=ID_COL_HELP),
    image_col: Optional[str] = typer.Option(None, "--image-col", help=IMAGE_COL_HELP),
    split: str = typer.Option("test", "--split", help="train, val, test or all."),
    feature: Optional[list[str]] = typer.Option(None, "--feature", metavar="NAME=STORE", help="Read feature NAME from another store (same encoder)."),
    label_col: Optional[str] = typer.Option(None, "--label-col", help="Label column (default: the head's)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Top-1/top-5/macro-F1/per-class accuracy, or mAP and micro P/R/F1 (multi-label), on one split."""
    from phrasefuse.fuse.evaluate import evaluate

    report = evaluate(head, _source(manifest, id_col, image_col), split=split, feature_args=feature, label_col=label_col)
    _print(report, as_json)


@fuse_app.command("ablate")
def fuse_ablate(
    manifest: str = typer.Option(..., "--manifest", help="Dataset manifest with labels and splits."),
    id_col: Optional[str] = typer.Option(None, "--id-col", help=ID_COL_HELP),
    image_col: Optional[str] = typer.Option(None, "--image-col", help=IMAGE_COL_HELP),
    feature: list[str] = typer.Option(..., "--feature", metavar="STORE", help=FEATURE_HELP),
    head: HeadKind = typer.Option(..., "--head", help="Which head (linear: logistic regression; mlp: torch; lgbm: LightGBM)."),
    shots: Optional[list[str]] = typer.Option(None, "--shots", metavar="K", help="K labelled examples per class (repeatable, or 1,5,10); default: all training data."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds (shots draws and head initialisations) to average over."),
    seed: int = typer.Option(0, "--seed", help="First seed."),
    label_col: Optional[str] = typer.Option(None, "--label-col", help=LABEL_COL_HELP),
    multilabel: bool = typer.Option(False, "--multilabel", help="Multi-label heads."),
    row: Optional[list[str]] = typer.Option(None, "--row", metavar="A+B", help="A table row: feature names joined by + (repeatable); default: image, each text, all text, image + each text, all."),
    with_full: bool = typer.Option(False, "--with-full", help="With --shots, also the full-data table."),
    label_prior: Optional[str] = typer.Option(None, "--label-prior", metavar="NAME|STORE", help=LABEL_PRIOR_HELP),
    label_descriptions: Optional[str] = typer.Option(None, "--label-descriptions", help="Table with label, description: the label texts of --label-prior (default: the label names)."),
    pseudo_shots: Optional[str] = typer.Option(None, "--pseudo-shots", metavar="INDEX", help=PSEUDO_HELP + " Rows that list 'pseudo-shots' use it (--row image+pseudo-shots)."),
    out: Path = typer.Option(Path("ablation"), "--out", help="Folder for ablation.md and ablation.json."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Train and test every sensible feature subset; print the table (also written as Markdown and JSON)."""
    from phrasefuse.fuse.ablate import ablate

    check_seed(seed, count=max(1, seeds))
    ks = []
    for value in shots or []:
        for part in str(value).split(","):
            try:
                ks.append(int(part))
            except ValueError:
                raise BadInput(f"--shots {value}: expected whole numbers (e.g. --shots 1 --shots 5, or 1,5)") from None
    rows = [r.split("+") for r in row] if row else None
    report = ablate(_source(manifest, id_col, image_col), feature, head.value, shots=ks, seeds=seeds, seed=seed, label_col=label_col,
                    multilabel=multilabel, out=out, rows=rows, full=with_full or None, label_prior=label_prior,
                    label_descriptions=label_descriptions, pseudo_shots=pseudo_shots,
                    progress=False if as_json else None)
    _warn(report.data.get("warnings", []))
    _print(report, as_json)


@fuse_app.command("zeroshot")
def fuse_zeroshot(
    manifest: str = typer.Option(..., "--manifest", help="Manifest with ids and labels."),
    id_col: Optional[str] = typer.Option(None, "--id-col", help=ID_COL_HELP),
    image_col: Optional[str] = typer.Option(None, "--image-col", help=IMAGE_COL_HELP),
    phrases: str = typer.Option(..., "--phrases", help="Phrases (or any text) store; its encoder embeds the label texts."),
    label_descriptions: Optional[str] = typer.Option(None, "--label-descriptions", help="Table (label, description); default: label names."),
    split: str = typer.Option("test", "--split", help="train, val, test or all."),
    label_col: Optional[str] = typer.Option(None, "--label-col", help=LABEL_COL_HELP),
    multilabel: bool = typer.Option(False, "--multilabel", help="Multi-label labels."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Classify with no labelled image: cos(text feature, label text embedding) as class scores."""
    from phrasefuse.fuse.evaluate import zeroshot

    report = zeroshot(_source(manifest, id_col, image_col), phrases, label_descriptions=label_descriptions, split=split, label_col=label_col,
                      multilabel=multilabel)
    _print(report, as_json)


@app.command("predict")
def predict(
    head: Path = typer.Argument(..., metavar="HEAD", help="Head folder from 'fuse train'."),
    inputs: Optional[list[str]] = typer.Argument(None, metavar="INPUT", help="Image files, folders, or any MANIFEST (tables, WebDataset tars, Parquet with image bytes). Ids: an image file's path as given; a folder's images, their paths relative to it; a manifest's, its id column (tars: the sample key). With several INPUTs, a folder's or manifest's ids start with the INPUT as given and '/' (day1/IMG_0001.jpg), so two folders may hold the same file names."),
    manifest: Optional[str] = typer.Option(None, "--manifest", help="Instead of INPUT: a manifest whose ids are in the head's feature stores (with --out)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Predictions file, its format by its extension: .parquet, .csv (list cells such as top_labels as JSON arrays, e.g. [\"cat\", \"dog\"]) or .jsonl; any other extension is refused. Written whole."),
    top_k: int = typer.Option(5, "--top-k", help="Labels (with probabilities) per row."),
    feature: Optional[list[str]] = typer.Option(None, "--feature", metavar="NAME=STORE", help="--manifest: read feature NAME from another store (same encoder), e.g. one extracted for this manifest."),
    index: Optional[str] = typer.Option(None, "--index", help="INPUT: the phrase index, when it has moved from where the head recorded it."),
    model: Optional[str] = typer.Option(None, "--model", help="INPUT: the image encoder spec, when the recorded one has moved (same weights)."),
    device: Device = typer.Option(Device.auto, "--device"),
    id_col: Optional[str] = typer.Option(None, "--id-col", help=ID_COL_HELP),
    image_col: Optional[str] = typer.Option(None, "--image-col", help=IMAGE_COL_HELP),
    allow_outside_paths: bool = typer.Option(False, "--allow-outside-paths", help=ALLOW_OUTSIDE_HELP),
    label_col: Optional[str] = typer.Option(None, "--label-col", help="The inputs' true labels, to score the predictions against (default: the head's label column, else 'label': a folder's CLASS/ subfolders)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Classify INPUT images (their features computed as the head records: image encoder, text
    columns, phrases through the index; images already in a recorded store are not re-embedded):
    per image the label, its probability, the top-k and the phrases behind it. With --manifest:
    every row of a manifest whose features are in stores, into --out. Labelled inputs (class
    subfolders, a label column) also get true_label and correct, and top-1 and per-class accuracy.

    Printed lines show control characters of ids, labels and phrases as escapes (\\n, \\x1b);
    --out and --json keep them exact."""
    if manifest is not None:
        from phrasefuse.fuse.evaluate import predict as predict_manifest

        if inputs:
            raise BadInput("predict: give INPUT images or --manifest, not both")
        if out is None:
            raise BadInput("predict --manifest: --out is required (the predictions file)")
        summary = predict_manifest(head, _source(manifest, id_col, image_col), out, top_k=top_k, feature_args=feature,
                                   label_col=label_col)
        _warn(summary.warnings)
        _print(summary, as_json)
        return
    if not inputs:
        raise BadInput("predict: give INPUT images (files, folders, manifests) or --manifest M --out P")
    from phrasefuse.fuse.evaluate import predict_new

    result = predict_new(head, inputs, top_k=top_k, out=out, index=index, model=model, device=device.value,
                         id_col=id_col, image_col=image_col, label_col=label_col,
                         allow_outside_paths=allow_outside_paths)
    _warn(result.warnings)
    _print(result, as_json)


# ---------------------------------------------------------------- index (phrasefuse/index/)

index_app = typer.Typer(help="Prototype index: phrases for images that came with no text.", no_args_is_help=True)
app.add_typer(index_app, name="index")


IndexKind = Enum("IndexKind", {kind: kind for kind in ("auto", *INDEX_KINDS)}, type=str)  # the registry: phrasefuse.index.kinds


@index_app.command("build")
def index_build(
    pairs: str = typer.Option(..., "--pairs", help="Pairs table (Parquet, CSV, JSON Lines, or a quoted glob): query, image_id, optional weight."),
    images: Path = typer.Option(..., "--images", help="Image embedding store whose ids the pairs name."),
    out: Path = typer.Option(..., "--out", help="Index folder (written whole, replacing an older index)."),
    min_images: int = typer.Option(1, "--min-images", help="Drop phrases with fewer images than this."),
    text_prototypes: bool = typer.Option(False, "--text-prototypes", help="Phrases with no image get a prototype from the image encoder's text tower (open_clip stores only)."),
    kind: IndexKind = typer.Option(IndexKind.auto, "--kind", help="FAISS index kind; auto: exact when small, else IVF (PQ when over --memory)."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Memory budget of the prototype sums (query partitions summed in passes) and of the loaded index, e.g. 4G (default: half of this machine's RAM)."),
    weights: bool = typer.Option(True, "--weights/--no-weights", help="Weight each pair by the table's 'weight' column, when it has one."),
    target_recall: float = typer.Option(DEFAULT_TARGET_RECALL, "--target-recall", help="recall@10 vs exact search that the search setting is tuned to reach."),
    device: Device = typer.Option(Device.auto, "--device", help="The text tower of --text-prototypes, and FAISS: k-means training and tuning searches run on the GPU when FAISS sees one (the gpu extra); the index is saved in the CPU format either way."),
    seed: int = typer.Option(0, "--seed", help="Seed of training samples and recall queries."),
    engine: Engine = typer.Option(Engine.local, "--engine", help="local: this machine; ray: the per-shard prototype sums in Ray tasks (pip install 'phrasefuse[ray]'), same index."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON document."),
) -> None:
    """Build the prototype index: each query phrase's prototype is the re-normalised mean
    embedding of its images; a FAISS index over them gives an image its nearest phrases.

    Phrases are normalised (case, whitespace). Pairs naming ids missing from the store, empty
    phrases and duplicate pairs are counted and dropped; recall@10 against exact search is
    measured on held-out image embeddings and stored in INDEX/meta.json.
    """
    from phrasefuse.index.build import build_index

    check_seed(seed)
    summary = build_index(pairs, images, out, min_images=min_images, text_prototypes=text_prototypes,
                          kind=kind.value, memory=memory, use_weights=weights, target_recall=target_recall,
                          device=device.value, seed=seed, engine=engine.value,
                          ray=_ray_options(engine, ray_address, None), progress=False if as_json else None)
    _print(summary, as_json)


@index_app.command("lookup")
def index_lookup(
    index: Path = typer.Argument(..., metavar="INDEX", help="Index folder."),
    images: list[Path] = typer.Argument(..., metavar="IMAGE", help="Image files."),
    k: int = typer.Option(DEFAULT_LOOKUP_K, "-k", help="Phrases per image."),
    device: Device = typer.Option(Device.auto, "--device", help="The image encoder and the FAISS search (on a GPU copy of the index when FAISS sees a GPU)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document: a list of {image, phrases, scores}."),
) -> None:
    """Print the top-k phrases (cosine scores) of IMAGE files, embedded with the index's own encoder."""
    from phrasefuse.index.lookup import lookup

    result = lookup(index, images, k=k, device=device.value)
    _print(result, as_json)


@app.command("phrases")
def phrases(
    index: Path = typer.Option(..., "--index", help="Index folder (phrasefuse index build)."),
    images: Path = typer.Option(..., "--images", help="Image store embedded with the index's encoder."),
    out: Path = typer.Option(..., "--out", help="Phrases store folder (created, or resumed)."),
    k: int = typer.Option(DEFAULT_PHRASES_K, "-k", help="Phrases per image, averaged into the text feature."),
    text_model: str = typer.Option(DEFAULT_TEXT_MODEL, "--text-model", help="Encoder spec that embeds the phrases."),
    score_weighted: bool = typer.Option(False, "--score-weighted", help="Weight the phrase embeddings by their cosine scores instead of a plain mean."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per FAISS search (default: sized to the device; 10,000 on CPU)."),
    text_batch_size: Optional[int] = typer.Option(None, "--text-batch-size", help="Phrases per text-model call (default: sized to the device; 256 on CPU)."),
    device: Device = typer.Option(Device.auto, "--device", help="The FAISS search (on a GPU copy of the index when FAISS sees a GPU) and the text model."),
    shard_size: int = typer.Option(10_000, "--shard-size", help=SHARD_SIZE_HELP),
    dtype: Dtype = typer.Option(Dtype.float32, "--dtype", help="Stored float type."),
    engine: Engine = typer.Option(Engine.local, "--engine", help=ENGINE_HELP),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    ray_actors: Optional[int] = typer.Option(None, "--ray-actors", help=RAY_ACTORS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON document."),
) -> None:
    """For every image of --images: its top-k phrases and scores, and the mean of their text
    embeddings, into an embedding store (with 'phrases' and 'scores' columns) that fuse reads
    as a feature. Ids already in --out are skipped; each distinct phrase is embedded once.
    """
    from phrasefuse.index.phrases import generate_phrases

    summary = generate_phrases(index, images, out, k=k, text_model=text_model, score_weighted=score_weighted,
                               batch_size=batch_size, text_batch_size=text_batch_size, device=device.value,
                               shard_size=shard_size, dtype=dtype.value,
                               engine=engine.value, ray=_ray_options(engine, ray_address, ray_actors),
                               progress=False if as_json else None)
    _print(summary, as_json)


# ---------------------------------------------------------------- interop (phrasefuse/interop.py)


class ExportFormat(str, Enum):
    npy = "npy"


class Modality(str, Enum):
    image = "image"
    text = "text"


@app.command("export")
def export_store(
    store: Path = typer.Argument(..., metavar="STORE", help="Embedding store folder."),
    fmt: ExportFormat = typer.Option(ExportFormat.npy, "--format", help="npy: {img,text}_emb/*.npy (float16) + metadata/*.parquet."),
    out: Path = typer.Option(..., "--out", help="Folder to write (whole or not at all; an earlier export there is replaced)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON document."),
) -> None:
    """Write STORE in the layout embedding readers and index builders read: one float16
    img_emb_N.npy (text_emb_N.npy for text stores) and one metadata_N.parquet (id, key, ...,
    same row order) per shard."""
    from phrasefuse.interop import export_npy

    summary = export_npy(store, out)
    _print(summary, as_json)


@app.command("import")
def import_store(
    folder: Path = typer.Argument(..., metavar="FOLDER", help="Folder with img_emb/ (or text_emb/) *_N.npy and metadata/metadata_N.parquet."),
    out: Path = typer.Option(..., "--out", help="Embedding store folder (created, or resumed: ids already there are skipped)."),
    like: Optional[Path] = typer.Option(None, "--like", help="Encoder identity: the same as this existing store's."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Encoder identity: this phrasefuse spec (loaded once to checksum its weights)."),
    encoder_name: Optional[str] = typer.Option(None, "--encoder-name", help="Encoder identity by hand: model name (with --weights-sha256)."),
    encoder_family: Optional[str] = typer.Option(None, "--encoder-family", help="With --encoder-name: family (default 'external')."),
    weights_sha256: Optional[str] = typer.Option(None, "--weights-sha256", help="With --encoder-name: the weights' checksum (or a tag that tells them apart)."),
    modality: Optional[Modality] = typer.Option(None, "--modality", help="image or text (default: from img_emb/ or text_emb/)."),
    id_col: str = typer.Option("id", "--id-col", help="Metadata column holding the row ids."),
    dtype: Optional[Dtype] = typer.Option(None, "--dtype", help="Stored float type (default: float16 for float16 arrays, else float32)."),
    shard_size: int = typer.Option(10_000, "--shard-size", help=SHARD_SIZE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON document."),
) -> None:
    """Turn embeddings computed elsewhere (.npy + metadata Parquet) into a store that 'index build'
    and 'fuse' use without re-embedding. Without --like/--encoder/--encoder-name the identity is
    read from FOLDER/meta.json (a 'phrasefuse export'). Vectors are L2-normalised on the way in."""
    from phrasefuse.interop import import_npy

    summary = import_npy(folder, out, modality=modality.value if modality else None, like=like, encoder=encoder,
                         encoder_family=encoder_family, encoder_name=encoder_name, weights_sha256=weights_sha256,
                         id_col=id_col, dtype=dtype.value if dtype else None, shard_size=shard_size)
    _print(summary, as_json)


@app.command("inspect")
def inspect(
    path: Path = typer.Argument(..., metavar="PATH", help="An embedding store, an index folder or a head folder."),
    verify: bool = typer.Option(False, "--verify", help="Read every shard and check schema, NaN/zero vectors and duplicate ids."),
    quarantine: bool = typer.Option(False, "--quarantine", help="With --verify (implied): move bad shards to STORE/quarantine/ so that re-running the job re-embeds their rows."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Show what PATH holds: its meta, row count and error count."""
    from phrasefuse.inspect import describe

    report = describe(path, verify=verify, quarantine=quarantine)
    _print(report, as_json)
    if report.problems:
        raise BadInput(f"{path}: {len(report.problems)} problem(s) found, first: {report.problems[0]}")


@app.command("run")
def run(
    config: Path = typer.Argument(..., metavar="CONFIG", help="TOML file describing the pipeline (see manifests/example.toml)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (the stages) instead of text."),
) -> None:
    """Run every stage a config describes, into its work folder; stages already done for the same
    inputs and settings are skipped. Writes WORK/report.html."""
    from phrasefuse.run.pipeline import run_config

    _print_stages(run_config(config, progress=False if as_json else None), as_json)


@app.command("demo")
def demo(
    work: Path = typer.Option(Path("work/demo"), "--work", help="Folder for the generated dataset, stores, heads and report."),
    n: int = typer.Option(1000, "--n", help="Labelled images to generate (at least 500)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (the stages) instead of text."),
) -> None:
    """Generate a labelled dataset with look-alike classes, noisy metadata and a query corpus; run the
    pipeline on it with the built-in offline encoders; print the ablation table; write the report."""
    from phrasefuse.demo import run_demo

    _print_stages(run_demo(work, n=n, progress=False if as_json else None), as_json)


def _print_stages(results, as_json: bool) -> None:
    """Each result's text as it completes (demo: its data first, then every stage), then the run's
    summary; with --json only the summary, which lists the stages."""
    from phrasefuse.run.pipeline import RunSummary, StageResult

    stages = []
    for result in results:
        if not as_json:
            typer.echo(printable_lines(result.text()))
        if isinstance(result, StageResult):
            stages.append(result)
    _print(RunSummary.of(stages), as_json)


def _warn(lines) -> None:
    """One stderr line per statistical caveat (stdout stays the report or the JSON document)."""
    for line in lines:
        typer.echo(f"phrasefuse: warning: {printable(line)}", err=True)


class CommandResult(Protocol):
    """What every command returns: its --json document and its text."""

    def as_dict(self) -> dict | list: ...

    def text(self) -> str: ...


def _print(result: CommandResult, as_json: bool) -> None:
    # JSON escapes every control character itself (ASCII output); text output may quote file
    # names, labels and phrases: no terminal escape of theirs reaches the terminal raw. A newline
    # inside a name is escaped where the name is written (e.g. predict's lines), not here.
    text = json.dumps(result.as_dict(), indent=2, default=str) if as_json else printable_lines(result.text())
    if text:
        typer.echo(text)


# Typer >= 0.29 raises usage errors (missing option, bad choice) and aborts from its own vendored click.
try:
    from typer._click.exceptions import ClickException as _TyperClickException

    USAGE_ERRORS: tuple = (click.ClickException, _TyperClickException)
except ImportError:
    USAGE_ERRORS = (click.ClickException,)
ABORTS: tuple = tuple({click.exceptions.Abort, getattr(typer, "Abort", click.exceptions.Abort)})
INTERRUPTED = "phrasefuse: interrupted; finished shards are kept, re-run the same command to resume"


def _usage_line(e: Exception) -> str:
    """A usage error as the contract's one line, with where to read more."""
    ctx = getattr(e, "ctx", None)
    where = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
    return f"phrasefuse: error: {printable(e.format_message().rstrip('.'))}{where}"


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM. Raised instead of KeyboardInterrupt, which Typer turns into a bare return
    value (losing what the job kept); a BaseException, so no `except Exception` swallows it."""


_MAIN_PID = os.getpid()


def _interrupt(signum, frame):  # SIGTERM stops like Ctrl-C: finished shards are kept
    # A forked child (a decode worker, a multiprocessing helper) inherits this handler; Ctrl-C in a
    # terminal signals the whole process group, and only the main process may stop the job (and say
    # so once): a child ignores it and is shut down by its parent.
    if os.getpid() != _MAIN_PID:
        return
    raise Interrupted(signal.Signals(signum).name)


class _PlainArgument(typer.core.TyperArgument):
    """An argument shown as the README writes it: `run CONFIG`, `index lookup INDEX IMAGE...`
    (Typer's own usage line reads `{CONFIG}` and `<list[Path]>`)."""

    def _usage_display_name(self) -> str:
        name = self.display_name_raw + ("..." if self.nargs != 1 else "")
        return name if self.required else f"[{name}]"

    def _rich_display_name(self) -> str:
        return self.display_name_raw + ("..." if self.nargs != 1 else "")

    def display_type(self, ctx) -> str:
        return "" if self.nargs != 1 else super().display_type(ctx)


# `phrasefuse --help` lists the commands in the order a user runs them (Typer lists single commands
# before groups, in the order they are defined); commands not named here follow, as defined.
PIPELINE_ORDER = ("extract", "index", "phrases", "fuse", "predict", "inspect", "run", "demo", "export", "import")


def _command() -> click.Command:
    """The click command tree of `app`, its arguments shown plainly (`_PlainArgument`), its commands
    in pipeline order (`PIPELINE_ORDER`)."""
    command = typer.main.get_command(app)
    rank = {name: i for i, name in enumerate(PIPELINE_ORDER)}
    command.commands = dict(sorted(command.commands.items(), key=lambda kv: rank.get(kv[0], len(rank))))
    todo = [command]
    while todo:
        cmd = todo.pop()
        todo.extend(getattr(cmd, "commands", {}).values())
        for param in cmd.params:
            if type(param) is typer.core.TyperArgument:
                param.__class__ = _PlainArgument
    return command


def main(argv: list[str] | None = None) -> None:
    """Console entry point: exit 0 done, 2 bad usage or input (one line on stderr), 1 anything else."""
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # an ignored SIGINT stays ignored
        signal.signal(signal.SIGINT, _interrupt)
    try:
        status = _command()(args=argv, prog_name="phrasefuse", standalone_mode=False)
        if isinstance(status, int) and status == 130:  # a KeyboardInterrupt Typer caught itself
            raise Interrupted("SIGINT")
        if isinstance(status, int) and status:
            sys.exit(status)
    except BadInput as e:
        print(f"phrasefuse: error: {printable(e)}", file=sys.stderr)  # one line, whatever a name holds
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt, *ABORTS) as e:
        kept = [n for x in (e, e.__cause__, e.__context__) if x is not None for n in getattr(x, "__notes__", [])]
        print(INTERRUPTED + (f" ({printable('; '.join(dict.fromkeys(kept)))})" if kept else ""), file=sys.stderr)
        sys.exit(130)
    except USAGE_ERRORS as e:
        print(_usage_line(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - one line, not a traceback, unless asked for
        if os.environ.get("PHRASEFUSE_DEBUG"):
            raise
        print(f"phrasefuse: failed: {type(e).__name__}: {printable(str(e).splitlines()[0]) if str(e) else ''} "
              f"(set PHRASEFUSE_DEBUG=1 for a traceback)", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
