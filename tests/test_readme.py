"""The README's walk-through runs: every fenced block marked `walkthrough` is executed, in order,
through the CLI on a tiny generated folder, so a README that drifts from the CLI fails the suite.

Blocks: ```bash walkthrough (one `phrasefuse ...` command a line; `#` starts a comment) and
```toml walkthrough NAME (written to the file NAME, for a later `phrasefuse run NAME`). The files
the README tells the user to have (photos/ with one subfolder per class, new_photos/, photos.csv
with captions, queries/ and pairs.csv) are generated here, and the commands run from that folder
with one substitution: the tiny random open_clip model of the fixtures stands in for the built-in
encoders (`--model`, `--text-model`, a config's [encoders]), and images decode in the main process
(`--workers 0`). Commands run in this process (`invoke_cli`: the same parsing, exit status and
errors as the `phrasefuse` executable). Both keep the test within ~30 s; the built-in encoders
have tests of their own.
"""

from __future__ import annotations

import csv
import random
import re
import shlex
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tests.conftest import invoke_cli

if sys.version_info >= (3, 11):
    import tomllib
else:  # the package's own fallback (pyproject: tomli before 3.11)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w+) walkthrough ?(\S*)\n(.*?)^```", re.M | re.S)
COLOURS = {"red": (200, 30, 30), "green": (30, 170, 40), "blue": (30, 40, 200)}
# What the walk-through must show (the "your own folder" sequence): removing a step from
# the README fails here rather than silently shrinking the test.
REQUIRED = {"extract images", "extract texts", "index build", "phrases", "fuse train", "predict", "inspect", "run"}


def walkthrough_blocks(text: str) -> list[tuple[str, str, str]]:
    """(language, file name or '', body) of each walkthrough block, in README order."""
    return [(m.group(1), m.group(2), m.group(3)) for m in FENCE.finditer(text)]


def commands(body: str) -> list[list[str]]:
    """A bash block's commands as argument lists (comments and blank lines dropped)."""
    out = []
    for line in body.splitlines():
        args = shlex.split(line, comments=True)
        if args:
            out.append(args)
    return out


def draw(path: Path, colour: tuple[int, int, int], rng: random.Random) -> None:
    """A small JPEG: a coloured disc (the class) on a random background."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (64, 48), tuple(rng.randrange(256) for _ in range(3)))
    x = rng.randrange(30)
    ImageDraw.Draw(image).ellipse([x, 5, x + 30, 40], fill=colour)
    image.save(path, quality=90)


def make_user_files(root: Path) -> None:
    """The files the README asks the user to have, tiny: 3 classes x 12 photos, 2 new photos,
    a captions table over the same ids, 18 query images and their pairs table."""
    rng = random.Random(0)
    rows = []
    for name, colour in COLOURS.items():
        for i in range(12):
            image_id = f"{name}/{i:03d}.jpg"
            draw(root / "photos" / image_id, colour, rng)
            rows.append({"id": image_id, "image": f"photos/{image_id}", "label": name,
                         "caption": f"a {name} disc" if i % 3 else ""})
        for i in range(6):
            draw(root / "queries" / name / f"q{i}.jpg", colour, rng)
    draw(root / "new_photos" / "a.jpg", COLOURS["red"], rng)
    draw(root / "new_photos" / "b.jpg", COLOURS["blue"], rng)
    with open(root / "photos.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "image", "label", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    with open(root / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["query", "image_id"])
        for name in COLOURS:
            for i in range(6):
                writer.writerow([f"{name} ball", f"{name}/q{i}.jpg"])
                writer.writerow([f"round {name} thing", f"{name}/q{i}.jpg"])


def with_tiny_models(args: list[str], spec: str) -> list[str]:
    """The README's command with the tiny test encoder in place of the built-in defaults."""
    command = args[1:3]
    if command == ["extract", "images"]:
        return [*args, "--model", spec, "--workers", "0"]
    if command == ["extract", "texts"]:
        return [*args, "--model", spec]
    if args[1] == "phrases":
        return [*args, "--text-model", spec]
    return args


def config_with_tiny_models(body: str, spec: str) -> str:
    """A walkthrough config with the tiny test encoder (the README's config names none)."""
    assert "[encoders]" not in body, "the walkthrough config sets [encoders]; update config_with_tiny_models"
    return f'{body}\n[encoders]\nimage = "{spec}"\ntext = "{spec}"\nworkers = 0\n'


def named_outputs(args: list[str], root: Path) -> list[Path]:
    """The paths a command promises to write: each --out, and a run config's report."""
    outs = [root / args[i + 1] for i, a in enumerate(args[:-1]) if a == "--out"]
    if args[1] == "run":
        config = tomllib.loads((root / args[2]).read_text(encoding="utf-8"))
        outs += [root / config["work"] / "report.html", root / config["work"] / "run-state.json"]
    return outs


def test_readme_walkthrough_runs_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  tiny_clip_spec: str) -> None:
    blocks = walkthrough_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no ```bash walkthrough blocks"
    make_user_files(tmp_path)
    monkeypatch.chdir(tmp_path)  # the README's paths are relative to the user's folder
    seen: set[str] = set()
    for language, name, body in blocks:
        if language == "toml":
            assert name, "a toml walkthrough block names its file: ```toml walkthrough my.toml"
            (tmp_path / name).write_text(config_with_tiny_models(body, tiny_clip_spec), encoding="utf-8")
            continue
        assert language == "bash", f"unknown walkthrough block language {language!r}"
        for args in commands(body):
            assert args[0] == "phrasefuse", f"a walkthrough line is not a phrasefuse command: {args}"
            proc = invoke_cli(*with_tiny_models(args, tiny_clip_spec)[1:])
            assert proc.returncode == 0, f"{shlex.join(args)} exited {proc.returncode}:\n{proc.stderr}"
            for out in named_outputs(args, tmp_path):
                assert out.exists(), f"{shlex.join(args)} did not write {out.relative_to(tmp_path)}"
            seen.add(" ".join(args[1:3]) if args[1] in ("extract", "index", "fuse") else args[1])
    assert REQUIRED <= seen, f"the walk-through lost steps: {sorted(REQUIRED - seen)}"


def test_readme_is_a_guide_not_a_notebook() -> None:
    """At most 20 KB, and no path outside the repository in the README, docs or the package."""
    assert README.stat().st_size <= 20_000, f"README.md is {README.stat().st_size} bytes"
    files = [README, *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "phrasefuse").rglob("*.py")),
             *sorted((ROOT / "phrasefuse").rglob("*.toml"))]
    outside = [str(f.relative_to(ROOT)) for f in files if "../shared" in f.read_text(encoding="utf-8")]
    assert not outside, f"paths outside the repository in {outside}"
