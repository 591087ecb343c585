"""The demo's pipeline config exists twice: in the package (phrasefuse/run/demo.toml, what
`phrasefuse demo` runs, shipped in the wheel) and beside the example manifests (manifests/demo.toml,
for readers of the repository). The package's is the source; this keeps the copy equal to it."""

from __future__ import annotations

from pathlib import Path

import phrasefuse

ROOT = Path(phrasefuse.__file__).parent.parent


def test_the_repository_copy_of_demo_toml_is_the_packaged_one():
    packaged = (ROOT / "phrasefuse" / "run" / "demo.toml").read_text(encoding="utf-8")
    copy = (ROOT / "manifests" / "demo.toml").read_text(encoding="utf-8")
    assert copy == packaged, "manifests/demo.toml differs from phrasefuse/run/demo.toml: copy the packaged one over it"
