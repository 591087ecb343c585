"""`phrasefuse inspect PATH`: what a store (or, later, an index or a head) holds."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from phrasefuse.errors import BadInput
from phrasefuse.store import EmbeddingStore, describe_encoder, verify_store


@dataclass
class Report:
    kind: str
    path: str
    fields: dict
    problems: list[str] = field(default_factory=list)
    verified: bool = False

    def as_dict(self) -> dict:
        return {"kind": self.kind, "path": self.path, **self.fields,
                **({"verified": True, "problems": self.problems} if self.verified else {})}

    def text(self) -> str:
        width = max(len(k) for k in self.fields)
        lines = [f"{self.kind}: {self.path}"] + [f"  {k.ljust(width)}  {v}" for k, v in self.fields.items()]
        if self.verified:
            lines.append(f"  {'verify'.ljust(width)}  " + ("ok" if not self.problems else f"{len(self.problems)} problem(s)"))
            lines += [f"    - {p}" for p in self.problems]
        return "\n".join(lines)


def describe(path: str | os.PathLike, verify: bool = False) -> Report:
    path = Path(path)
    from phrasefuse.fuse.artifact import describe_head, is_head  # a head folder (fuse train)

    if is_head(path):
        return describe_head(path, verify=verify)
    from phrasefuse.index.folder import describe_index, is_index  # an index folder (index build)

    if is_index(path):
        return describe_index(path, verify=verify)
    store = EmbeddingStore(path)
    if not store.exists():
        raise BadInput(f"{path}: not a phrasefuse store (no meta.json); pass a folder written by phrasefuse")
    meta = store.meta
    errors = store.errors()
    reasons = {}
    for r in errors["reason"].to_pylist():
        kind = r.split(":")[0].split("(")[0].strip()
        reasons[kind] = reasons.get(kind, 0) + 1
    fields = {
        "modality": meta.get("modality"),
        "encoder": describe_encoder(meta["encoder"]),
        "dim": meta["dim"],
        "dtype": meta["dtype"],
        "normalized": meta.get("normalized"),
        "source": ", ".join(f"{k}={v}" for k, v in meta.get("source", {}).items()),
        "rows": store.num_rows(),
        "shards": len(store.shard_paths()),
        "errors": errors.num_rows if not reasons else f"{errors.num_rows} ({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))})",
        "created": meta.get("created"),
    }
    report = Report("store", str(path), fields)
    if verify:
        report.verified = True
        report.problems = verify_store(store)
    return report
