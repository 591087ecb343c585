"""`fuse eval`, `predict` and `fuse zeroshot`: a saved head (or the label prior alone) on a manifest."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from phrasefuse.errors import BadInput, printable
from phrasefuse.fuse.artifact import format_metrics, load_head
from phrasefuse.fuse.data import (SPLITS, Feature, build_vocab, encode_labels, is_multilabel, label_column,
                                  label_values, load_blocks, resolve_features, split_rows)
from phrasefuse.fuse.labeltext import cosine_scores, embed_for_store, label_texts, read_descriptions
from phrasefuse.fuse.metrics import decide, multiclass_metrics, multilabel_metrics
from phrasefuse.manifests import Manifest, read_manifest
from phrasefuse.folders import make_folder, write_parquet_atomic
from phrasefuse.store import EmbeddingStore


def split_selection(manifest: Manifest, split: str) -> np.ndarray:
    """Row indices of `split` (train, val, test or all); refuses an empty one."""
    if split == "all":
        return np.arange(len(manifest))
    if split not in SPLITS:
        raise BadInput(f"--split {split}: expected one of {', '.join(SPLITS)} or all")
    rows = split_rows(manifest)[split]
    if len(rows) == 0:
        raise BadInput(f"{manifest.source}: the '{split}' split has no rows (column 'split'); pick another --split")
    return rows


# ---------------------------------------------------------------- eval


@dataclass
class EvalReport:
    """`fuse eval`: the head, the manifest and split, the metrics and the rows without each feature."""

    data: dict

    def as_dict(self) -> dict:
        return self.data

    def text(self) -> str:
        report = self.data
        m = report["metrics"]
        lines = [f"fuse eval: {printable(report['head'])} ({report['kind']}, {report['task']}) on "
                 f"{printable(report['manifest'])}, "
                 f"split {report['split']} ({report['rows']} rows)", f"  {format_metrics(m)}"]
        if "recall_at_80_precision" in m:
            lines[-1] += f" recall@80%precision={100 * m['recall_at_80_precision']:.1f}"
            lines.append(f"  threshold {m['threshold']}, max labels {m['max_labels'] or 'none'}")
        per = m.get("per_class_accuracy") or m.get("per_label_ap") or {}
        if per:
            what = "per-class accuracy" if "per_class_accuracy" in m else "per-label AP"
            lines.append(f"  {what}: " + ", ".join(f"{printable(k)} {100 * v:.1f}" for k, v in list(per.items())[:20])
                         + (", ..." if len(per) > 20 else ""))
        missing = {k: v for k, v in report["missing"].items() if v}
        if missing:
            lines.append("  rows without: " + ", ".join(f"{printable(k)} {v}" for k, v in missing.items()))
        if m.get("unknown_labels"):
            lines.append(f"  {m['unknown_labels']} labels outside the head's vocabulary (counted as errors)")
        return "\n".join(lines)


def evaluate(head_path: str | os.PathLike, manifest_path: str | os.PathLike, split: str = "test",
             feature_args: Sequence[str] | None = None, label_col: str | None = None) -> EvalReport:
    head = load_head(head_path)
    manifest = read_manifest(manifest_path)
    rows = split_selection(manifest, split)
    col = label_column(manifest, label_col or head.meta.get("label_col"))
    mask = np.zeros(len(manifest), bool)
    mask[rows] = True
    values = label_values(manifest, col, head.task.multilabel, mask).take(pa.array(rows))
    labels = encode_labels(values, head.vocab, head.task.multilabel)
    blocks, cos = head.inputs(manifest.ids.take(pa.array(rows)), manifest.source, feature_args)
    probs = head.predict(blocks, cos)
    if head.task.multilabel:
        threshold, max_labels = head.decision()
        metrics = multilabel_metrics(probs, labels.y, head.vocab, threshold, max_labels, labels.unknown)
    else:
        metrics = multiclass_metrics(probs, labels.y, head.vocab)
    names = [f["name"] for f in head.meta["features"]]
    return EvalReport({"head": str(head_path), "manifest": str(manifest_path), "split": split,
                       "kind": head.meta["kind"], "task": head.meta["task"], "rows": int(len(rows)), "metrics": metrics,
                       "missing": {n: int((~blocks.present[:, j]).sum()) for j, n in enumerate(names)}})


# ---------------------------------------------------------------- predict


@dataclass
class PredictSummary:
    out: str
    rows: int
    seconds: float
    scores: dict | None = None  # against the manifest's labels (`score_against_labels`), when it has them
    warnings: list[str] = field(default_factory=list)

    def text(self) -> str:
        line = f"predict: {self.rows} rows -> {printable(self.out)} ({self.seconds:.1f} s)"
        return "\n".join([line, *scores_lines(self.scores)])

    def as_dict(self) -> dict:
        return {"out": self.out, "rows": self.rows, "seconds": round(self.seconds, 2),
                **({"scores": self.scores} if self.scores else {})}


def predict(head_path: str | os.PathLike, manifest_path: str | os.PathLike, out: str | os.PathLike, top_k: int = 5,
            feature_args: Sequence[str] | None = None, label_col: str | None = None,
            phrases_from: Sequence[str | os.PathLike] = ()) -> PredictSummary:
    """Every manifest row: top-k labels with probabilities (multi-label: also the labels kept
    by the head's threshold and cap), features missing for the row, and the phrases of any
    phrases store among the features or the label prior's, and of `phrases_from` (so a user
    can see why, also when the saved head left the phrases out). A manifest with labels is
    scored against them (`score_against_labels`)."""
    start = time.perf_counter()
    _check_top_k(top_k)
    out_format(out)  # a wrong --out is refused before any work
    head = load_head(head_path)
    manifest = read_manifest(manifest_path)
    ids = manifest.ids
    features = head.features(feature_args)
    blocks, cos = head.inputs(ids, manifest.source, feature_args)
    prior = head.prior_feature(feature_args)
    extra = [Feature(Path(p).name, EmbeddingStore(p)) for p in phrases_from if EmbeddingStore(p).exists()]
    phrases = {}
    for f in [*features, *([prior] if prior else []), *extra]:
        # one phrases store read once, whichever way it comes (feature, prior, the run's store)
        if f.name not in phrases and f.has_column("phrases"):
            phrases[f.name] = phrases_for(f, ids)
    table = prediction_table(head, ids, head.predict(blocks, cos), blocks, phrases, top_k)
    table, scores, warnings = score_against_labels(table, head, manifest.table, label_col)
    if scores and str(manifest_path) == str(head.meta.get("manifest")):
        # the manifest the head was trained on: its top-1 over every row is no held-out score
        scores["note"] = "every row, the head's training rows included; held-out: 'fuse eval --split test'"
    write_predictions(table, out)
    return PredictSummary(str(out), len(ids), time.perf_counter() - start, scores, warnings)


def _truth(head, inputs: pa.Table, label_col: str | None) -> pa.Array | None:
    """The inputs' true labels (null where a row has none), or None: no label column, or a
    multi-label head (scored by `fuse eval`). --label-col, else the head's label column, else 'label'
    (a folder's CLASS/ subfolders)."""
    names = [label_col] if label_col else list(dict.fromkeys([head.meta.get("label_col") or "label", "label"]))
    col = next((n for n in names if n in inputs.column_names), None)
    if col is None:
        if label_col:
            raise BadInput(f"--label-col {label_col}: the input has no such column (columns: "
                           f"{', '.join(c for c in inputs.column_names if not c.startswith('_'))})")
        return None
    values = inputs[col].combine_chunks()
    if head.task.multilabel or pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        if label_col:
            raise BadInput(f"--label-col {label_col}: predict scores single-label heads on one label per row; "
                           f"score a multi-label head with 'fuse eval'")
        return None
    try:
        values = values.cast(pa.string())
    except pa.ArrowInvalid:
        raise BadInput(f"column '{col}': labels of type {values.type} are not text or numbers") from None
    # an empty cell is no label (a CSV's blank), not a class named ''
    return pc.if_else(pc.equal(values, ""), pa.nulls(len(values), pa.string()), values)


def score_against_labels(table: pa.Table, head, inputs: pa.Table,
                         label_col: str | None = None) -> tuple[pa.Table, dict | None, list[str]]:
    """With true labels in `inputs` (row for row with `table`): `true_label` and `correct` columns
    after `predicted`, top-1 and per-class accuracy over the rows with a label and a prediction, and
    a warning naming the labels the head never saw (their rows count as wrong: it cannot predict
    them). Without labels: `table` unchanged, no scores."""
    truth = _truth(head, inputs, label_col)
    if truth is None or truth.null_count == len(truth):
        return table, None, []
    predicted = table["predicted"].combine_chunks()
    scored = pc.and_(pc.is_valid(truth), pc.is_valid(predicted))
    correct = pc.if_else(scored, pc.fill_null(pc.equal(truth, predicted), False), pa.nulls(len(truth), pa.bool_()))
    at = table.column_names.index("predicted") + 1
    table = table.add_column(at, "true_label", truth).add_column(at + 1, "correct", correct)
    mask = scored.to_numpy(zero_copy_only=False)
    t = np.asarray(truth.to_pylist(), dtype=object)[mask]
    ok = correct.to_numpy(zero_copy_only=False)[mask].astype(bool)
    known = set(head.vocab)
    unseen = sorted({x for x in t if x not in known})
    per_class = {label: float(ok[t == label].mean()) for label in sorted(set(t))}
    scores = {"scored": int(mask.sum()), "correct": int(ok.sum()),
              "top1": float(ok.mean()) if len(ok) else None,
              "without_label": int(pc.sum(pc.is_null(truth)).as_py() or 0),
              "without_prediction": int(pc.sum(pc.and_(pc.is_valid(truth), pc.is_null(predicted))).as_py() or 0),
              "per_class_accuracy": per_class, "unseen_labels": unseen}
    warnings = []
    if unseen:
        rows = int(sum(int((t == x).sum()) for x in unseen))
        warnings.append(f"{rows} row(s) have labels the head never saw, counted wrong: "
                        + ", ".join(f"'{x}'" for x in unseen[:20]) + (", ..." if len(unseen) > 20 else ""))
    return table, scores, warnings


def scores_lines(scores: dict | None) -> list[str]:
    """The printed top-1 and per-class accuracy of `score_against_labels` (nothing without labels)."""
    if not scores:
        return []
    if not scores["scored"]:
        return ["top-1: no row has both a label and a prediction"]
    lines = [f"top-1 {100 * scores['top1']:.1f}% ({scores['correct']} of {scores['scored']} labelled rows correct"
             + (f"; {scores['without_label']} without a label" if scores["without_label"] else "")
             + (f"; {scores['without_prediction']} without a prediction, not counted"
                if scores["without_prediction"] else "") + ")"
             + (f"; {scores['note']}" if scores.get("note") else "")]
    per = scores["per_class_accuracy"]
    lines.append("per class: " + ", ".join(f"{printable(k)} {100 * v:.1f}%" for k, v in list(per.items())[:20])
                 + (", ..." if len(per) > 20 else ""))
    return lines


def _check_top_k(top_k: int) -> None:
    if top_k < 1:
        raise BadInput(f"--top-k {top_k}: must be at least 1")


def prediction_table(head, ids: pa.Array, probs: np.ndarray, blocks, phrases: dict[str, pa.Array],
                     top_k: int) -> pa.Table:
    """id, label + probability (multi-label: labels), top_labels, top_probs, predicted (single-label),
    missing_features, phrases."""
    n, C = probs.shape
    k = min(top_k, C)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    vocab = pa.array(head.vocab, pa.string())
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    columns: dict[str, pa.Array] = {"id": ids}
    if head.task.multilabel:
        threshold, max_labels = head.decision()
        kept = decide(probs, threshold, max_labels)
        row, col = np.nonzero(kept)
        columns["labels"] = pa.ListArray.from_arrays(
            pa.array(np.r_[0, np.cumsum(np.bincount(row, minlength=n))].astype(np.int32)), vocab.take(pa.array(col)))
    else:
        columns["label"] = vocab.take(pa.array(top[:, 0]))
        columns["probability"] = pa.array(probs[np.arange(n), top[:, 0]].astype(np.float32))
    columns["top_labels"] = pa.ListArray.from_arrays(offsets, vocab.take(pa.array(top.ravel())))
    columns["top_probs"] = pa.ListArray.from_arrays(
        offsets, pa.array(np.take_along_axis(probs, top, axis=1).ravel().astype(np.float32)))
    if not head.task.multilabel:
        # `predicted` names what `label` holds (`label` kept, same values, for files read by name);
        # with true labels, `true_label` and `correct` come right after it (`score_against_labels`)
        columns["predicted"] = columns["label"]
    names = np.array([f["name"] for f in head.meta["features"]], dtype=object)
    miss_row, miss_col = np.nonzero(~blocks.present)
    columns["missing_features"] = pa.ListArray.from_arrays(
        pa.array(np.r_[0, np.cumsum(np.bincount(miss_row, minlength=n))].astype(np.int32)),
        pa.array(names[miss_col].tolist() if len(miss_col) else [], pa.string()))
    for name, values in phrases.items():
        columns["phrases" if len(phrases) == 1 else f"phrases_{name}"] = values
    return pa.table(columns)


# The predictions file's format follows its extension; anything else is refused rather than
# guessed (a .txt holding Parquet bytes is no text file).
OUT_FORMATS = {".parquet": "Parquet", ".csv": "CSV", ".jsonl": "JSON Lines"}


def out_format(out: str | os.PathLike) -> str:
    """The extension of the predictions file `out` (.parquet, .csv or .jsonl), else BadInput."""
    if Path(out).is_dir():
        raise BadInput(f"--out {out}: is a folder; pass a file name (e.g. {Path(out) / 'predictions.parquet'})")
    suffix = Path(out).suffix.lower()
    if suffix not in OUT_FORMATS:
        raise BadInput(f"--out {out}: unknown extension '{suffix or '(none)'}'; name the predictions file "
                       f"{', '.join(OUT_FORMATS)} (the format follows the extension)")
    return suffix


def _short(value):
    """A float32 probability as the shortest decimal that reads back as the same float32 (0.7, not
    0.699999988079071), as Parquet readers and the CSV's own columns show it; lists item by item."""
    if isinstance(value, float):
        return float(str(np.float32(value)))
    return [_short(v) for v in value] if isinstance(value, list) else value


def csv_list_cell(values: list | None) -> str | None:
    """A list cell of the CSV: a JSON array (`["a|b", "c"]`, `[0.7, 0.2]`), so any label can be read
    back exactly (json.loads); null (no prediction) stays an empty cell."""
    return None if values is None else json.dumps(_short(values), ensure_ascii=False)


def write_predictions(table: pa.Table, out: str | os.PathLike) -> None:
    """Parquet, CSV (list cells as JSON arrays) or JSON Lines, by the extension of `out`
    (`out_format`); written whole."""
    from phrasefuse.folders import write_atomic

    suffix = out_format(out)
    make_folder(Path(out).parent)
    if suffix == ".parquet":
        write_parquet_atomic(out, table)
    elif suffix == ".csv":
        import pyarrow.csv as pcsv

        flat = pa.table({name: pa.array([csv_list_cell(v) for v in col.to_pylist()], pa.string())
                         if pa.types.is_list(col.type) else col for name, col in zip(table.column_names, table.columns)})
        write_atomic(out, lambda path: pcsv.write_csv(flat, path))
    else:
        text = "".join(json.dumps({k: _short(v) for k, v in row.items()}, ensure_ascii=False) + "\n"
                       for row in table.to_pylist())
        write_atomic(out, lambda path: Path(path).write_text(text, encoding="utf-8"))


@dataclass
class NewPredictions:
    table: pa.Table
    out: str | None
    seconds: float
    scores: dict | None = None  # against the inputs' labels (`score_against_labels`), when they have them
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> list[dict]:
        """The --json document: a list, one row per input (its id, label, top-k, phrases, error)."""
        return [{k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v]
                     if isinstance(v, list) and v and isinstance(v[0], float) else v) for k, v in row.items()}
                for row in self.table.to_pylist()]

    def text(self) -> str:
        # Ids are file names, labels and phrases user text: each through `printable`, so a newline or
        # a terminal escape in one can neither forge a line nor reach the terminal raw.
        lines = []
        show = printable
        for row in self.as_dict():
            if row.get("error"):
                lines.append(f"{show(row['id'])}: no prediction ({show(row['error'])})")
                continue
            label = (f"{show(row['label'])} ({100 * row['probability']:.1f}%)" if "label" in row
                     else ", ".join(map(show, row["labels"])) or "(no label above the threshold)")
            top = ", ".join(f"{show(lab)} {100 * p:.1f}%" for lab, p in zip(row["top_labels"], row["top_probs"]))
            truth = "" if row.get("correct") is None else \
                f"; true: {show(row['true_label'])} ({'right' if row['correct'] else 'wrong'})"
            lines.append(f"{show(row['id'])}: {label}; top: {top}{truth}")
            for key in [k for k in row if k.startswith("phrases")]:
                lines.append(f"  {key}: {', '.join(map(show, row[key] or [])) or '(none)'}")
            if row["missing_features"]:
                lines.append(f"  without: {', '.join(map(show, row['missing_features']))}")
        if self.out:
            lines.append(f"predict: {self.table.num_rows} rows -> {printable(self.out)} ({self.seconds:.1f} s)")
        return "\n".join(lines + scores_lines(self.scores))


def predict_new(head_path: str | os.PathLike, inputs: Sequence[str | os.PathLike], *, top_k: int = 5,
                out: str | os.PathLike | None = None, index: str | None = None, model: str | None = None,
                device: str = "auto", id_col: str | None = None, image_col: str | None = None,
                label_col: str | None = None, allow_outside_paths: bool = False) -> NewPredictions:
    """`predict HEAD INPUT...`: the head on images it has not seen (files, folders, any manifest
    source), computing their features as the head's meta.json records (`fuse.newinputs`); inputs
    with labels (CLASS/ subfolders, a label column) are scored against them."""
    from phrasefuse.fuse.newinputs import compute, provenance, read_inputs

    start = time.perf_counter()
    _check_top_k(top_k)
    if out is not None:
        out_format(out)  # a wrong --out is refused before any image is read
    head = load_head(head_path)
    provenance(head)  # an old head is refused before any image is read
    manifest = read_inputs(inputs, id_col, image_col, allow_outside_paths)
    made = compute(head, manifest, index=index, model=model, device=device)
    cos = None
    if made.prior is not None:
        cos = cosine_scores(made.prior[0], made.prior[1], head.prior_labels)
    table = prediction_table(head, made.ids, head.predict(made.blocks, cos), made.blocks, made.phrases, top_k)
    failed = pc.is_valid(made.errors)
    if pc.any(failed).as_py():  # no image vector: no prediction, the reason instead
        for name in [c for c in table.column_names if c not in ("id", "missing_features")]:
            col = table[name]
            table = table.set_column(table.column_names.index(name), name,
                                     pc.if_else(failed, pa.nulls(len(failed), col.type), col))
    table = table.append_column("error", made.errors)
    table, scores, warnings = score_against_labels(table, head, manifest.table, label_col)
    if out is not None:
        write_predictions(table, out)
    return NewPredictions(table, str(out) if out else None, time.perf_counter() - start, scores, warnings)


def phrases_for(feature: Feature, ids: pa.Array) -> pa.Array:
    """The `phrases` list of each id in a phrases store (null where the store lacks the id)."""
    table = feature.store.read_table(["id", "phrases"])
    pos = pc.index_in(ids, value_set=table["id"])
    return table["phrases"].combine_chunks().take(pos)


# ---------------------------------------------------------------- zero-shot


@dataclass
class ZeroshotReport:
    """`fuse zeroshot`: the label prior alone, its metrics, coverage and chance level."""

    data: dict

    def as_dict(self) -> dict:
        return self.data

    def text(self) -> str:
        report = self.data
        m = report["metrics"]
        return (f"fuse zeroshot: {report['phrases']} vs {report['labels']} {report['label_texts']} "
                f"on {report['manifest']}, "
                f"split {report['split']} ({report['rows']} rows, {100 * report['coverage']:.0f}% with text)\n"
                f"  {format_metrics(m) or ''}"
                + (f"  (chance top-1 {100 * report['chance_top1']:.1f})" if "top1" in m else ""))


def zeroshot(manifest_path: str | os.PathLike, phrases: str | os.PathLike, label_descriptions: str | None = None,
             split: str = "test", label_col: str | None = None, multilabel: bool = False) -> ZeroshotReport:
    """The label prior alone: cos(text feature, label text embedding) as class scores, with
    no labelled image. Label texts (names, or descriptions) are embedded by the encoder that
    made the store. Rows the store lacks are reported as coverage and left out."""
    manifest = read_manifest(manifest_path)
    rows = split_selection(manifest, split)
    col = label_column(manifest, label_col)
    multi = is_multilabel(manifest, col, multilabel)
    values = label_values(manifest, col, multi, np.ones(len(manifest), bool))
    vocab = build_vocab(values, np.ones(len(manifest), bool), multi)  # every label of the manifest is a candidate
    feature = resolve_features([phrases])[0]
    descriptions = read_descriptions(label_descriptions) if label_descriptions else None
    label_emb, _ = embed_for_store(label_texts(vocab, descriptions, label_descriptions, prompts=True), feature.store)
    blocks = load_blocks([feature], manifest.ids.take(pa.array(rows)), manifest.source)
    covered = blocks.present[:, 0]
    scores = cosine_scores(blocks.arrays[0], covered, label_emb)[covered]
    labels = encode_labels(values.take(pa.array(rows[covered])), vocab, multi)
    if multi:
        m = multilabel_metrics(scores, labels.y, vocab, 0.5, None, labels.unknown)
        metrics = {k: m[k] for k in ("rows", "mAP", "recall_at_80_precision", "per_label_ap")}
    else:
        metrics = multiclass_metrics(scores, labels.y, vocab)
    return ZeroshotReport({"manifest": str(manifest_path), "phrases": str(feature.path), "split": split,
                           "label_texts": "descriptions" if descriptions else "label names", "labels": len(vocab),
                           "rows": int(len(rows)), "coverage": float(covered.mean()) if len(covered) else 0.0,
                           "chance_top1": 1.0 / len(vocab) if vocab else float("nan"), "metrics": metrics})
