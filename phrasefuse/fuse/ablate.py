"""`fuse ablate`: the table the papers print, over feature subsets, full data or K shots, over seeds.

Rows: image only, each text feature alone, all text features, image + each text feature,
all. Each row is what `fuse train` would save for that subset (trust tuned, image-only
fallback), evaluated on the test split; columns are mean +- standard deviation over seeds
and the paired gain over image-only.

Honest few-shot: with K shots per class nothing (text trust, early stopping, the
image-only fallback) is chosen on more than those K examples per class: choices are made
by cross-validation within the shots (select.cross_validation) and the val split is never
read. With K = 1 no fold can hold out an example of every class: no untested default may change
predictions, so text features are left out (image-only); the label prior, which never trains on
the shots, is weighted by its own temperature fitted on them, and only when a permutation test
says it beats chance (labeltext.calibrate_prior_on_shots). The notes under each table say which.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from phrasefuse.engine import progress as progress_lines
from phrasefuse.errors import BadInput, printable
from phrasefuse.extract import DEFAULT_TEXT_MODEL
from phrasefuse.folders import make_folder, write_atomic, write_json_atomic
from phrasefuse.fuse import LABEL_PRIOR, PSEUDO_SHOTS
from phrasefuse.fuse.data import Prepared, data_warnings, prepare, shots_warning
from phrasefuse.fuse.heads import HEADS, head_params
from phrasefuse.fuse.labeltext import apply_prior, label_prior_scores
from phrasefuse.fuse.metrics import evaluate_probs, summary
from phrasefuse.fuse.pseudo import PseudoShots, pseudo_shots_for
from phrasefuse.fuse.select import Outcome, Scheme, choose_label_prior, fit_and_choose, training_schemes


def feature_subsets(roles: Sequence[str], names: Sequence[str]) -> list[tuple[str, list[int]]]:
    """(row label, block indices): image, each text, all text, image + each text, all."""
    img = [j for j, r in enumerate(roles) if r == "image"][:1]
    texts = [j for j in range(len(roles)) if j not in img]
    subsets: list[list[int]] = []
    if img:
        subsets.append(img)
    subsets += [[t] for t in texts]
    if len(texts) > 1:
        subsets.append(texts)
    if img:
        subsets += [img + [t] for t in texts]
        if len(texts) > 1:
            subsets.append(img + texts)
    seen, out = set(), []
    for s in subsets:
        key = tuple(sorted(s))
        if key not in seen:
            seen.add(key)
            label = " + ".join(names[j] for j in sorted(s))
            out.append((label + (" (image only)" if s == img else ""), sorted(s)))
    return out


def named_subsets(rows: Sequence[Sequence[str]], names: Sequence[str], roles: Sequence[str],
                  prior: str | None = None, pseudo: bool = False) -> list[tuple[str, list[int]]]:
    """Rows chosen by the caller (each a list of feature names, LABEL_PRIOR for the label
    prior of feature `prior`, PSEUDO_SHOTS for the pseudo-shots) as (row label, block indices)."""
    out = []
    for row in rows:
        with_prior, with_pseudo = LABEL_PRIOR in row, PSEUDO_SHOTS in row
        if with_prior and prior is None:
            raise BadInput(f"ablation row {list(row)}: '{LABEL_PRIOR}' needs the label prior's feature "
                           f"(--label-prior NAME, or label_prior in the config's [ablation])")
        if with_pseudo and not pseudo:
            raise BadInput(f"ablation row {list(row)}: '{PSEUDO_SHOTS}' needs a phrase index "
                           f"(--pseudo-shots INDEX, or pseudo_shots in the config's [ablation])")
        row = [n for n in row if n not in (LABEL_PRIOR, PSEUDO_SHOTS)]
        unknown = [n for n in row if n not in names]
        if unknown or not row:
            raise BadInput(f"ablation row {list(row)}: names no feature ({', '.join(unknown) or 'empty'}); "
                           f"features: {', '.join(names)}")
        which = sorted(names.index(n) for n in row)
        image_only = len(which) == 1 and roles[which[0]] == "image"
        label = " + ".join(names[j] for j in which) + (f" + {PSEUDO_SHOTS}" if with_pseudo else "")
        image_only = image_only and not with_pseudo
        if with_prior:
            out.append((f"{label} + label prior ({prior})", which))
        else:
            out.append((label + (" (image only)" if image_only else ""), which))
    return out


@dataclass
class AblationReport:
    data: dict
    markdown: str

    def as_dict(self) -> dict:
        return self.data

    def text(self) -> str:
        """The tables (markdown), each regime's note as one plain line (the rules behind it, with their
        statistics, are in ablation.md, ablation.json and --json), then the files written."""
        shown = self.markdown
        for table in self.data.get("tables", []):
            shown = shown.replace(table["note"], plain_note(table), 1)
        return shown + "\n" + "".join(f"written: {f}\n" for f in self.data.get("files", []))


def plain_note(table: dict) -> str:
    """One line a user without the method's history can read: what each regime's head was trained
    and chosen on."""
    k = table.get("shots")
    if k is None:
        note = "Trained on the train split; text and the label prior kept only when they help on the val split."
    elif k == 1:
        note = ("1 example per class: nothing can be held out, so text is left out and the label prior is kept only "
                "when it predicts the examples clearly better than chance.")
    else:
        note = (f"{k} examples per class: text and the label prior kept only when they help on examples held out "
                f"in turn (cross-validation); the val split is not used.")
    mean = table.get("mean_shots")
    if k is not None and mean is not None and mean < k - 1e-9:
        note += f" Some labels have fewer than {k} train rows: {mean:.1f} per label on average."
    return note + " Details: ablation.md."


@dataclass
class _Setting:
    """What every row of every regime shares."""

    prep: Prepared
    kind: str
    params: dict
    label_prior: str | None
    cos: np.ndarray | None  # label prior scores (n, C)
    pseudo: PseudoShots | None


def ablate(manifest: str | os.PathLike, feature_args: Sequence[str], kind: str, *, shots: Sequence[int] = (),
           seeds: int = 3, seed: int = 0, label_col: str | None = None, multilabel: bool = False,
           out: str | os.PathLike | None = None, tune_rows: int | None = None,
           params: dict | None = None, rows: Sequence[Sequence[str]] | None = None,
           shot_rows: Sequence[Sequence[str]] | None = None, full: bool | None = None,
           label_prior: str | None = None, label_descriptions: str | None = None,
           pseudo_shots: str | None = None, text_model: str | None = None,
           progress: bool | None = None) -> AblationReport:
    """The ablation table. `rows` (lists of feature names) replaces the default feature
    subsets of the full-data table, `shot_rows` those of the K-shot tables (default: `rows`).
    `full`: also the full-data table when `shots` are given (default: only without shots).
    `label_prior`: a text feature whose cosine to the label names (or `label_descriptions`) is
    added to the head's log-probabilities in rows that list LABEL_PRIOR, with its weight chosen
    like the text trust (validation, or cross-validation within the shots). `pseudo_shots`: a
    phrase index whose pseudo-labelled prototypes rows that list PSEUDO_SHOTS offer to the head
    (fuse/pseudo.py), kept by the same rule; `text_model` matches phrases to label texts
    (default: the built-in text encoder). `progress`: as every long job's (engine.progress); False: none."""
    start = time.perf_counter()
    _check_options(kind, shots, seeds)
    _check_out(out)  # before hours of training: a folder of the user's is refused, not written into
    full = not shots if full is None else (full or not shots)
    prep = prepare(manifest, feature_args, label_col, multilabel, need=("train", "test"))
    split_rows = prep.rows
    names = [f.name for f in prep.features]
    cos = None
    if label_prior:  # a feature name or a store path, as in `fuse train`; rows name it by its feature name
        cos, _, prior_feature = label_prior_scores(prep, label_prior, label_descriptions)
        label_prior = prior_feature.name
    default_subsets = named_subsets(rows, names, prep.roles, label_prior, bool(pseudo_shots)) if rows else \
        feature_subsets(prep.roles, names)
    shot_subsets = named_subsets(shot_rows, names, prep.roles, label_prior, bool(pseudo_shots)) if shot_rows \
        else default_subsets
    pseudo = pseudo_shots_for(prep, pseudo_shots, label_descriptions, text_model or DEFAULT_TEXT_MODEL) \
        if pseudo_shots else None
    setting = _Setting(prep, kind, head_params(kind, {**(params or {}), "tune_rows": tune_rows}), label_prior, cos,
                       pseudo)
    warnings = data_warnings(prep.labels, split_rows, ("val", "test") if full else ("test",), check_val=full)
    warnings += [w for w in (shots_warning(prep.labels, split_rows["train"], int(k)) for k in shots) if w]
    regimes = [("full", None)] * full + [(f"{k}-shot", int(k)) for k in shots]
    tables = []
    # One step: a seed of a regime (every feature row of it trained and tested).
    with progress_lines(len(regimes) * seeds, f"ablate ({kind} head)", progress, unit="seeds") as advance:
        for regime, k in regimes:
            subsets = default_subsets if k is None else shot_subsets
            tables.append(_regime_table(setting, regime, k, subsets, range(seed, seed + seeds), advance))
    data = {"manifest": str(manifest), "head": kind, "task": "multilabel" if prep.task.multilabel else "multiclass",
            "features": [{"name": n, "role": r, "path": str(f.path)}
                         for n, r, f in zip(names, prep.roles, prep.features)],
            "seeds": list(range(seed, seed + seeds)), "test_rows": int(len(split_rows["test"])), "tables": tables,
            "warnings": warnings, "seconds": round(time.perf_counter() - start, 1)}
    return _written(AblationReport(data, render_markdown(data)), out)


def _check_options(kind: str, shots: Sequence[int], seeds: int) -> None:
    if kind not in HEADS:
        raise BadInput(f"--head {kind}: expected one of {', '.join(HEADS)}")
    if seeds < 1:
        raise BadInput(f"--seeds {seeds}: must be at least 1")
    for k in shots:
        if k < 1:
            raise BadInput(f"--shots {k}: must be at least 1 (zero-shot is 'phrasefuse fuse zeroshot')")


def _schemes(setting: _Setting, k: int | None, seed: int) -> tuple[Scheme, Scheme | None]:
    """Full data: the val split (trust tuned on at most tune_rows train rows); K shots:
    cross-validation within K shots per class drawn with `seed`."""
    prep = setting.prep
    return training_schemes(prep.rows["train"], prep.rows["val"], prep.labels.y, prep.task.multilabel,
                            setting.params.get("tune_rows"), seed, k)


def _regime_table(setting: _Setting, regime: str, k: int | None, subsets: list[tuple[str, list[int]]],
                  seeds: range, advance) -> dict:
    """One table: every row of `subsets` trained and tested once per seed."""
    runs: dict[str, list[dict]] = {label: [] for label, _ in subsets}
    scheme_name, train_rows_used = "", []
    for s in seeds:
        scheme, tuning = _schemes(setting, k, s)
        scheme_name = scheme.describe()
        train_rows_used.append(len(scheme.pool))
        fitted: dict[tuple, Outcome] = {}  # a row with the label prior reuses the head of the row without it
        for label, which in subsets:
            key = (tuple(which), f" + {PSEUDO_SHOTS}" in label)
            if key not in fitted:
                prep = setting.prep
                fitted[key] = fit_and_choose(setting.kind, prep.blocks.select(which), prep.labels.y, prep.task,
                                             [prep.roles[j] for j in which], setting.params, s, scheme, tuning,
                                             pseudo=setting.pseudo if key[1] else None)
            runs[label].append(_run(setting, label, which, fitted[key], s))
        advance(1)
    return _table(regime, k, subsets, runs, setting.prep, scheme_name, train_rows_used, len(seeds))


def _run(setting: _Setting, label: str, which: list[int], outcome: Outcome, seed: int) -> dict:
    """A row's kept head (with its label prior when the row lists it) scored on the test split."""
    prep, test = setting.prep, setting.prep.rows["test"]
    kept = [which[j] for j in outcome.saved_blocks]
    probs = outcome.saved.predict(prep.blocks.take(test).select(kept))
    run = {"seed": seed, "choice": outcome.choice}
    if outcome.pseudo is not None:
        run["pseudo_per_label"] = outcome.pseudo["per_label"]
        run["pseudo_rows"] = outcome.pseudo["rows"]
    if label.endswith(f"label prior ({setting.label_prior})"):
        run["prior_weight"], run["prior_choice"] = choose_label_prior(outcome, setting.cos, prep.labels.y)
        probs = apply_prior(probs, setting.cos[test], run["prior_weight"])
    run["metrics"] = summary(evaluate_probs(probs, prep.labels.take(test)))
    return run


ABLATION_FILES = ("ablation.json", "ablation.md")


def _check_out(out: str | os.PathLike | None) -> None:
    """--out is absent, empty, or an earlier ablation's folder (only its two files and our temporaries)."""
    from phrasefuse.folders import LEFTOVER_RE

    if out is None or not os.path.lexists(out):
        return
    folder = Path(out)
    if not folder.is_dir():
        raise BadInput(f"--out {folder}: exists and is not a folder; choose a new or empty folder")
    try:
        others = sorted(n for n in os.listdir(folder) if n not in ABLATION_FILES and not LEFTOVER_RE.match(n))
    except OSError as e:
        raise BadInput(f"--out {folder}: cannot read the folder ({e.strerror}); choose another --out") from None
    if others:
        raise BadInput(f"--out {folder}: holds files phrasefuse did not write (e.g. {others[0]!r}); choose a new or "
                       f"empty folder, or an earlier ablation's")


def _written(report: AblationReport, out: str | os.PathLike | None) -> AblationReport:
    """The report, its markdown and JSON written to folder `out` when given."""
    if out is not None:
        folder = make_folder(out)
        write_json_atomic(folder / "ablation.json", report.data)
        write_atomic(folder / "ablation.md", lambda tmp: Path(tmp).write_text(report.markdown, encoding="utf-8"))
        report.data["files"] = [str(folder / "ablation.md"), str(folder / "ablation.json")]
    return report


def _table(regime: str, k: int | None, subsets, runs: dict, prep: Prepared, scheme_name: str,
           train_rows: list[int], seeds: int) -> dict:
    multilabel = prep.labels.multilabel
    columns = ["mAP", "micro_f1"] if multilabel else ["top1", "top5"]
    base_label = next((label for label, which in subsets if len(which) == 1 and prep.roles[which[0]] == "image"), None)
    rows = []
    for label, which in subsets:
        values = {c: np.array([r["metrics"][c] for r in runs[label]], float) for c in columns}
        row = {"features": label, "blocks": [prep.features[j].name for j in which]}
        for c in columns:
            row[c] = {"mean": float(np.mean(values[c])), "std": float(np.std(values[c]))}
        if base_label and label != base_label and any(prep.roles[j] == "image" for j in which):
            base = np.array([r["metrics"][columns[0]] for r in runs[base_label]], float)
            gain = values[columns[0]] - base
            row["gain"] = {"mean": float(gain.mean()), "std": float(gain.std())}
            if any(prep.roles[j] != "image" for j in which):
                row["text_kept"] = int(sum(r["choice"] == "fused" for r in runs[label]))
        if runs[label] and "prior_weight" in runs[label][0]:
            row["prior_weights"] = [r["prior_weight"] for r in runs[label]]
            row["prior_chosen_by"] = runs[label][0]["prior_choice"]["scheme"]
        if runs[label] and "pseudo_rows" in runs[label][0]:
            row["pseudo_kept"] = [r["pseudo_rows"] for r in runs[label]]
        row["runs"] = runs[label]
        rows.append(row)
    n_labels = prep.labels.num_classes
    mean_shots = float(np.mean(train_rows)) / n_labels if n_labels else 0.0
    if k is None and scheme_name != "val split":  # no val split: as `fuse train` without one
        note = (f"Trained on the train split ({train_rows[0]} rows); text trust, early stopping, the image-only "
                f"fallback and the label prior's weight chosen by {scheme_name}; test split reported.")
    elif k is None:
        note = (f"Trained on the train split ({train_rows[0]} rows); text trust, early stopping and the image-only "
                f"fallback chosen on the val split ({len(prep.rows['val'])} rows), the label prior's weight by "
                f"likelihood on it (kept only when a likelihood-ratio test is significant at 5%; when it is not, "
                f"the prior's own temperature fitted on the train split, unless val top-1 drops with it); test "
                f"split reported.")
    elif k == 1:
        note = ("1 labelled example per class (drawn per seed): no fold can hold out an example of every class, so "
                "nothing can show that text helps the head: it is left out (image-only). The label prior never trains "
                "on the shots: its temperature is fitted on them by likelihood and used as its weight, only when it "
                "beats 19 shuffled priors and the chi-square 5% level. The val split is not used.")
    else:
        note = (f"{k} labelled examples per class (drawn per seed; {int(np.mean(train_rows))} rows on average); text "
                f"trust, early stopping and the image-only fallback chosen by {scheme_name}, the label prior's "
                f"weight by likelihood on the out-of-fold probabilities (kept only when a likelihood-ratio test is "
                f"significant at 5%; when it is not, the prior's own temperature fitted on the shots, unless "
                f"out-of-fold top-1 drops with it); the val split is not used.")
    if k is not None and mean_shots < k - 1e-9:
        note += (f" Some labels have fewer than {k} train rows: {mean_shots:.1f} shots per label on average, "
                 f"not {k}.")
    return {"regime": regime, "shots": k, "mean_shots": mean_shots if k is not None else None, "columns": columns,
            "rows": rows, "note": note, "seeds": seeds}


def markdown_cell(text: object) -> str:
    """User text (a feature name, a path) as one Markdown table cell or line: control characters
    escaped (`printable`: a newline would end the row) and '|' as '\\|' (it would start a cell)."""
    return printable(text).replace("|", "\\|")


def render_markdown(data: dict) -> str:
    names = {"top1": "top-1", "top5": "top-5", "mAP": "mAP", "micro_f1": "micro-F1"}
    out = [f"# Ablation: {data['head']} head on {markdown_cell(data['manifest'])}", ""]
    for table in data["tables"]:
        cols = table["columns"]
        regime = table["regime"]
        if table.get("mean_shots") is not None and table["mean_shots"] < table["shots"] - 1e-9:
            regime += f", {table['mean_shots']:.1f} shots per label on average"
        title = f"{regime} ({table['seeds']} seed(s), mean ± std; test split, {data['test_rows']} rows)"
        out += [f"## {title}", "",
                "| features | " + " | ".join(names[c] for c in cols) + f" | Δ {names[cols[0]]} vs image only "
                "| text kept |", "|---|" + "---|" * (len(cols) + 2)]
        for row in table["rows"]:
            cells = [f"{100 * row[c]['mean']:.1f} ± {100 * row[c]['std']:.1f}" for c in cols]
            gain = f"{100 * row['gain']['mean']:+.1f} ± {100 * row['gain']['std']:.1f}" if "gain" in row else ""
            kept = f"{row['text_kept']}/{table['seeds']} seeds" if "text_kept" in row else ""
            if "prior_weights" in row:
                weights = ", ".join(f"{w:.3g}" for w in row["prior_weights"])
                kept += ("; " if kept else "") + f"prior weight {weights} ({row['prior_chosen_by']})"
            if "pseudo_kept" in row:
                kept += ("; " if kept else "") + "pseudo-shots kept " + ", ".join(map(str, row["pseudo_kept"]))
            out.append(f"| {markdown_cell(row['features'])} | " + " | ".join(cells) + f" | {gain} | {kept} |")
        chooser = ("the val split" if table["shots"] is None and "on the val split" in table["note"] else
                   "cross-validation within the training rows" if table["shots"] is None else
                   "cross-validation within the shots")
        kept_note = ("'text kept': with 1 shot per class no row is left to score text on, so text is never kept "
                     "(the row is the image-only head that `fuse train` would save)." if table["shots"] == 1 else
                     f"'text kept': seeds in which the fused head beat image-only, as scored by {chooser}, by more "
                     "than one standard error (otherwise the row is the image-only head that `fuse train` would save).")
        out += ["", table["note"], "", kept_note, ""]
    if data.get("warnings"):
        out += ["Warnings:", ""] + [f"- {markdown_cell(w)}" for w in data["warnings"]] + [""]
    return "\n".join(out)

