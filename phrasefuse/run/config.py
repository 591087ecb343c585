"""The run config (TOML): read, checked whole before any work, paths resolved.

Every key is declared here once, with its type and default, so an unknown key, a wrong
type or a missing required value is refused before any stage runs, naming the key and
what is expected. Paths in the file are relative to the file's own folder. Nothing of
the file is evaluated: TOML is data.

Each option also declares (`option`) whether it changes a result and which stages never read
it: `run` derives every stage's fingerprint from these declarations (run/pipeline.py
`options_fingerprint`), so a new option re-runs the stages of its section without more code.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from phrasefuse.errors import MAX_SEED, BadInput
from phrasefuse.folders import RUN_STATE, RUN_STATE_FORMAT
from phrasefuse.extract import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL
from phrasefuse.fuse import HEAD_KINDS, LABEL_PRIOR, PSEUDO_SHOTS
from phrasefuse.index import DEFAULT_PHRASES_K
from phrasefuse.index.kinds import KINDS as INDEX_KINDS

LIMIT_KEYS = ("max_image_mb", "max_image_megapixels", "max_aspect_ratio")  # [encoders]: images.ImageLimits
IMAGE = "image"  # the feature name of the labelled images' store
PHRASES = "phrases"  # the feature name of the generated phrases' store
QUERY_IMAGE = "query-image"  # the store of the query corpus' images (run/pipeline.py Layout)


# The stages of a run, by kind (run/pipeline.py names each stage; "extract text" is one per text column).
EXTRACT_IMAGE, EXTRACT_TEXT, EXTRACT_QUERY = "extract image", "extract text", "extract query images"
INDEX_STAGE, PHRASES_STAGE, HEAD_STAGE = "index", "phrases", "head"
ZEROSHOT_STAGE, ABLATION_STAGE, REPORT_STAGE = "zeroshot", "ablation", "report"
STAGES = (EXTRACT_IMAGE, EXTRACT_TEXT, EXTRACT_QUERY, INDEX_STAGE, PHRASES_STAGE, HEAD_STAGE, ZEROSHOT_STAGE,
          ABLATION_STAGE, REPORT_STAGE)
EXTRACTS = (EXTRACT_IMAGE, EXTRACT_TEXT, EXTRACT_QUERY)

CHANGES_RESULT = "changes_result"  # field metadata keys (read by run/pipeline.py's options_fingerprint)
UNREAD_BY = "unread_by"


def option(default: Any = MISSING, *, default_factory: Any = MISSING, changes_result: bool = True,
           unread_by: tuple[str, ...] = ()) -> Any:
    """A config option. Every stage that reads its section re-runs when it changes (its fingerprint
    holds every option of the sections it reads), except:
    - `changes_result=False`: the option changes how a stage runs, never what it makes;
    - `unread_by`: stages (kinds of STAGES) whose job never gets this option.
    The safe default is both off: a new option re-runs every stage of its section until shown otherwise."""
    unknown = set(unread_by) - set(STAGES)
    if unknown:  # a misspelt stage would silently keep that stage's result stale
        raise ValueError(f"unread_by: unknown stage(s) {sorted(unknown)}; expected some of {STAGES}")
    return field(default=default, default_factory=default_factory,
                 metadata={CHANGES_RESULT: changes_result, UNREAD_BY: frozenset(unread_by)})


def option_names(section: type) -> set[str]:
    """The keys a section accepts: exactly its declared options (so every key is fingerprinted)."""
    return {f.name for f in fields(section)}


# The extract stages read only the rows (manifest, ids, images); labels, descriptions and the other
# columns reach the heads, the zero-shot table, the ablation and the report.
_LABELS_ONLY = (*EXTRACTS, PHRASES_STAGE)


@dataclass
class Data:
    manifest: Path = option(unread_by=(EXTRACT_QUERY,))  # the query images have their own manifest
    label_col: str | None = option(None, unread_by=_LABELS_ONLY)
    multilabel: bool = option(False, unread_by=_LABELS_ONLY)
    # each "extract <column>" stage reads its own column (in its name), a head the features it names
    text_columns: list[str] = option(default_factory=list, unread_by=(
        *EXTRACTS, PHRASES_STAGE, HEAD_STAGE, ZEROSHOT_STAGE))
    label_descriptions: Path | None = option(None, unread_by=_LABELS_ONLY)
    # where image files may be: extract images (and the report's thumbnails) open them
    allow_outside_paths: bool = option(False, unread_by=(EXTRACT_TEXT, PHRASES_STAGE, HEAD_STAGE, ZEROSHOT_STAGE,
                                                         ABLATION_STAGE))
    id_col: str | None = option(None, unread_by=(EXTRACT_QUERY,))  # column mapping (as --id-col / --image-col)
    image_col: str | None = option(None, unread_by=(EXTRACT_QUERY,))

    @property
    def source(self):
        """The manifest with its column mapping, as the jobs read it."""
        from phrasefuse.manifests import source_with

        return source_with(self.manifest, self.id_col, self.image_col)


# What an image encoder makes (and which images it refuses) reaches the text stages and the heads
# only through the stores they read, whose fingerprints they hold.
_IMAGE_SIDE_UNREAD = (EXTRACT_TEXT, INDEX_STAGE, PHRASES_STAGE, HEAD_STAGE, ABLATION_STAGE)


@dataclass
class Encoders:
    image: str = option(DEFAULT_IMAGE_MODEL, unread_by=_IMAGE_SIDE_UNREAD)
    text: str = option(DEFAULT_TEXT_MODEL, unread_by=(EXTRACT_IMAGE, EXTRACT_QUERY, INDEX_STAGE))
    # Where and how fast, not what: a store keeps the rows embedded on another device or in other
    # batches (embed-once), so these cannot promise bit-identical vectors anyway; the differences
    # are float rounding (as with BLAS thread counts), never another model or other rows. "auto"
    # would also name a different device on another machine.
    device: str = option("auto", changes_result=False)
    batch_size: int = option(64, changes_result=False)
    workers: int | None = option(None, changes_result=False)
    max_image_mb: float | None = option(None, unread_by=_IMAGE_SIDE_UNREAD)  # images.ImageLimits; None: its default
    max_image_megapixels: float | None = option(None, unread_by=_IMAGE_SIDE_UNREAD)
    max_aspect_ratio: float | None = option(None, unread_by=_IMAGE_SIDE_UNREAD)

    def image_limits(self):
        from phrasefuse.extract.limits import ImageLimits

        return ImageLimits.of(self.max_image_mb, self.max_image_megapixels, self.max_aspect_ratio)


_INDEX_ONLY = (EXTRACT_QUERY, PHRASES_STAGE)  # index settings: the phrases stage holds the index's build id


@dataclass
class Phrases:
    # required unless `index` names a built one (checked in _parse_phrases: a dataclass default cannot say so)
    pairs: Path | None = option(None, unread_by=_INDEX_ONLY)
    # manifest of the query corpus' images (default: the labelled manifest)
    images: Path | None = option(None, unread_by=(PHRASES_STAGE,))
    # An index built elsewhere (`phrasefuse index build`, another run's WORK/index), read in place of
    # building WORK/index: there is then no index stage to read it, and no query images to extract.
    index: Path | None = option(None, unread_by=(EXTRACT_QUERY, INDEX_STAGE))
    # An image store made elsewhere (`phrasefuse extract images`), read in place of extracting `images`:
    # the index stage builds from it (the phrases stage reads the index's build id, not the store).
    query_store: Path | None = option(None, unread_by=(EXTRACT_QUERY, PHRASES_STAGE))
    k: int = option(DEFAULT_PHRASES_K, unread_by=(EXTRACT_QUERY, INDEX_STAGE))
    min_images: int = option(1, unread_by=_INDEX_ONLY)
    kind: str = option("auto", unread_by=_INDEX_ONLY)
    weights: bool = option(True, unread_by=_INDEX_ONLY)


@dataclass
class Head:  # each head stage reads its own [[heads]] table (and the report all of them)
    name: str = option()
    kind: str = option()
    features: list[str] = option()
    seed: int = option(0)
    label_prior: str | None = option(None)
    align_descriptions: float = option(0.0)
    pseudo_shots: bool = option(False)  # offer the [phrases] index's pseudo-labelled prototypes (fuse/pseudo.py)
    shots: int | None = option(None)  # K rows per class drawn with `seed`, as `fuse ablate --shots K`


@dataclass
class Ablation:
    head: str = option("linear")
    seeds: int = option(3)
    shots: list[int] = option(default_factory=list)
    rows: list[list[str]] | None = option(None)
    shot_rows: list[list[str]] | None = option(None)
    label_prior: str | None = option(None)  # a text feature; rows may then list "label-prior"
    pseudo_shots: bool = option(False)  # rows may then list "pseudo-shots" (the [phrases] index's prototypes)


@dataclass
class Report:
    gallery: int = option(24)


@dataclass
class Config:
    path: Path
    work: Path
    data: Data
    encoders: Encoders
    phrases: Phrases | None
    heads: list[Head]
    ablation: Ablation | None
    report: Report

    def feature_names(self) -> list[str]:
        """Every feature the config makes: image, each text column, phrases."""
        return [IMAGE, *self.data.text_columns] + ([PHRASES] if self.phrases else [])


# ---------------------------------------------------------------- reading


def load_config(path: str | os.PathLike) -> Config:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"{path}: no such config file; pass the path of a TOML file (see manifests/example.toml)") \
            from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: unreadable ({e}); pass a UTF-8 TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"{path}: not valid TOML ({e}); fix the file (see manifests/example.toml)") from None
    return parse_config(raw, path)


def parse_config(raw: dict, path: Path) -> Config:
    """The config `raw` (read from `path`), each section checked by its own step; every mistake of
    every section is collected, then raised at once, each naming its key."""
    c = _Checker(path)
    base = path.resolve().parent
    c.known(raw, "", {"work", "data", "encoders", "phrases", "heads", "ablation", "report"})
    work = _path(base, c.get(raw, "work", str, "work"))
    data = _parse_data(c, c.table(raw, "data", required=True), base)
    encoders = _parse_encoders(c, c.table(raw, "encoders"))
    phrases = _parse_phrases(c, c.table(raw, "phrases"), base) if "phrases" in raw else None
    features = [IMAGE, *data.text_columns] + ([PHRASES] if phrases else [])
    heads = _parse_heads(c, raw.get("heads", []), features, phrases is not None)
    ablation = _parse_ablation(c, c.table(raw, "ablation"), features, phrases is not None) if "ablation" in raw \
        else None
    report = _parse_report(c, c.table(raw, "report"))
    c.raise_errors()  # every mistake at once, each naming its key
    return Config(path, work, data, encoders, phrases, heads, ablation, report)


def _parse_data(c: "_Checker", data_raw: dict, base: Path) -> Data:
    c.known(data_raw, "data", option_names(Data))
    text_columns = c.get(data_raw, "text_columns", list, [], item=str, where="data")
    data = Data(manifest=_path(base, c.get(data_raw, "manifest", str, where="data")),
                label_col=c.get(data_raw, "label_col", str, None, where="data"),
                multilabel=c.get(data_raw, "multilabel", bool, False, where="data"),
                text_columns=text_columns,
                label_descriptions=_path(base, c.get(data_raw, "label_descriptions", str, None, where="data")),
                allow_outside_paths=c.get(data_raw, "allow_outside_paths", bool, False, where="data"),
                id_col=c.get(data_raw, "id_col", str, None, where="data"),
                image_col=c.get(data_raw, "image_col", str, None, where="data"))
    for name in text_columns:
        if name in (IMAGE, PHRASES, QUERY_IMAGE) or not name.replace("_", "").replace("-", "").isalnum():
            c.fail("data.text_columns", f"{name!r} cannot name a feature; use a column name of letters, digits, "
                                        f"_ or - other than '{IMAGE}', '{PHRASES}' and '{QUERY_IMAGE}'")
    if len(set(text_columns)) != len(text_columns):
        c.fail("data.text_columns", "lists a column twice; list each once")
    return data


def _parse_encoders(c: "_Checker", enc_raw: dict) -> Encoders:
    c.known(enc_raw, "encoders", option_names(Encoders))
    encoders = Encoders(image=c.get(enc_raw, "image", str, DEFAULT_IMAGE_MODEL, where="encoders"),
                        text=c.get(enc_raw, "text", str, DEFAULT_TEXT_MODEL, where="encoders"),
                        device=c.choice(enc_raw, "device", ("auto", "cpu", "cuda"), "auto", where="encoders"),
                        batch_size=c.positive(enc_raw, "batch_size", 64, where="encoders"),
                        workers=c.get(enc_raw, "workers", int, None, where="encoders"),
                        **{k: c.get(enc_raw, k, (int, float), None, where="encoders") for k in LIMIT_KEYS})
    try:
        encoders.image_limits()
    except ValueError as e:
        c.fail(f"encoders.{str(e).split()[0]}", " ".join(str(e).split()[1:]))
    if encoders.workers is not None and encoders.workers < 0:  # 0 is meaningful: decode in this process
        c.fail("encoders.workers", f"expected 0 or more (0 decodes in the main process), got {encoders.workers}")
    return encoders


# The keys that say how to build an index: with `index` (one built already) they would be silently unused.
INDEX_BUILD_KEYS = ("pairs", "images", "query_store", "min_images", "kind", "weights")


def _parse_phrases(c: "_Checker", ph_raw: dict, base: Path) -> Phrases:
    c.known(ph_raw, "phrases", option_names(Phrases))
    phrases = Phrases(pairs=_path(base, c.get(ph_raw, "pairs", str, None, where="phrases")),
                      images=_path(base, c.get(ph_raw, "images", str, None, where="phrases")),
                      index=_path(base, c.get(ph_raw, "index", str, None, where="phrases")),
                      query_store=_path(base, c.get(ph_raw, "query_store", str, None, where="phrases")),
                      k=c.positive(ph_raw, "k", DEFAULT_PHRASES_K, where="phrases"),
                      min_images=c.positive(ph_raw, "min_images", 1, where="phrases"),
                      kind=c.choice(ph_raw, "kind", ("auto", *INDEX_KINDS), "auto", where="phrases"),
                      weights=c.get(ph_raw, "weights", bool, True, where="phrases"))
    if "index" in ph_raw:
        for key in INDEX_BUILD_KEYS:
            if key in ph_raw:  # a key the run would not read: the user meant one of the two
                c.fail(f"phrases.{key}", "builds an index, but 'index' names a built one that is used instead; "
                                         f"drop '{key}' to reuse that index, or drop 'index' to build one")
    elif "pairs" not in ph_raw:
        c.fail("phrases.pairs", "missing; name the pairs table to build the index from, or name a built index "
                                "with 'index' (phrasefuse index build, or another run's WORK/index)")
    if "index" not in ph_raw and "images" in ph_raw and "query_store" in ph_raw:
        c.fail("phrases.images", "the query images are read from 'query_store', already extracted; drop 'images' "
                                 "to reuse that store, or drop 'query_store' to extract these images")
    return phrases


def _parse_heads(c: "_Checker", heads_raw, features: list[str], has_phrases: bool) -> list[Head]:
    if not isinstance(heads_raw, list) or not all(isinstance(h, dict) for h in heads_raw):
        c.fail("heads", "expected an array of tables ([[heads]] sections)")
        heads_raw = []
    heads = [_parse_head(c, h, f"heads[{i}]", features, has_phrases) for i, h in enumerate(heads_raw)]
    if len({h.name for h in heads}) != len(heads):
        c.fail("heads", "two heads have the same name; give each its own name")
    return heads


def _parse_head(c: "_Checker", h: dict, where: str, features: list[str], has_phrases: bool) -> Head:
    c.known(h, where, option_names(Head))
    head = Head(name=c.get(h, "name", str, where=where), kind=c.choice(h, "kind", HEAD_KINDS, where=where),
                features=c.get(h, "features", list, list(features), item=str, where=where),
                seed=c.get(h, "seed", int, 0, where=where),
                label_prior=c.get(h, "label_prior", str, None, where=where),
                align_descriptions=float(c.get(h, "align_descriptions", (int, float), 0.0, where=where)),
                pseudo_shots=c.get(h, "pseudo_shots", bool, False, where=where),
                shots=c.get(h, "shots", int, None, where=where))
    if head.shots is not None and head.shots < 1:
        c.fail(f"{where}.shots", f"expected a whole number of at least 1 (labelled rows per class), got {head.shots}")
    if head.pseudo_shots and not has_phrases:
        c.fail(f"{where}.pseudo_shots", "uses the phrase index of the [phrases] section; add one or drop it")
    c.features(head.features, features, f"{where}.features")
    if not 0 <= head.seed <= MAX_SEED:
        c.fail(f"{where}.seed", f"expected a whole number from 0 to {MAX_SEED}, got {head.seed}")
    if not head.align_descriptions >= 0 or head.align_descriptions == float("inf"):
        c.fail(f"{where}.align_descriptions", f"expected a finite weight of 0 or more, got {head.align_descriptions}")
    if head.align_descriptions > 0 and head.kind != "mlp":
        c.fail(f"{where}.align_descriptions", f"aligns the mlp head's image projection; use kind = \"mlp\" "
                                              f"or drop it (this head is {head.kind})")
    if head.label_prior is not None:
        c.features([head.label_prior], [n for n in features if n != IMAGE], f"{where}.label_prior")
    if head.name is not None and not head.name.replace("_", "").replace("-", "").isalnum():
        c.fail(f"{where}.name", f"{head.name!r}: use letters, digits, _ or - (it names a folder)")
    return head


def _parse_ablation(c: "_Checker", ab_raw: dict, features: list[str], has_phrases: bool) -> Ablation:
    c.known(ab_raw, "ablation", option_names(Ablation))
    label_prior = c.get(ab_raw, "label_prior", str, None, where="ablation")
    if label_prior is not None:
        c.features([label_prior], [n for n in features if n != IMAGE], "ablation.label_prior")
    pseudo_shots = c.get(ab_raw, "pseudo_shots", bool, False, where="ablation")
    if pseudo_shots and not has_phrases:
        c.fail("ablation.pseudo_shots", "uses the phrase index of the [phrases] section; add one or drop it")
    row_names = features + ([LABEL_PRIOR] if label_prior else []) + ([PSEUDO_SHOTS] if pseudo_shots else [])
    ablation = Ablation(head=c.choice(ab_raw, "head", HEAD_KINDS, "linear", where="ablation"),
                        seeds=c.positive(ab_raw, "seeds", 3, where="ablation"),
                        shots=c.get(ab_raw, "shots", list, [], item=int, where="ablation"),
                        rows=_rows(c, ab_raw, "rows", row_names),
                        shot_rows=_rows(c, ab_raw, "shot_rows", row_names),
                        label_prior=label_prior, pseudo_shots=pseudo_shots)
    if any(k < 1 for k in ablation.shots):
        c.fail("ablation.shots", "expected whole numbers of at least 1 (labelled examples per class)")
    return ablation


def _parse_report(c: "_Checker", rep_raw: dict) -> Report:
    c.known(rep_raw, "report", option_names(Report))
    report = Report(gallery=c.get(rep_raw, "gallery", int, 24, where="report"))
    if report.gallery < 0:
        c.fail("report.gallery", "expected 0 or more (test images shown)")
    return report


def _path(base: Path, value: str | None) -> Path | None:
    # normpath, not resolve: "../data" reads as a path, and symlinked folders stay as named;
    # "~" is the home folder, as in a shell (else a folder literally named "~" appears)
    return None if value is None else Path(os.path.normpath(base / os.path.expanduser(value)))


# What a run writes in its work folder (run/pipeline.py Layout): a folder holding only these is a
# run's whose run-state.json was lost (every stage then checks its output again).
RUN_OUTPUTS = frozenset({RUN_STATE, "stores", "index", "heads", "predictions", "ablation", "zeroshot.json",
                         "report.html", "plots"})


def is_work_folder(folder: Path) -> bool:
    """Whether `folder` holds the run-state.json a run writes first, or only what a run writes."""
    import json

    from phrasefuse.folders import LEFTOVER_RE

    try:
        state = json.loads((folder / RUN_STATE).read_text(encoding="utf-8"))
        return isinstance(state, dict) and state.get("format") == RUN_STATE_FORMAT
    except (OSError, ValueError):
        pass
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return bool(names) and all(n in RUN_OUTPUTS or LEFTOVER_RE.match(n) for n in names)


def check_work(config: Config) -> None:
    """`work` names a folder the run may fill and clean up: absent, empty, or a run's work folder
    (run-state.json). Refused, before anything is written: the root or home folder, a file, and an
    existing folder holding anything else (the config's own folder holds the config and the data:
    the run's files would mix with the user's)."""
    problem = work_problem(config.work, 'name a new or empty folder for the run\'s outputs, e.g. work = "work"')
    if problem:
        raise config_error(config.path, [f"key 'work': {problem}"])


def work_problem(work: Path, fix: str) -> str | None:
    """Why `work` may not be a work folder (`check_work`), ending with `fix`; None: it may."""
    real = Path(os.path.realpath(work))
    problem = None
    if real == Path(real.anchor) or real == Path(os.path.realpath(Path.home())):
        problem = f"{work} is {'the root folder' if real == Path(real.anchor) else 'your home folder'}; {fix}"
    elif os.path.lexists(work) and not work.is_dir():
        problem = f"{work} is a file, not a folder; {fix}"
    elif work.is_dir() and not is_work_folder(work):
        try:
            names = sorted(os.listdir(work))
        except OSError as e:
            names, problem = [], f"{work}: cannot read the folder ({e.strerror}); {fix}"
        if names:
            problem = (f"{work} holds files phrasefuse did not write (e.g. {names[0]!r}; no {RUN_STATE}); {fix}")
    return problem


def _rows(c: "_Checker", raw: dict, key: str, features: list[str]) -> list[list[str]] | None:
    rows = c.get(raw, key, list, None, where="ablation")
    if rows is None:
        return None
    if not rows or not all(isinstance(r, list) and r and all(isinstance(n, str) for n in r) for r in rows):
        c.fail(f"ablation.{key}", 'expected a list of lists of feature names, e.g. [["image"], ["image", "phrases"]]')
        return None
    for r in rows:
        c.features(r, features, f"ablation.{key}")
    return rows


def config_error(path: Path, problems: list[str]) -> BadInput:
    """All of a config's mistakes as the contract's one line: each names its key."""
    if len(problems) == 1:
        return BadInput(f"{path}: {problems[0]}")
    return BadInput(f"{path}: {len(problems)} mistakes: " + "; ".join(problems))


class _Checker:
    """Type checks that name the key (`data.manifest`) and the file. A failed check is recorded and
    parsing goes on with the default (or None), so the user sees every mistake in one run."""

    def __init__(self, path: Path):
        self.path = path
        self.problems: list[str] = []

    def fail(self, key: str, expected: str) -> None:
        self.problems.append(f"key '{key}': {expected}")

    def raise_errors(self) -> None:
        if self.problems:
            raise config_error(self.path, self.problems)

    def known(self, raw: dict, where: str, keys: set[str]) -> None:
        for key in raw:
            if key not in keys:
                self.fail(f"{where}.{key}" if where else key,
                          f"unknown key; expected one of {', '.join(sorted(keys))}")

    def table(self, raw: dict, key: str, required: bool = False) -> dict:
        if key not in raw:
            if required:
                self.fail(key, f"missing; add a [{key}] section")
            return {}
        if not isinstance(raw[key], dict):
            self.fail(key, f"expected a table ([{key}] section)")
            return {}
        return raw[key]

    def get(self, raw: dict, key: str, kind, default: Any = ..., *, item=None, where: str = "") -> Any:
        name = f"{where}.{key}" if where else key
        fallback = None if default is ... else default  # what parsing goes on with after a mistake
        if key not in raw:
            if default is ...:
                self.fail(name, "missing; it is required")
            return fallback
        value = raw[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):  # TOML true is no number
            self.fail(name, f"expected {_kind_name(kind)}, got {value!r}")
            return fallback
        if item is not None and not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            self.fail(name, f"expected a list of {_kind_name(item)}, got {value!r}")
            return fallback
        if isinstance(value, str) and kind is str and not value.strip():
            self.fail(name, "is empty")
            return fallback
        return value

    def positive(self, raw: dict, key: str, default: int, *, where: str) -> int:
        value = self.get(raw, key, int, default, where=where)
        if value < 1:
            self.fail(f"{where}.{key}", f"expected a whole number of at least 1, got {value}")
        return value

    def choice(self, raw: dict, key: str, choices, default: Any = ..., *, where: str) -> str:
        value = self.get(raw, key, str, default, where=where)
        if value is not None and value not in choices:
            self.fail(f"{where}.{key}", f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def features(self, names: list[str], known: list[str], key: str) -> None:
        for name in names:
            if name not in known:
                self.fail(key, f"feature {name!r} is not made by this config; features: {', '.join(known)}")
        if not names:
            self.fail(key, "is empty; name at least one feature")


def _kind_name(kind) -> str:
    names = {str: "a string", int: "a whole number", bool: "true or false", list: "a list", float: "a number",
             dict: "a table"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)
