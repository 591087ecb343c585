"""`phrasefuse inspect PATH`: what a store, an index or a head holds.

`--verify` reads every shard; `--quarantine` also moves the bad ones aside (store.py,
`quarantine_bad_files`) so that re-running the job re-embeds just their rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from phrasefuse.errors import BadInput
from phrasefuse.folder_report import Report
from phrasefuse.store import EmbeddingStore, describe_encoder, quarantine_bad_files, verify_store


def describe(path: str | os.PathLike, verify: bool = False, quarantine: bool = False) -> Report:
    path = Path(path)
    if quarantine:
        store = EmbeddingStore(path)
        if not store.exists():
            raise BadInput(f"{path}: --quarantine applies to embedding stores (no store meta.json here)")
        moved = quarantine_bad_files(store)
        report = describe(path, verify=True)  # what is left after the move: should verify clean
        report.quarantined = moved
        return report
    from phrasefuse.fuse.artifact import describe_head, is_head  # a head folder (fuse train)

    from phrasefuse.index.folder import describe_index, is_index  # an index folder (index build)

    for is_kind, describe_kind in ((is_head, describe_head), (is_index, describe_index)):
        if is_kind(path):
            try:
                return describe_kind(path, verify=verify)
            except (KeyError, TypeError, ValueError, AttributeError) as e:  # a hand-edited meta.json
                raise BadInput(f"{path / 'meta.json'}: malformed ({type(e).__name__}: {str(e)[:120]}); restore it "
                               f"or rebuild {path}") from None
    store = EmbeddingStore(path)
    if not store.exists():
        raise BadInput(f"{path}: not a phrasefuse store (no meta.json); pass a folder written by phrasefuse")
    meta = store.meta
    try:
        errors = store.errors()
    except BadInput:  # --verify names it among the problems
        errors = None
    reasons = {}
    for r in ([] if errors is None else errors["reason"].to_pylist()):
        kind = r.split(":")[0].split("(")[0].strip()
        reasons[kind] = reasons.get(kind, 0) + 1
    fields = {
        "modality": meta.get("modality"),
        "encoder": describe_encoder(meta["encoder"]),
        "dim": meta["dim"],
        "dtype": meta["dtype"],
        "normalized": meta.get("normalized"),
        "source": ", ".join(f"{k}={v}" for k, v in meta.get("source", {}).items()),
        "rows": _rows(store),
        "shards": len(store.shard_paths()),
        "errors": "unreadable errors.parquet" if errors is None else errors.num_rows if not reasons else f"{errors.num_rows} ({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))})",
        "created": meta.get("created"),
    }
    report = Report("store", str(path), fields, examples=_phrase_examples(store))
    if verify:
        report.verified = True
        report.problems = verify_store(store)
    return report


# Enough rows to see what the phrases look like; the rest is one `phrasefuse export` away.
EXAMPLES = 3


def _phrase_examples(store: EmbeddingStore, n: int = EXAMPLES) -> list[dict]:
    """A phrases store's first `n` rows: id, phrases and their scores (none for other stores, or when
    the first shard is unreadable: --verify names it)."""
    shards = store.shard_paths()
    if not shards:
        return []
    try:
        names = pq.read_schema(shards[0]).names
        if "phrases" not in names:
            return []
        columns = ["id", "phrases"] + (["scores"] if "scores" in names else [])
        rows = pq.read_table(shards[0], columns=columns).slice(0, n).to_pylist()
    except (OSError, pa.ArrowException, BadInput):  # a damaged shard: inspect still describes the store
        return []
    return [{"id": r["id"], "phrases": r["phrases"] or [], **({"scores": r["scores"]} if "scores" in r else {})}
            for r in rows]


def _rows(store: EmbeddingStore) -> int | str:
    """Rows from the shard footers; unreadable shards are counted apart (--verify names them)."""
    rows, unreadable = 0, 0
    for shard in store.shard_paths():
        try:
            rows += store.shard_rows(shard)
        except BadInput:
            unreadable += 1
    return rows if not unreadable else f"{rows} (+ {unreadable} unreadable shard(s))"
