"""Feature blocks and labels: embedding stores joined to a manifest on `id`.

A *feature* is one embedding store. Its *block* for a list of ids is an (n, dim)
float32 array, with a zero row and `present=False` for an id the store lacks
(34% of Flickr descriptions are missing: a head trained with text must still
predict for images without it). Heads see each block as `dim` normalised
coordinates plus one "missing" indicator column.

The *image feature* is the first store whose meta says modality "image"; every
other feature (text, phrases, a second image store) is one whose trust is tuned.
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
from phrasefuse.manifests import Manifest, read_manifest
from phrasefuse.manifests.dataset import LABELS_SEPARATOR
from phrasefuse.store import EmbeddingStore, encoder_identity

SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------- features


@dataclass(frozen=True)
class Feature:
    """One embedding store used as a head input."""

    name: str
    store: EmbeddingStore

    @property
    def path(self) -> Path:
        return self.store.path

    @property
    def modality(self) -> str:
        return str(self.store.meta.get("modality"))

    @property
    def dim(self) -> int:
        return self.store.dim

    @property
    def identity(self) -> dict:
        return encoder_identity(self.store.meta["encoder"])

    def has_column(self, name: str) -> bool:
        shards = self.store.shard_paths()
        if not shards:
            return False
        import pyarrow.parquet as pq

        return name in pq.read_schema(shards[0]).names


def parse_feature_arg(arg: str | os.PathLike) -> tuple[str | None, Path]:
    """'PATH' or 'NAME=PATH' (NAME without '/'), as --feature takes them."""
    text = str(arg)
    name, sep, path = text.partition("=")
    if sep and name and path and "/" not in name and not Path(text).exists():
        return name, Path(path)
    return None, Path(text)


def resolve_features(args: Sequence[str | os.PathLike]) -> list[Feature]:
    """Open the stores named by --feature; refuses non-stores and the same store twice."""
    if not args:
        raise BadInput("no --feature given; pass at least one embedding store (e.g. --feature stores/img)")
    features: list[Feature] = []
    for arg in args:
        name, path = parse_feature_arg(arg)
        store = EmbeddingStore(path)
        if not path.is_dir():
            raise BadInput(f"--feature {arg}: no such folder; pass an embedding store made by 'phrasefuse extract' "
                           f"or 'phrasefuse phrases'")
        store.meta  # BadInput when it is not a store
        if any(f.path.resolve() == path.resolve() for f in features):
            raise BadInput(f"--feature {arg}: the same store is given twice; pass each store once")
        base = name or path.resolve().name
        unique, k = base, 2
        while any(f.name == unique for f in features):
            unique, k = f"{base}-{k}", k + 1
        features.append(Feature(unique, EmbeddingStore(path.resolve())))
    return features


def image_feature(features: Sequence[Feature]) -> int | None:
    """Index of the image feature (the first image store), or None when all are text."""
    return next((i for i, f in enumerate(features) if f.modality == "image"), None)


@dataclass
class Blocks:
    """Raw rows of each feature for a list of ids (zero rows where absent)."""

    arrays: list[np.ndarray]  # one (n, dim) float32 array per feature
    present: np.ndarray  # (n, n_features) bool

    def __len__(self) -> int:
        return len(self.present)

    def take(self, rows: np.ndarray) -> "Blocks":
        return Blocks([a[rows] for a in self.arrays], self.present[rows])

    def select(self, which: Sequence[int]) -> "Blocks":
        return Blocks([self.arrays[j] for j in which], self.present[:, list(which)])


def load_blocks(features: Sequence[Feature], ids: pa.Array, source: str, require_overlap: bool = True) -> Blocks:
    """Look every id up in every store (Arrow hash join, no row loop)."""
    arrays, present = [], []
    for f in features:
        emb, found = f.store.lookup(ids)
        if require_overlap and len(ids) and not found.any() and f.store.num_rows() == 0:
            raise BadInput(f"{f.path}: feature '{f.name}' has no vectors at all (e.g. a text column with no text "
                           f"in any row: see its errors.parquet); drop this feature or fill the column")
        if require_overlap and len(ids) and not found.any():
            raise BadInput(f"{f.path}: none of its {f.store.num_rows()} ids is among the {len(ids)} rows of "
                           f"{source}; pass a store extracted from this manifest")
        arrays.append(np.ascontiguousarray(emb, dtype=np.float32))
        present.append(found)
    n = len(ids)
    return Blocks(arrays, np.stack(present, axis=1) if present else np.zeros((n, 0), bool))


# Every block is scaled to this root-mean-square row norm: blocks weigh the same before
# any trust scale, and coordinates are of order 1 (a unit-norm 1,280-dim block has
# coordinates of ~0.03, which makes Adam take thousands of steps to grow the weights).
BLOCK_NORM = 16.0


@dataclass
class BlockNorm:
    """Per-block centring and one scalar per block (root-mean-square row norm BLOCK_NORM on
    the training rows), so that concatenated blocks weigh the same before any trust scale."""

    mean: list[np.ndarray]
    rms: np.ndarray

    @classmethod
    def fit(cls, blocks: Blocks) -> "BlockNorm":
        means, rms = [], []
        for j, x in enumerate(blocks.arrays):
            rows = x[blocks.present[:, j]]
            mean = rows.mean(axis=0) if len(rows) else np.zeros(x.shape[1], np.float32)
            spread = float(np.sqrt(np.mean(np.sum((rows - mean) ** 2, axis=1)))) if len(rows) else 1.0
            means.append(mean.astype(np.float32))
            rms.append(spread if spread > 1e-8 else 1.0)
        return cls(means, np.asarray(rms, np.float32))

    def select(self, which: Sequence[int]) -> "BlockNorm":
        return BlockNorm([self.mean[j] for j in which], self.rms[list(which)])

    def apply(self, blocks: Blocks, scales: Sequence[float] | None = None) -> np.ndarray:
        """(n, sum(dim + 1)) float32: per block, scale * normalised coordinates (0 when
        missing), then scale * the missing indicator."""
        scales = [1.0] * len(blocks.arrays) if scales is None else list(scales)
        n = len(blocks)
        out = np.empty((n, sum(a.shape[1] + 1 for a in blocks.arrays)), np.float32)
        offset = 0
        for j, x in enumerate(blocks.arrays):
            d, s, have = x.shape[1], float(scales[j]), blocks.present[:, j]
            part = out[:, offset:offset + d]
            np.subtract(x, self.mean[j], out=part)
            part *= s * BLOCK_NORM / self.rms[j]
            part[~have] = 0.0
            out[:, offset + d] = np.where(have, 0.0, s)
            offset += d + 1
        return out

    def tensors(self, prefix: str = "norm") -> dict[str, np.ndarray]:
        out = {f"{prefix}.rms": self.rms}
        out.update({f"{prefix}.mean.{j}": m for j, m in enumerate(self.mean)})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], n_blocks: int, prefix: str = "norm") -> "BlockNorm":
        return cls([tensors[f"{prefix}.mean.{j}"] for j in range(n_blocks)], tensors[f"{prefix}.rms"])


# ---------------------------------------------------------------- labels


@dataclass
class Task:
    """What a head predicts: the label vocabulary, one label per row or several."""

    vocab: list[str]
    multilabel: bool

    @property
    def num_classes(self) -> int:
        return len(self.vocab)




@dataclass
class Labels:
    """Encoded labels of some rows against a vocabulary.

    multi-class: y (n,) int64, -1 for a label outside the vocabulary;
    multi-label: y (n, C) float32 0/1, `unknown` counts each row's labels outside it.
    """

    vocab: list[str]
    multilabel: bool
    y: np.ndarray
    unknown: np.ndarray

    def take(self, rows: np.ndarray) -> "Labels":
        return Labels(self.vocab, self.multilabel, self.y[rows], self.unknown[rows])

    @property
    def num_classes(self) -> int:
        return len(self.vocab)


def label_column(manifest: Manifest, label_col: str | None) -> str:
    """The label column: --label-col, else 'label', else 'labels'."""
    if label_col:
        manifest.column(label_col)  # BadInput naming the columns when absent
        return label_col
    for name in ("label", "labels"):
        if name in manifest.table.column_names:
            return name
    cols = ", ".join(c for c in manifest.table.column_names if not c.startswith("_"))
    if getattr(manifest, "labels_note", None):  # a folder whose class layout a stray image broke: name it
        raise BadInput(f"{manifest.source}: {manifest.labels_note}")
    raise BadInput(f"{manifest.source}: no 'label' or 'labels' column (columns: {cols}); add labels or pass "
                   f"--label-col")


def is_multilabel(manifest: Manifest, label_col: str, multilabel: bool) -> bool:
    t = manifest.column(label_col).type
    return multilabel or pa.types.is_list(t) or pa.types.is_large_list(t)


def label_values(manifest: Manifest, label_col: str, multilabel: bool, rows: np.ndarray) -> pa.Array:
    """The label column as strings (multi-class) or list<string> (multi-label), validated on `rows`
    (a bool mask): a multi-class row needs a non-empty label."""
    col = manifest.column(label_col).combine_chunks()
    listy = pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
    if multilabel:
        if not listy:
            text = pc.cast(col, pa.string())
            col = pc.split_pattern(pc.utf8_trim_whitespace(text), LABELS_SEPARATOR)
        col = pc.cast(col, pa.list_(pa.string())).fill_null(pa.scalar([], pa.list_(pa.string())))
        return col
    if listy:
        raise BadInput(f"{manifest.source}: column '{label_col}' holds lists; pass --multilabel for a multi-label head")
    try:
        col = pc.utf8_trim_whitespace(pc.cast(col, pa.string()))
    except pa.ArrowException:
        raise BadInput(f"{manifest.source}: column '{label_col}' has type {col.type}; expected one label string "
                       f"per row") from None
    empty = pc.fill_null(pc.equal(pc.utf8_length(col), 0), True).to_numpy(zero_copy_only=False) & rows
    if empty.any():
        i = int(np.argmax(empty))
        raise BadInput(f"{manifest.where(i)}: column '{label_col}' is empty; give every row a label "
                       f"(or drop the row)")
    return col


def build_vocab(values: pa.Array, rows: np.ndarray, multilabel: bool) -> list[str]:
    """Sorted distinct labels of the rows (the training rows: a head predicts only what it saw)."""
    picked = values.filter(pa.array(rows))
    if multilabel:
        picked = pc.list_flatten(picked)
    return sorted(str(v) for v in pc.unique(picked.drop_null()).to_pylist() if str(v).strip())


def encode_labels(values: pa.Array, vocab: Sequence[str], multilabel: bool) -> Labels:
    vocab_arr = pa.array(list(vocab), pa.string())
    n = len(values)
    if not multilabel:
        codes = pc.index_in(values, value_set=vocab_arr).fill_null(-1).to_numpy(zero_copy_only=False)
        return Labels(list(vocab), False, codes.astype(np.int64), (codes < 0).astype(np.int64))
    flat = pc.list_flatten(values)
    parent = pc.list_parent_indices(values).to_numpy(zero_copy_only=False)
    codes = pc.index_in(pc.utf8_trim_whitespace(flat), value_set=vocab_arr).fill_null(-1).to_numpy(
        zero_copy_only=False)
    y = np.zeros((n, len(vocab)), np.float32)
    known = codes >= 0
    y[parent[known], codes[known]] = 1.0
    unknown = np.bincount(parent[~known], minlength=n).astype(np.int64) if n else np.zeros(0, np.int64)
    return Labels(list(vocab), True, y, unknown)


def rank_within_group(groups: np.ndarray) -> np.ndarray:
    """0, 1, 2... for the successive occurrences of each value (in order of appearance)."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_groups) != 0) + 1]
    first = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    rank = np.empty(len(groups), np.int64)
    rank[order] = np.arange(len(order)) - first
    return rank


def split_rows(manifest: Manifest) -> dict[str, np.ndarray]:
    """Row indices of each split."""
    split = manifest.table["split"].combine_chunks().to_numpy(zero_copy_only=False)
    return {s: np.flatnonzero(split == s) for s in SPLITS}


def require_rows(rows: dict[str, np.ndarray], names: Sequence[str], source: str) -> None:
    for name in names:
        if len(rows[name]) == 0:
            raise BadInput(f"{source}: the '{name}' split has no rows (column 'split'); assign some rows to "
                           f"'{name}', or drop the column for a hash split")


# ---------------------------------------------------------------- a manifest with its stores


@dataclass
class Prepared:
    """A manifest joined with its feature stores: every row, every split."""

    manifest: Manifest
    features: list[Feature]
    roles: list[str]  # "image" for the image feature, "text" for the others
    blocks: Blocks
    labels: Labels
    rows: dict[str, np.ndarray]
    label_col: str

    @property
    def task(self) -> Task:
        return Task(self.labels.vocab, self.labels.multilabel)


def prepare(manifest_path: str | os.PathLike, feature_args: Sequence[str], label_col: str | None = None,
            multilabel: bool = False, need: Sequence[str] = ("train", "val")) -> Prepared:
    """The manifest read, its labels encoded against the train split's vocabulary, its feature
    stores loaded as blocks; exit 2 when a split in `need` is empty or a store covers no train row."""
    manifest = read_manifest(manifest_path)
    col = label_column(manifest, label_col)
    multi = is_multilabel(manifest, col, multilabel)
    rows = split_rows(manifest)
    require_rows(rows, need, manifest.source)
    values = label_values(manifest, col, multi, np.ones(len(manifest), bool))
    train = np.zeros(len(manifest), bool)
    train[rows["train"]] = True
    vocab = build_vocab(values, train, multi)
    if len(vocab) < (1 if multi else 2):
        raise BadInput(f"{manifest.source}: the train split has {len(vocab)} distinct value(s) in column '{col}'; "
                       f"a classifier needs at least two labels")
    labels = encode_labels(values, vocab, multi)
    check_scoring_memory(rows, labels.num_classes, manifest.source)
    features = resolve_features(feature_args)
    blocks = load_blocks(features, manifest.ids, manifest.source)
    for j, f in enumerate(features):
        if not blocks.present[rows["train"], j].any():
            raise BadInput(f"{f.path}: covers none of the {len(rows['train'])} train rows of {manifest.source}; "
                           f"extract it for this manifest")
    img = image_feature(features)
    roles = ["image" if j == img else "text" for j in range(len(features))]
    return Prepared(manifest, features, roles, blocks, labels, rows, col)


# Choosing and scoring a head holds (rows, labels) float32 probabilities of a whole split a few
# times over (image-only and fused candidates, the label prior, the saved head's): with many labels
# that, not the head, is what memory follows (50,000 rows x 50,000 labels: 10 GB a matrix).
SCORING_COPIES = 3


def available_memory() -> int | None:
    """Bytes the system can give this process now (Linux MemAvailable); None: unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_scoring_memory(rows: dict[str, np.ndarray], num_classes: int, source: object,
                         available: int | None = None) -> None:
    """Refuse (exit 2, before any training) a manifest whose split probabilities would not fit in
    memory, rather than be killed by the system hours later. `available`: bytes (default: now)."""
    largest = max(len(r) for r in rows.values())
    need = SCORING_COPIES * largest * num_classes * 4
    available = available_memory() if available is None else available
    if available is None or need <= available:
        return
    raise BadInput(f"{source}: scoring a split of {largest:,} rows over {num_classes:,} labels needs about "
                   f"{need / 2**30:.1f} GB ({SCORING_COPIES} float32 matrices of rows x labels), more than the "
                   f"{available / 2**30:.1f} GB available; use fewer labels or smaller splits (e.g. a split "
                   f"column), or a machine with more memory")


MIN_VAL_ROWS_PER_LABEL = 5  # below this, a validation choice rests on a handful of rows: said out loud


def _labels_of(labels: Labels, rows: np.ndarray) -> np.ndarray:
    """Rows per label among `rows` (multi-class: the known labels; multi-label: positives)."""
    y = labels.y[rows]
    if labels.multilabel:
        return (y > 0.5).sum(axis=0).astype(np.int64)
    return np.bincount(y[y >= 0], minlength=labels.num_classes)


def _examples(vocab: Sequence[str], counts: np.ndarray, which: np.ndarray) -> str:
    shown = ", ".join(f"'{vocab[c]}': {int(counts[c])}" for c in np.flatnonzero(which)[:3])
    return shown + (", ..." if which.sum() > 3 else "")


def data_warnings(labels: Labels, rows: dict[str, np.ndarray], splits: Sequence[str] = ("val", "test"),
                  check_val: bool = True) -> list[str]:
    """One line per statistical caveat of the splits: labels unseen in train (counted as
    errors), and a val split with fewer than MIN_VAL_ROWS_PER_LABEL rows of some label."""
    out = []
    for split in splits:
        n_unknown = int((labels.unknown[rows[split]] > 0).sum()) if len(rows[split]) else 0
        if n_unknown:
            out.append(f"{n_unknown} of {len(rows[split])} {split} rows carry a label the train split lacks; the "
                       f"head cannot predict it, so those rows count as errors")
    out += absent_labels_warnings(labels, rows, [s for s in splits if s != "val" or check_val])
    if check_val and len(rows["val"]):
        counts = _labels_of(labels, rows["val"])
        few = counts < MIN_VAL_ROWS_PER_LABEL
        if few.any():
            out.append(f"the val split has fewer than {MIN_VAL_ROWS_PER_LABEL} rows of {int(few.sum())} of "
                       f"{labels.num_classes} labels ({_examples(labels.vocab, counts, few)}): choices made on it "
                       f"(text trust, label prior weight, early stopping) rest on few rows")
    return out


def absent_labels_warnings(labels: Labels, rows: dict[str, np.ndarray], splits: Sequence[str]) -> list[str]:
    """One line per split (with rows) that lacks some label of the train split, naming every such label:
    its test score then says nothing about them (a hash split left one of 8 classes out, unannounced)."""
    out = []
    trained = _labels_of(labels, rows["train"]) > 0
    for split in splits:
        if len(rows[split]) == 0:
            continue
        absent = trained & (_labels_of(labels, rows[split]) == 0)
        if absent.any():
            names = ", ".join(f"'{labels.vocab[c]}'" for c in np.flatnonzero(absent))
            out.append(f"the {split} split has no rows of {int(absent.sum())} of {labels.num_classes} labels "
                       f"({names}): its scores say nothing about them (a label needs 3 rows for a hash split to "
                       f"give it val and test rows)")
    return out


def shots_warning(labels: Labels, train_rows: np.ndarray, k: int) -> str | None:
    """A line when some label has fewer than K train rows (--shots K then gives fewer)."""
    counts = _labels_of(labels, train_rows)
    short = counts < k
    if not short.any():
        return None
    return (f"--shots {k}: {int(short.sum())} of {labels.num_classes} labels have fewer than {k} train rows "
            f"({_examples(labels.vocab, counts, short)}); they get all they have, and the table reports the real "
            f"mean shots per label")
