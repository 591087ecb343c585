"""`phrasefuse run CONFIG.toml`: every stage of a config, in order, into one work folder.

    WORK/stores/image, WORK/stores/<text column>, WORK/stores/phrases   embedding stores
    WORK/stores/query-image                                            the query corpus' images
    WORK/index                                                         the prototype index
    WORK/heads/<name>, WORK/predictions/<name>.parquet                 heads and their predictions
    WORK/ablation/ablation.{md,json}, WORK/zeroshot.json               tables
    WORK/report.html, WORK/plots/*.png                                 the report
    WORK/run-state.json                                                what each stage last did

A stage is skipped when its inputs (files, the stores it reads, its settings) have the
same fingerprint as when it last completed and its output is still as it left it. Extract
stages that do run embed only ids their store lacks (the embed-once promise), so a changed
head re-trains only that head, and a manifest with new rows embeds only those rows.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from phrasefuse.errors import BadInput
from phrasefuse.manifests.sources import expand_braces
from phrasefuse.report import BASELINE
from phrasefuse.run.config import IMAGE, LIMIT_KEYS, PHRASES, Config, Head, config_error, load_config
from phrasefuse.folders import make_folder, recover_leftovers, remove_folder, write_json_atomic
from phrasefuse.store import EmbeddingStore

STATE = "run-state.json"


@dataclass
class StageResult:
    stage: str
    status: str  # "ran" | "skipped"
    line: str
    summary: dict = field(default_factory=dict)

    def text(self) -> str:
        return f"[{self.status}] {self.stage}: {self.line}" if self.status == "skipped" else self.line

    def as_dict(self) -> dict:
        return {"stage": self.stage, "status": self.status, "summary": self.summary}


@dataclass
class RunSummary:
    """The end of `run` (and `demo`), after each stage's own result: the work folder, the ablation
    table (Markdown, and its JSON document) and the report. `as_dict` also lists the stages."""

    stages: list[StageResult]
    work: Path | None = None
    ablation_markdown: str | None = None
    ablation: dict | None = None

    @classmethod
    def of(cls, stages: list[StageResult]) -> "RunSummary":
        """The summary of a finished run: its work folder found from the report stage's files."""
        files = [s.summary["files"] for s in stages if s.stage == "report" and s.summary.get("files")]
        if not files:
            return cls(list(stages))
        work = Path(files[-1][0]).parent
        table, document = work / "ablation" / "ablation.md", work / "ablation" / "ablation.json"
        return cls(list(stages), work, table.read_text(encoding="utf-8") if table.is_file() else None,
                   json.loads(document.read_text(encoding="utf-8")) if document.is_file() else None)

    def as_dict(self) -> dict:
        return {"stages": [s.as_dict() for s in self.stages], "work": str(self.work) if self.work else None,
                "report": str(self.work / "report.html") if self.work else None, "ablation": self.ablation}

    def text(self) -> str:
        """The ablation table and where the report is (the stages' texts are printed as they complete)."""
        parts = ["\n" + self.ablation_markdown] if self.ablation_markdown is not None else []
        return "\n".join(parts + ([f"report: {self.work / 'report.html'}"] if self.work else []))


@dataclass
class Layout:
    """Where each output of a run lives."""

    work: Path

    def store(self, feature: str) -> Path:
        return self.work / "stores" / feature

    @property
    def phrases_store(self) -> Path:
        return self.store(PHRASES)

    @property
    def query_store(self) -> Path:
        return self.work / "stores" / "query-image"

    @property
    def index(self) -> Path:
        return self.work / "index"

    def head(self, name: str) -> Path:
        return self.work / "heads" / name

    def predictions(self, name: str) -> Path:
        return self.work / "predictions" / f"{name}.parquet"

    @property
    def ablation(self) -> Path:
        return self.work / "ablation"

    @property
    def zeroshot(self) -> Path:
        return self.work / "zeroshot.json"

    @property
    def report(self) -> Path:
        return self.work / "report.html"


# ---------------------------------------------------------------- fingerprints


def files_fingerprint(pattern: str | os.PathLike) -> str:
    """sha256 over the bytes of every file a path, glob (** recursive) or brace range names (manifests,
    tar shards, pairs tables); for a folder of images, the names, sizes and modification times of its files."""
    if os.path.isdir(pattern):
        return _tree_fingerprint(Path(pattern))
    paths = [p for name in expand_braces(str(pattern))
             for p in (sorted(glob.glob(name, recursive=True)) if glob.has_magic(name) else [name])]
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode())
        try:
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError:
            h.update(b"<missing>")
    return h.hexdigest()


def folder_fingerprint(path: Path) -> str | None:
    """Names, sizes and modification times of a folder's files (a store, an index, a head);
    None when it has no meta.json (not there, or incomplete)."""
    if not (path / "meta.json").is_file():
        return None
    return _tree_fingerprint(path)


def _tree_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            st = p.stat()
            h.update(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def file_fingerprint(path: Path) -> str | None:
    if not path.is_file():
        return None
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


class RunState:
    """WORK/run-state.json: per stage, the fingerprint of its inputs and of its output when
    it last completed, and its summary. Written after every stage (atomically)."""

    def __init__(self, work: Path):
        self.path = work / STATE
        self.stages: dict[str, dict] = {}
        if self.path.is_file():
            try:
                self.stages = json.loads(self.path.read_text(encoding="utf-8")).get("stages", {})
            except (OSError, ValueError, AttributeError):
                self.stages = {}  # unreadable: every stage checks its output again

    def run(self, stage: str, inputs: dict, output: Callable[[], str | None],
            job: Callable[[], tuple[str, dict]]) -> StageResult:
        digest = _digest(inputs)
        last = self.stages.get(stage)
        current = output()
        if last and last.get("inputs") == digest and current is not None and last.get("output") == current:
            return StageResult(stage, "skipped", "up to date (same inputs and settings)",
                               as_skipped(last.get("summary", {})))
        line, summary = job()
        self.stages[stage] = {"inputs": digest, "output": output(), "summary": summary,
                              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json_atomic(self.path, {"format": "phrasefuse-run-state", "stages": self.stages})
        return StageResult(stage, "ran", line, summary)


def as_skipped(summary: dict) -> dict:
    """What a skipped stage did this time: nothing embedded or written; the rows its last run
    embedded or wrote are now rows already present."""
    out = {**summary, "skipped": True}
    for done, present in (("embedded", "present"), ("reused", "present"), ("written", "present"),
                          ("phrases_embedded", None)):
        if done in out:
            if present:
                out[present] = out.get(present, 0) + out[done]
            out[done] = 0
    return out


# ---------------------------------------------------------------- the stages


def run_config(config_path: str | os.PathLike, progress: bool | None = None) -> Iterator[StageResult]:
    """Run every stage of the config; yields each stage's result as it completes."""
    config = load_config(config_path)
    check_inputs(config)
    layout = Layout(config.work)
    make_folder(config.work, f"{config.path}: key 'work':")
    for folder in (config.work, config.work / "stores", config.work / "heads", config.work / "predictions",
                   layout.ablation, config.work / "plots"):
        recover_leftovers(folder)  # of a killed earlier run: swaps undone, temporary files removed
    state = RunState(config.work)
    manifest_fp = files_fingerprint(config.data.manifest)

    yield from extract_stages(config, layout, state, manifest_fp, progress)
    if config.phrases:
        yield from phrase_stages(config, layout, state, progress)

    def features_of(names: list[str]) -> list[str]:
        return [f"{n}={layout.store(n)}" for n in names]

    def stores_fp(names: list[str]) -> dict:
        return {n: folder_fingerprint(layout.store(n)) for n in names}

    labels = {"manifest": manifest_fp, "label_col": config.data.label_col, "multilabel": config.data.multilabel}
    for head in heads_with_baseline(config):
        yield head_stage(config, layout, state, head, labels, features_of, stores_fp)
    if config.phrases:
        yield zeroshot_stage(config, layout, state, labels, stores_fp)
    if config.ablation:
        yield ablation_stage(config, layout, state, labels, features_of, stores_fp)
    yield report_stage(config, layout, state)


def zeroshot_stage(config: Config, layout: Layout, state: RunState, labels: dict, stores_fp: Callable) -> StageResult:
    descriptions = config.data.label_descriptions
    inputs = {**labels, "phrases": stores_fp([PHRASES]),
              "descriptions": files_fingerprint(descriptions) if descriptions else None}

    def zeroshot_job() -> tuple[str, dict]:
        from phrasefuse.fuse.evaluate import zeroshot

        report = zeroshot(config.data.source, layout.store(PHRASES),
                          str(descriptions) if descriptions else None, label_col=config.data.label_col,
                          multilabel=config.data.multilabel)
        write_json_atomic(layout.zeroshot, report.as_dict())
        return report.text(), {"metrics": _headline(report.data["metrics"]), "coverage": report.data["coverage"]}

    return state.run("zeroshot", inputs, lambda: file_fingerprint(layout.zeroshot), zeroshot_job)


def ablation_stage(config: Config, layout: Layout, state: RunState, labels: dict, features_of: Callable,
                   stores_fp: Callable) -> StageResult:
    ab = config.ablation
    names = config.feature_names()
    descriptions = config.data.label_descriptions

    def ablation_job() -> tuple[str, dict]:
        from phrasefuse.fuse.ablate import ablate

        report = ablate(config.data.source, features_of(names), ab.head, shots=ab.shots, seeds=ab.seeds,
                        label_col=config.data.label_col, multilabel=config.data.multilabel,
                        out=layout.ablation, rows=ab.rows, shot_rows=ab.shot_rows, full=True,
                        label_prior=ab.label_prior,
                        label_descriptions=str(descriptions) if descriptions and (ab.label_prior or ab.pseudo_shots)
                        else None,
                        pseudo_shots=str(layout.index) if ab.pseudo_shots else None, text_model=config.encoders.text)
        return (f"ablation: {ab.head} head, {len(report.data['tables'])} table(s), {ab.seeds} seed(s); "
                f"{report.data['seconds']:.0f} s -> {layout.ablation / 'ablation.md'}"), \
            {"seconds": report.data["seconds"]}

    inputs = {**labels, "ablation": vars(ab), "stores": stores_fp(names),
              "descriptions": files_fingerprint(descriptions) if descriptions and (ab.label_prior or ab.pseudo_shots)
              else None,
              **({"index": _build_id(layout.index), "text_model": config.encoders.text} if ab.pseudo_shots else {})}
    return state.run("ablation", inputs, lambda: file_fingerprint(layout.ablation / "ablation.json"), ablation_job)


def report_stage(config: Config, layout: Layout, state: RunState) -> StageResult:
    """Last: its inputs are every other stage's output."""

    def report_job() -> tuple[str, dict]:
        from phrasefuse.report.page import write_report

        written = write_report(config, layout, heads_with_baseline(config))
        return f"report: {layout.report} ({len(written) - 1} plots)", {"files": [str(p) for p in written]}

    inputs = {"stages": {k: v.get("output") for k, v in state.stages.items() if k != "report"},
              "report": vars(config.report),
              "config": files_fingerprint(config.path)}
    return state.run("report", inputs, lambda: file_fingerprint(layout.report), report_job)


def check_inputs(config: Config) -> None:
    """The files a config names exist (before any work)."""
    named = [("data.manifest", config.data.manifest), ("data.label_descriptions", config.data.label_descriptions)]
    if config.phrases:
        named += [("phrases.pairs", config.phrases.pairs), ("phrases.images", config.phrases.images)]
    # recursive: a ** matches as the commands read it (manifests.tables.expand); braces: tar shards
    missing = [key for key, path in named if path is not None and not all(
        glob.glob(name, recursive=True) if glob.has_magic(name) else os.path.exists(name)
        for name in expand_braces(str(path)))]
    problems = [f"key '{key}': {dict(named)[key]} does not exist; fix the path (relative to the config file's "
                f"folder)" for key in missing]
    if "data.manifest" not in missing:
        problems += _column_problems(config)
    if problems:  # every mistake at once, each naming its key
        raise config_error(config.path, problems)


def _column_problems(config: Config) -> list[str]:
    """The columns the config names that the manifest lacks (read from the files' schemas, before any
    work: not after hours of extraction)."""
    from phrasefuse.manifests.sources import source_columns

    columns = source_columns(config.data.source)  # tables: their schemas; folders, tars: their layout
    named = [("data.text_columns", n) for n in config.data.text_columns] + \
        ([("data.label_col", config.data.label_col)] if config.data.label_col else [])
    return [f"key '{key}': column '{name}' is not in the manifest {config.data.manifest} "
            f"(columns: {', '.join(columns)}); fix the name" for key, name in named if name not in columns]


def extract_stages(config: Config, layout: Layout, state: RunState, manifest_fp: str,
                   progress: bool | None) -> Iterator[StageResult]:
    from phrasefuse.extract.jobs import extract_images, extract_texts

    enc = config.encoders
    image_job = lambda manifest, out: _summary(extract_images(  # noqa: E731
        manifest, out, model=enc.image, batch_size=enc.batch_size, workers=enc.workers, device=enc.device,
        progress=progress, allow_outside_paths=config.data.allow_outside_paths, limits=enc.image_limits()))
    limits = {k: getattr(enc, k) for k in LIMIT_KEYS if getattr(enc, k) is not None}
    out = layout.store(IMAGE)
    yield state.run(f"extract {IMAGE}", {"manifest": manifest_fp, "model": enc.image,
                                         "allow_outside_paths": config.data.allow_outside_paths, **limits},
                    lambda: _retrying(out), lambda: image_job(config.data.source, out))
    for col in config.data.text_columns:
        out_t = layout.store(col)
        yield state.run(f"extract {col}", {"manifest": manifest_fp, "column": col, "model": enc.text},
                        lambda out_t=out_t: folder_fingerprint(out_t),
                        lambda col=col, out_t=out_t: _summary(extract_texts(
                            config.data.source, col, out_t, model=enc.text, device=enc.device, progress=progress)))
    if config.phrases and config.phrases.images is not None:
        q = config.phrases.images
        yield state.run("extract query images", {"manifest": files_fingerprint(q), "model": enc.image, **limits},
                        lambda: _retrying(layout.query_store), lambda: image_job(q, layout.query_store))


def _retrying(store: Path) -> str | None:
    """An image store's fingerprint; None (the stage runs) while it lists failed rows: a missing or
    unreadable file may have been put back since, and `extract images` retries failed rows."""
    return None if (store / "errors.parquet").is_file() else folder_fingerprint(store)


def phrase_stages(config: Config, layout: Layout, state: RunState, progress: bool | None) -> Iterator[StageResult]:
    from phrasefuse.index.build import build_index
    from phrasefuse.index.phrases import generate_phrases

    ph, enc = config.phrases, config.encoders
    query = layout.query_store if ph.images is not None else layout.store(IMAGE)
    inputs = {"pairs": files_fingerprint(ph.pairs), "images": folder_fingerprint(query),
              "min_images": ph.min_images, "kind": ph.kind, "weights": ph.weights}

    def index_job() -> tuple[str, dict]:
        s = build_index(ph.pairs, query, layout.index, min_images=ph.min_images, kind=ph.kind,
                        use_weights=ph.weights, device=enc.device, progress=progress)
        return s.text(), {"phrases": s.counts.get("phrases"), "recall_at_10": s.index.get("recall_at_10")}

    yield state.run("index", inputs, lambda: _build_id(layout.index), index_job)

    out = layout.store(PHRASES)
    inputs = {"index": _build_id(layout.index), "images": folder_fingerprint(layout.store(IMAGE)), "k": ph.k,
              "text_model": enc.text}

    def phrases_job() -> tuple[str, dict]:
        store = EmbeddingStore(out)
        if _stale_phrases(store, inputs["index"]):
            remove_folder(out)  # derived data, regenerated whole; a kill meanwhile leaves no half of it
        s = generate_phrases(layout.index, layout.store(IMAGE), out, k=ph.k, text_model=enc.text, device=enc.device,
                             progress=progress)
        return s.text(), s.as_dict()

    yield state.run("phrases", inputs, lambda: folder_fingerprint(out), phrases_job)


def _stale_phrases(store: EmbeddingStore, build_id: str | None) -> bool:
    """Phrases of an older index, or a store a kill left without meta.json (derived: rebuilt whole)."""
    if store.exists():
        return (store.meta.get("phrases") or {}).get("build_id") != build_id
    return store.path.is_dir()


def heads_with_baseline(config: Config) -> list[Head]:
    """The config's heads, plus an image-only head of the first head's kind for the report to
    compare with (unless the config has one)."""
    heads = list(config.heads)
    if heads and not any(h.features == [IMAGE] and not h.label_prior and not h.pseudo_shots for h in heads) \
            and all(h.name != BASELINE for h in heads):
        heads.append(Head(name=BASELINE, kind=heads[0].kind, features=[IMAGE], seed=heads[0].seed))
    return heads


def head_stage(config: Config, layout: Layout, state: RunState, head: Head, labels: dict,
               features_of: Callable, stores_fp: Callable) -> StageResult:
    out, predictions = layout.head(head.name), layout.predictions(head.name)
    descriptions = config.data.label_descriptions
    reads = head.features + ([head.label_prior] if head.label_prior else [])
    uses_descriptions = descriptions is not None and (head.align_descriptions > 0 or head.label_prior is not None
                                                      or head.pseudo_shots)
    inputs = {**labels, "head": vars(head), "stores": stores_fp(reads), "text_model": config.encoders.text,
              "descriptions": files_fingerprint(descriptions) if uses_descriptions else None,
              **({"index": _build_id(layout.index)} if head.pseudo_shots else {})}

    def job() -> tuple[str, dict]:
        from phrasefuse.fuse.evaluate import predict
        from phrasefuse.fuse.train import train_head

        report = train_head(config.data.source, features_of(head.features), out, kind=head.kind, seed=head.seed,
                            label_col=config.data.label_col, multilabel=config.data.multilabel,
                            label_descriptions=str(descriptions) if descriptions else None,
                            align_descriptions=head.align_descriptions, text_model=config.encoders.text,
                            label_prior=str(layout.store(head.label_prior)) if head.label_prior else None,
                            pseudo_shots=str(layout.index) if head.pseudo_shots else None)
        # every head's predictions show the run's phrases (as the README says), also a head that
        # does not read them (image-only) or saved without them
        p = predict(out, config.data.source, predictions, phrases_from=[layout.phrases_store] if config.phrases else [])
        d = report.as_dict()
        test = (d["metrics"].get("test") or {}).get("saved") or {}
        # composed, not rewritten: the head's name over the two commands' own texts
        return (f"head {head.name}:\n" + textwrap.indent(f"{report.text()}\n{p.text()}", "  ")), \
            {"saved": d["saved"], "reason": d["reason"], "test": _headline(test)}

    return state.run(f"head {head.name}", inputs,
                     lambda: _joined(folder_fingerprint(out), file_fingerprint(predictions)), job)


# ---------------------------------------------------------------- helpers


def _summary(s) -> tuple[str, dict]:
    return s.text(), s.as_dict()


def _build_id(index: Path) -> str | None:
    """The index's build id (changes with every rebuild); None when there is no index."""
    from phrasefuse.index.folder import PhraseIndex  # reads meta.json only

    try:
        return PhraseIndex(index).meta.get("build_id")
    except BadInput:
        return None


def _joined(*parts: str | None) -> str | None:
    return None if any(p is None for p in parts) else "|".join(parts)


def _headline(metrics: dict) -> dict:
    keys = ("top1", "top5", "macro_f1", "mAP", "micro_f1")
    return {k: metrics[k] for k in keys if k in metrics}
