"""`Report`: what `phrasefuse inspect` prints about a folder (a store, an index, a head).

Its own module, below the folders that describe themselves with it (`index.folder`,
`fuse.artifact`) and below `inspect`, which picks the folder's kind: so none of them
imports another to share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from phrasefuse.errors import printable


@dataclass
class Report:
    kind: str
    path: str
    fields: dict
    problems: list[str] = field(default_factory=list)
    verified: bool = False
    quarantined: list[dict] = field(default_factory=list)  # files moved to STORE/quarantine/ now
    examples: list[dict] = field(default_factory=list)  # a phrases store: a few rows' {id, phrases, scores}

    def as_dict(self) -> dict:
        return {"kind": self.kind, "path": self.path, **self.fields,
                **({"verified": True, "problems": self.problems} if self.verified else {}),
                **({"quarantined": self.quarantined} if self.quarantined else {}),
                **({"examples": self.examples} if self.examples else {})}

    def text(self) -> str:
        # paths, feature names and labels are user text: one line each, whatever they hold
        width = max(len(k) for k in self.fields)
        lines = [f"{self.kind}: {printable(self.path)}"] + [f"  {printable(k).ljust(width)}  {printable(v)}"
                                                            for k, v in self.fields.items()]
        if self.examples:
            lines.append(f"  {'examples'.ljust(width)}  the first {len(self.examples)} images' phrases (cosine score)")
        for e in self.examples:
            scores = e.get("scores") or [None] * len(e["phrases"])
            said = ", ".join(printable(ph) + (f" ({s:.2f})" if s is not None else "") for ph, s in zip(e["phrases"], scores))
            lines.append(f"    {printable(e['id'])}: {said or '(none)'}")
        if self.verified:
            lines.append(f"  {'verify'.ljust(width)}  " + ("ok" if not self.problems else f"{len(self.problems)} problem(s)"))
            lines += [f"    - {printable(p)}" for p in self.problems]
        for q in self.quarantined:
            rows = f"{q['rows']} rows" if q["rows"] is not None else "rows unknown"
            lines.append(f"  quarantined {q['file']} ({rows}) -> {q['moved_to']}: {'; '.join(q['problems'])}")
        if self.quarantined:
            lines.append("  re-run the command that wrote this store to redo the quarantined rows")
        return "\n".join(lines)
