"""`phrasefuse run CONFIG.toml`: every stage of a config, in order, into one work folder.

    WORK/stores/image, WORK/stores/<text column>, WORK/stores/phrases   embedding stores
    WORK/stores/query-image                                            the query corpus' images
    WORK/index                                                         the prototype index
    WORK/heads/<name>, WORK/predictions/<name>.parquet                 heads and their predictions
    WORK/ablation/ablation.{md,json}, WORK/zeroshot.json               tables
    WORK/report.html, WORK/plots/*.png                                 the report
    WORK/run-state.json                                                what each stage last did

`[phrases] index` / `query_store` name an index / a query image store made elsewhere: read in place of
WORK/index / WORK/stores/query-image, never written (their content's fingerprint is in the inputs of
the stages that read them, so a rebuilt index re-runs the phrases).

A stage is skipped when its inputs (files, the stores it reads, its settings) have the
same fingerprint as when it last completed and its output is still as it left it. Its
settings are not listed by hand: they are every option, declared in run/config.py, of the
config sections the stage reads (STAGE_SECTIONS), less those declared as not changing a
result or not read by that stage (`options_fingerprint`); a new option re-runs its stages. Extract
stages that do run embed only ids their store lacks or whose content changed (the embed-once
promise, `extract.jobs`), so a changed head re-trains only that head, and a manifest with new
rows embeds only those rows. The image extract stages also fingerprint every image file's stamp
(`extract.jobs.stamps_fingerprint`): a photo replaced under an unchanged manifest reruns them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from phrasefuse.errors import BadInput
from phrasefuse.manifests.sources import expand_braces
from phrasefuse.report import BASELINE
from phrasefuse.run.config import (ABLATION_STAGE, CHANGES_RESULT, EXTRACT_IMAGE, EXTRACT_QUERY, EXTRACT_TEXT,
                                   HEAD_STAGE, IMAGE, INDEX_STAGE, PHRASES, PHRASES_STAGE, REPORT_STAGE, UNREAD_BY,
                                   ZEROSHOT_STAGE, Config, Head, check_work, config_error, load_config)
from phrasefuse.folders import (RUN_STATE, RUN_STATE_FORMAT, make_folder, mark_run_folder, recover_leftovers,
                                remove_folder, write_json_atomic)
from phrasefuse.store import EmbeddingStore

STATE = RUN_STATE  # one name, which the folder scan (folders.is_phrasefuse_folder) knows too
REUSED = "reused"  # the status of a stage whose output was made elsewhere ([phrases] index, query_store)


@dataclass
class StageResult:
    stage: str
    status: str  # "ran" | "skipped"
    line: str
    summary: dict = field(default_factory=dict)

    def text(self) -> str:
        return f"[{self.status}] {self.stage}: {self.line}" if self.status in ("skipped", REUSED) else self.line

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
        # said again at the end: the stages above read it, this run neither built nor changed it
        parts += [f"{s.stage}: reused {s.summary['reused_from']}" for s in self.stages if s.status == REUSED]
        return "\n".join(parts + ([f"report: {self.work / 'report.html'}"] if self.work else []))


@dataclass
class Layout:
    """Where each output of a run lives, and the index and query store it reads: its own, or the
    folders made elsewhere that [phrases] index / query_store name (read, never written)."""

    work: Path
    reused_index: Path | None = None
    reused_query_store: Path | None = None

    @classmethod
    def of(cls, config: Config) -> "Layout":
        ph = config.phrases
        return cls(config.work, ph.index if ph else None, ph.query_store if ph else None)

    def store(self, feature: str) -> Path:
        return self.work / "stores" / feature

    @property
    def phrases_store(self) -> Path:
        return self.store(PHRASES)

    @property
    def query_store(self) -> Path:
        return self.reused_query_store or self.work / "stores" / "query-image"

    @property
    def index(self) -> Path:
        return self.reused_index or self.work / "index"

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
        return _dataset_fingerprint(Path(pattern))
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


def _dataset_fingerprint(root: Path) -> str:
    """An image folder's fingerprint, as its scan reads it: without the folders phrasefuse made inside
    (this run's work folder, rewritten by every run, would otherwise re-run every stage every time)."""
    from phrasefuse.manifests.sources import walk_dataset

    h = hashlib.sha256()
    for folder, _, files in walk_dataset(str(root)):
        for name in sorted(files):
            p = Path(folder) / name
            if name.startswith("."):
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


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


# Which sections of the config each kind of stage reads (a head stage: [data], [encoders] and its own
# [[heads]] table). Its settings are every option of these that changes a result and that it reads.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    EXTRACT_IMAGE: ("data", "encoders"),
    EXTRACT_TEXT: ("data", "encoders"),
    EXTRACT_QUERY: ("data", "encoders", "phrases"),
    INDEX_STAGE: ("encoders", "phrases"),
    PHRASES_STAGE: ("data", "encoders", "phrases"),  # data: its store keeps the manifest's ids only
    HEAD_STAGE: ("data", "encoders", "head"),
    ZEROSHOT_STAGE: ("data",),
    ABLATION_STAGE: ("data", "encoders", "ablation"),
    REPORT_STAGE: ("data", "encoders", "phrases", "heads", "ablation", "report"),
}


def options_fingerprint(section, stage: str, files: Callable[[Path], str]) -> dict | list | None:
    """The options of a config section (a run/config.py dataclass, a list of them, or None when the
    section is absent) that change what `stage` (a kind of config.STAGES) makes: derived from the
    declarations (`dataclasses.fields`), never listed here. A path counts as its name and the
    fingerprint of what it names (`files`), so an edited file re-runs the stage as a changed setting does."""
    if section is None:
        return None
    if isinstance(section, list):
        return [options_fingerprint(s, stage, files) for s in section]
    assert is_dataclass(section), section
    options = {}
    for f in fields(section):
        if not f.metadata.get(CHANGES_RESULT, True) or stage in f.metadata.get(UNREAD_BY, ()):
            continue
        value = getattr(section, f.name)
        options[f.name] = [str(value), files(value)] if isinstance(value, Path) else value
    return options


def stage_settings(config: Config, stage: str, head: Head | None = None,
                   files: Callable[[Path], str] | None = None) -> dict:
    """The settings part of a stage's inputs: per section it reads (STAGE_SECTIONS), its options'
    fingerprint. `head`: the head of a head stage. `files`: files_fingerprint, memoised by the caller
    (a folder of images is walked once per run, not once per stage)."""
    files = files or files_fingerprint
    sections = {"data": config.data, "encoders": config.encoders, "phrases": config.phrases,
                "heads": config.heads, "ablation": config.ablation, "report": config.report, "head": head}
    return {name: options_fingerprint(sections[name], stage, files) for name in STAGE_SECTIONS[stage]}


def plan_settings(config: Config, files: Callable[[Path], str] | None = None) -> dict[str, str]:
    """Each stage of a run of `config` (by its name in the run) and the digest of its settings: a stage
    whose digest differs from its last completed run's re-runs (whatever the stores say)."""
    memo: dict[Path, str] = {}
    files = files or (lambda p: memo[p] if p in memo else memo.setdefault(p, files_fingerprint(p)))
    plan = {EXTRACT_IMAGE: stage_settings(config, EXTRACT_IMAGE, files=files)}
    for col in config.data.text_columns:
        plan[f"extract {col}"] = {"column": col, **stage_settings(config, EXTRACT_TEXT, files=files)}
    if config.phrases:
        if extracts_query(config):
            plan[EXTRACT_QUERY] = stage_settings(config, EXTRACT_QUERY, files=files)
        if config.phrases.index is None:  # else the index is read, not built
            plan[INDEX_STAGE] = stage_settings(config, INDEX_STAGE, files=files)
        plan[PHRASES_STAGE] = stage_settings(config, PHRASES_STAGE, files=files)
    for head in heads_with_baseline(config):
        plan[f"head {head.name}"] = stage_settings(config, HEAD_STAGE, head, files=files)
    if config.phrases:
        plan[ZEROSHOT_STAGE] = stage_settings(config, ZEROSHOT_STAGE, files=files)
    if config.ablation:
        plan[ABLATION_STAGE] = stage_settings(config, ABLATION_STAGE, files=files)
    plan[REPORT_STAGE] = stage_settings(config, REPORT_STAGE, files=files)
    return {stage: _digest(settings) for stage, settings in plan.items()}


def extracts_query(config: Config) -> bool:
    """Whether the run extracts the query corpus' images: [phrases] images, when no store or index made
    elsewhere stands for them."""
    ph = config.phrases
    return ph is not None and ph.images is not None and ph.query_store is None and ph.index is None


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
        self.save()
        return StageResult(stage, "ran", line, summary)

    def save(self) -> None:
        write_json_atomic(self.path, {"format": RUN_STATE_FORMAT, "stages": self.stages})


def as_skipped(summary: dict) -> dict:
    """What a skipped stage did this time: nothing embedded or written; the rows its last run
    embedded or wrote are now rows already present."""
    out = {**summary, "skipped": True}
    for done, present in (("embedded", "present"), ("reused", "present"), ("written", "present"),
                          ("phrases_embedded", None), ("changed", None)):
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
    layout = Layout.of(config)
    check_work(config)  # absent, empty or a run's: never "/", home, or a folder of the user's files
    make_folder(config.work, "work folder")
    mark_run_folder(config.work)  # first: a run killed at any later point left a folder that is a run's
    for folder in (config.work, config.work / "stores", config.work / "heads", config.work / "predictions",
                   layout.ablation, config.work / "plots"):
        recover_leftovers(folder, owned=True)  # of a killed earlier run: swaps undone, temporaries removed
    state = RunState(config.work)  # its file, written above, marks WORK as a run's: a folder scan around it skips it
    settings = plan_settings(config)  # the files the config names are fingerprinted before any stage runs

    yield from extract_stages(config, layout, state, settings, progress)
    if config.phrases:
        if reused_folders(config):  # the run's image store now names [encoders] image's identity (loaded if need be)
            problems = reused_encoder_problems(config, _encoder_of(layout.store(IMAGE)))
            if problems:
                raise config_error(config.path, problems)
        yield from phrase_stages(config, layout, state, settings, progress)

    def features_of(names: list[str]) -> list[str]:
        return [f"{n}={layout.store(n)}" for n in names]

    def stores_fp(names: list[str]) -> dict:
        return {n: folder_fingerprint(layout.store(n)) for n in names}

    for head in heads_with_baseline(config):
        yield head_stage(config, layout, state, head, settings, features_of, stores_fp)
    if config.phrases:
        yield zeroshot_stage(config, layout, state, settings, stores_fp)
    if config.ablation:
        yield ablation_stage(config, layout, state, settings, features_of, stores_fp)
    yield report_stage(config, layout, state, settings)


def zeroshot_stage(config: Config, layout: Layout, state: RunState, settings: dict,
                   stores_fp: Callable) -> StageResult:
    descriptions = config.data.label_descriptions
    inputs = {"settings": settings[ZEROSHOT_STAGE], "phrases": stores_fp([PHRASES])}

    def zeroshot_job() -> tuple[str, dict]:
        from phrasefuse.fuse.evaluate import zeroshot

        report = zeroshot(config.data.source, layout.store(PHRASES),
                          str(descriptions) if descriptions else None, label_col=config.data.label_col,
                          multilabel=config.data.multilabel)
        write_json_atomic(layout.zeroshot, report.as_dict())
        return report.text(), {"metrics": _headline(report.data["metrics"]), "coverage": report.data["coverage"]}

    return state.run("zeroshot", inputs, lambda: file_fingerprint(layout.zeroshot), zeroshot_job)


def ablation_stage(config: Config, layout: Layout, state: RunState, settings: dict, features_of: Callable,
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

    inputs = {"settings": settings[ABLATION_STAGE], "stores": stores_fp(names),
              **(_index_inputs(layout) if ab.pseudo_shots else {})}
    return state.run("ablation", inputs, lambda: file_fingerprint(layout.ablation / "ablation.json"), ablation_job)


def report_stage(config: Config, layout: Layout, state: RunState, settings: dict) -> StageResult:
    """Last: its inputs are every other stage's output."""

    def report_job() -> tuple[str, dict]:
        from phrasefuse.report.page import write_report

        written = write_report(config, layout, heads_with_baseline(config))
        return f"report: {layout.report} ({len(written) - 1} plots)", {"files": [str(p) for p in written]}

    inputs = {"settings": settings[REPORT_STAGE],
              "stages": {k: v.get("output") for k, v in state.stages.items() if k != "report"}}
    return state.run("report", inputs, lambda: file_fingerprint(layout.report), report_job)


def check_inputs(config: Config) -> None:
    """The files a config names exist (before any work)."""
    named = [("data.manifest", config.data.manifest), ("data.label_descriptions", config.data.label_descriptions)]
    if config.phrases:
        ph = config.phrases
        named += [("phrases.pairs", ph.pairs), ("phrases.images", ph.images), ("phrases.index", ph.index),
                  ("phrases.query_store", ph.query_store)]
    # recursive: a ** matches as the commands read it (manifests.tables.expand); braces: tar shards
    missing = [key for key, path in named if path is not None and not all(
        glob.glob(name, recursive=True) if glob.has_magic(name) else os.path.exists(name)
        for name in expand_braces(str(path)))]
    problems = [f"key '{key}': {dict(named)[key]} does not exist; fix the path (relative to the config file's "
                f"folder)" for key in missing]
    if "data.manifest" not in missing:
        problems += _column_problems(config)
    problems += _reused_problems(config, missing)
    if reused_folders(config) and not problems:
        # before any work when a record vouches for [encoders] image (else after extract image: run_config)
        problems += reused_encoder_problems(config, _recorded_image_encoder(config))
    if problems:  # every mistake at once, each naming its key
        raise config_error(config.path, problems)


def reused_folders(config: Config) -> list[tuple[str, Path]]:
    """(key, folder) of each folder made elsewhere that the run reads ([phrases] index, query_store)."""
    ph = config.phrases
    if ph is None:
        return []
    return [(f"phrases.{key}", path) for key, path in (("index", ph.index), ("query_store", ph.query_store))
            if path is not None]


def _reused_problems(config: Config, missing: list[str]) -> list[str]:
    """A reused folder is what its key says: an index, an image store (meta.json read; nothing written)."""
    problems = []
    for key, path in reused_folders(config):
        if key in missing:
            continue
        made_by = "'phrasefuse index build' or another run's WORK/index" if key == "phrases.index" \
            else "'phrasefuse extract images' or another run's WORK/stores/query-image"
        try:
            modality = _reused_meta(key, path).get("modality", "image")
        except BadInput as e:  # its own message names the folder and what it is not
            problems.append(f"key '{key}': {e}; name a folder made by {made_by}")
            continue
        if modality != "image":
            problems.append(f"key '{key}': {path} holds {modality} embeddings; name an image store made by {made_by}")
    return problems


def _reused_meta(key: str, path: Path) -> dict:
    from phrasefuse.index.folder import PhraseIndex

    return PhraseIndex(path).meta if key == "phrases.index" else EmbeddingStore(path).meta


def _encoder_of(store: Path) -> dict | None:
    s = EmbeddingStore(store)
    return s.meta.get("encoder") if s.exists() else None


def _recorded_image_encoder(config: Config) -> dict | None:
    """[encoders] image's identity, when a record vouches for it without loading the model (a store made
    by that spec whose weights files are as they were: extract.identity); None: not known yet."""
    from phrasefuse.extract.identity import recorded_identity

    spec = config.encoders.image
    metas = [_reused_meta(key, path) for key, path in reused_folders(config)]
    try:  # the run's own image store, from an earlier run (an unreadable one is the extract stage's to say)
        image_store = EmbeddingStore(Layout.of(config).store(IMAGE))
        if image_store.exists():
            metas.append(image_store.meta)
    except BadInput:
        pass
    return next((found for found in (recorded_identity(spec, m) for m in metas) if found), None)


def reused_encoder_problems(config: Config, image_encoder: dict | None) -> list[str]:
    """The reused index or query store was embedded by [encoders] image (`image_encoder`: its identity;
    None: not known, nothing to say yet). Another encoder's vectors would be searched by this run's."""
    from phrasefuse.store import describe_encoder, encoder_identity

    if image_encoder is None:
        return []
    problems = []
    for key, path in reused_folders(config):
        theirs = _reused_meta(key, path).get("encoder") or {}
        if encoder_identity(theirs) != encoder_identity(image_encoder):
            problems.append(f"key '{key}': {path} holds embeddings of {describe_encoder(theirs)}, but [encoders] "
                            f"image is {describe_encoder(image_encoder)}; set [encoders] image to the encoder that "
                            f"made it, or name a folder made with this one")
    return problems


def _column_problems(config: Config) -> list[str]:
    """The columns the config names that the manifest lacks (read from the files' schemas, before any
    work: not after hours of extraction)."""
    from phrasefuse.manifests.sources import source_columns

    columns = source_columns(config.data.source)  # tables: their schemas; folders, tars: their layout
    named = [("data.text_columns", n) for n in config.data.text_columns] + \
        ([("data.label_col", config.data.label_col)] if config.data.label_col else [])
    return [f"key '{key}': column '{name}' is not in the manifest {config.data.manifest} "
            f"(columns: {', '.join(columns)}); fix the name" for key, name in named if name not in columns]


def extract_stages(config: Config, layout: Layout, state: RunState, settings: dict,
                   progress: bool | None) -> Iterator[StageResult]:
    from phrasefuse.extract.jobs import extract_images, extract_texts, stamps_fingerprint

    enc = config.encoders
    image_job = lambda manifest, out: _mirroring(manifest, out, _summary(extract_images(  # noqa: E731
        manifest, _of_encoder(out, enc.image), model=enc.image, batch_size=enc.batch_size, workers=enc.workers,
        device=enc.device, progress=progress, allow_outside_paths=config.data.allow_outside_paths,
        limits=enc.image_limits())))
    out = layout.store(IMAGE)
    # "images": every image file's stamp, so a photo replaced under a manifest that did not change
    # (a folder with the same names, sizes and mtimes; a table of paths) reruns the stage.
    yield state.run(EXTRACT_IMAGE, {"settings": settings[EXTRACT_IMAGE],
                                    "images": stamps_fingerprint(config.data.source,
                                                                 config.data.allow_outside_paths)},
                    lambda: _retrying(out), lambda: image_job(config.data.source, out))
    for col in config.data.text_columns:
        out_t = layout.store(col)
        yield state.run(f"extract {col}", {"settings": settings[f"extract {col}"]},
                        lambda out_t=out_t: folder_fingerprint(out_t),
                        lambda col=col, out_t=out_t: _mirroring(config.data.source, out_t, _summary(extract_texts(
                            config.data.source, col, _of_encoder(out_t, enc.text), model=enc.text, device=enc.device,
                            progress=progress))))
    if config.phrases and config.phrases.index is None and config.phrases.query_store is not None:
        yield reused_stage(EXTRACT_QUERY, "the query images' store", layout.query_store)
    if extracts_query(config):
        q = config.phrases.images
        yield state.run(EXTRACT_QUERY, {"settings": settings[EXTRACT_QUERY],
                                        "images": stamps_fingerprint(q, config.data.allow_outside_paths)},
                        lambda: _retrying(layout.query_store), lambda: image_job(q, layout.query_store))


def _of_encoder(out: Path, spec: str) -> Path:
    """`out`, emptied when its store holds another encoder's vectors than `spec` (the config's
    [encoders] image / text changed): a store never mixes two encoders, and the run's stores are its
    derived data, so the old one goes and the stage embeds every row with the encoder asked for.
    (The spec is recorded as given: extract.encoders.parse_spec keeps it.)"""
    store = EmbeddingStore(out)
    if store.exists() and (store.meta.get("encoder") or {}).get("spec") != spec:
        remove_folder(out)  # swapped out whole: a kill meanwhile leaves the old store or none
    return out


def _mirroring(manifest, out: Path, done: tuple[str, dict]) -> tuple[str, dict]:
    """An extract stage's result, after its store dropped the ids its manifest no longer has."""
    dropped = drop_rows_not_in(out, manifest)
    if not dropped:
        return done
    line, summary = done
    return (f"{line}\n  {dropped} rows of ids no longer in the manifest dropped from {out}",
            {**summary, "dropped": dropped})


def drop_rows_not_in(path: Path, manifest) -> int:
    """Drop from a run's store (WORK/stores/...) the rows and failures of ids that `manifest` no longer
    has (a changed [data] id_col, rows taken out): the run's stores mirror its manifest, so no stage
    or reader meets an old id. Returns the rows dropped. Each shard is rewritten whole (or removed)
    under the store's lock; a kill between two leaves valid rows only, and the stage, not recorded
    as complete, runs again."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from phrasefuse.folders import write_parquet_atomic
    from phrasefuse.manifests import read_manifest
    from phrasefuse.store import StoreWriter

    store = EmbeddingStore(path)
    if not store.exists():
        return 0
    ids = read_manifest(manifest).table["id"]
    ids = pc.cast(ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids, pa.string())
    dropped = 0
    with StoreWriter.open(path, store.meta):  # holds the lock; appends nothing
        for shard in store.shard_paths():
            table = pq.read_table(shard)
            keep = pc.is_in(table["id"], value_set=ids)
            kept = pc.sum(keep).as_py() or 0
            if kept == table.num_rows:
                continue
            dropped += table.num_rows - kept
            if kept:
                write_parquet_atomic(shard, table.filter(keep))
            else:
                shard.unlink()
        errors = store.errors()
        keep = pc.is_in(errors["id"], value_set=ids)
        if (pc.sum(keep).as_py() or 0) < errors.num_rows:
            if pc.any(keep).as_py():
                write_parquet_atomic(store.errors_path, errors.filter(keep))
            else:
                store.errors_path.unlink()
    return dropped


def _retrying(store: Path) -> str | None:
    """An image store's fingerprint; None (the stage runs) while it lists failed rows: a missing or
    unreadable file may have been put back since, and `extract images` retries failed rows."""
    return None if (store / "errors.parquet").is_file() else folder_fingerprint(store)


def phrase_stages(config: Config, layout: Layout, state: RunState, settings: dict,
                  progress: bool | None) -> Iterator[StageResult]:
    from phrasefuse.index.build import build_index
    from phrasefuse.index.phrases import generate_phrases

    ph, enc = config.phrases, config.encoders
    if ph.index is not None:
        yield reused_stage(INDEX_STAGE, "the index", layout.index)
    else:
        query = layout.query_store if ph.images is not None or ph.query_store is not None else layout.store(IMAGE)
        inputs = {"settings": settings[INDEX_STAGE], "images": folder_fingerprint(query)}

        def index_job() -> tuple[str, dict]:
            s = build_index(ph.pairs, query, layout.index, min_images=ph.min_images, kind=ph.kind,
                            use_weights=ph.weights, device=enc.device, progress=progress)
            return s.text(), {"phrases": s.counts.get("phrases"), "recall_at_10": s.index.get("recall_at_10")}

        yield state.run(INDEX_STAGE, inputs, lambda: _build_id(layout.index), index_job)

    out = layout.store(PHRASES)
    inputs = {"settings": settings[PHRASES_STAGE], **_index_inputs(layout),
              "images": folder_fingerprint(layout.store(IMAGE))}

    def phrases_job() -> tuple[str, dict]:
        store = EmbeddingStore(out)
        if _stale_phrases(store, inputs["index"]):
            remove_folder(out)  # derived data, regenerated whole; a kill meanwhile leaves no half of it
        _of_encoder(out, enc.text)  # phrases embedded by another text model: regenerated whole too
        s = generate_phrases(layout.index, layout.store(IMAGE), out, k=ph.k, text_model=enc.text, device=enc.device,
                             progress=progress)
        return _mirroring(config.data.source, out, (s.text(), s.as_dict()))

    yield state.run(PHRASES_STAGE, inputs, lambda: folder_fingerprint(out), phrases_job)


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


def head_stage(config: Config, layout: Layout, state: RunState, head: Head, settings: dict,
               features_of: Callable, stores_fp: Callable) -> StageResult:
    out, predictions = layout.head(head.name), layout.predictions(head.name)
    descriptions = config.data.label_descriptions
    reads = head.features + ([head.label_prior] if head.label_prior else [])
    inputs = {"settings": settings[f"head {head.name}"], "stores": stores_fp(reads),
              **(_index_inputs(layout) if head.pseudo_shots else {})}

    def job() -> tuple[str, dict]:
        from phrasefuse.fuse.evaluate import predict
        from phrasefuse.fuse.train import train_head

        report = train_head(config.data.source, features_of(head.features), out, kind=head.kind, seed=head.seed,
                            label_col=config.data.label_col, multilabel=config.data.multilabel,
                            label_descriptions=str(descriptions) if descriptions else None,
                            align_descriptions=head.align_descriptions, text_model=config.encoders.text,
                            label_prior=str(layout.store(head.label_prior)) if head.label_prior else None,
                            pseudo_shots=str(layout.index) if head.pseudo_shots else None, shots=head.shots)
        # every head's predictions show the run's phrases (as the README says), also a head that
        # does not read them (image-only) or saved without them
        p = predict(out, config.data.source, predictions,
                    phrases_from=[layout.phrases_store] if config.phrases else [])
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


def reused_stage(stage: str, what: str, path: Path) -> StageResult:
    """The result of a stage whose output was made elsewhere: said, with its folder (nothing recorded in
    the run's state: the stages reading it hold its fingerprint)."""
    from phrasefuse.index.folder import PhraseIndex

    if stage == INDEX_STAGE:
        meta = PhraseIndex(path).meta
        size, extra = f"{(meta.get('counts') or {}).get('phrases')} phrases", {"build_id": meta.get("build_id")}
    else:
        size, extra = f"{EmbeddingStore(path).num_rows()} rows", {}
    return StageResult(stage, REUSED, f"{what} {path} ({size}), made elsewhere: read, never written",
                       {"reused_from": str(path), **extra})


def _index_inputs(layout: Layout) -> dict:
    """What a stage reading the index holds of it: its build id (new with every rebuild) and, for an
    index made elsewhere, its files' fingerprint too (this run did not build it, so cannot vouch for it)."""
    return {"index": _build_id(layout.index),
            **({"index_files": folder_fingerprint(layout.index)} if layout.reused_index else {})}


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
