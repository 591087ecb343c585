"""phrasefuse: better image classifiers by adding text to images.

Embed every image and text of a dataset once (extract), generate phrases for
images that have none (index, phrases), then train light heads on the cached
embeddings in seconds (fuse).

This module only parses arguments, calls one function and prints. Heavy
libraries are imported inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import click
import typer

from phrasefuse.errors import BadInput
from phrasefuse.extract import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL

app = typer.Typer(help=__doc__.split("\n\nThis module")[0], no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None)
extract_app = typer.Typer(help="Embed every image or text of a manifest once, into an embedding store.",
                          no_args_is_help=True)
app.add_typer(extract_app, name="extract")


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Dtype(str, Enum):
    float32 = "float32"
    float16 = "float16"


SHARD_SIZE_HELP = "Rows per shard; a killed job loses at most the shard it was filling."


@extract_app.command("images")
def extract_images(
    manifest: str = typer.Argument(..., help="Dataset manifest (Parquet, CSV, JSON Lines, or a quoted glob) with 'id' and 'image'."),
    out: Path = typer.Option(..., "--out", help="Embedding store folder (created, or resumed)."),
    model: str = typer.Option(DEFAULT_IMAGE_MODEL, "--model", help="Encoder spec: open_clip:ARCH@PRETRAINED, timm:ARCH@WEIGHTS, or the built-in default."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per model call."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decoding processes (default: min(cores, 4); 0 decodes in the main process)."),
    device: Device = typer.Option(Device.auto, "--device", help="auto picks CUDA when visible."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N rows of the manifest."),
    shard_size: int = typer.Option(10_000, "--shard-size", help=SHARD_SIZE_HELP),
    dtype: Dtype = typer.Option(Dtype.float32, "--dtype", help="Stored float type."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON document."),
) -> None:
    """Embed the images of MANIFEST into the store --out.

    Already-embedded ids are skipped and identical image bytes are embedded once,
    so re-running (after a crash, or with a larger manifest) only does what is missing.
    Unreadable images go to STORE/errors.parquet; the job goes on.
    """
    from phrasefuse.extract.jobs import extract_images as run

    summary = run(manifest, out, model=model, batch_size=batch_size, workers=workers, device=device.value,
                  limit=limit, shard_size=shard_size, dtype=dtype.value)
    _print(summary.as_dict() if as_json else summary.line(), as_json)


@extract_app.command("texts")
def extract_texts(
    manifest: str = typer.Argument(..., help="Dataset manifest with 'id' and the text column."),
    col: str = typer.Option(..., "--col", help="Text column (title, description, tags...; lists are joined)."),
    out: Path = typer.Option(..., "--out", help="Embedding store folder (created, or resumed)."),
    model: str = typer.Option(DEFAULT_TEXT_MODEL, "--model", help="Encoder spec: sentence-transformers:NAME_OR_PATH, open_clip:ARCH@PRETRAINED, or the built-in default."),
    batch_size: int = typer.Option(256, "--batch-size", help="Texts per model call."),
    device: Device = typer.Option(Device.auto, "--device"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N rows of the manifest."),
    shard_size: int = typer.Option(10_000, "--shard-size", help=SHARD_SIZE_HELP),
    dtype: Dtype = typer.Option(Dtype.float32, "--dtype", help="Stored float type."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON document."),
) -> None:
    """Embed the text column --col of MANIFEST into the store --out.

    Each distinct text is embedded once. Missing and empty texts are recorded in
    STORE/errors.parquet (heads treat those ids as having no text).
    """
    from phrasefuse.extract.jobs import extract_texts as run

    summary = run(manifest, col, out, model=model, batch_size=batch_size, device=device.value, limit=limit,
                  shard_size=shard_size, dtype=dtype.value)
    _print(summary.as_dict() if as_json else summary.line(), as_json)


@app.command("inspect")
def inspect(
    path: Path = typer.Argument(..., help="An embedding store (or, later, an index or a head)."),
    verify: bool = typer.Option(False, "--verify", help="Read every shard and check schema, NaN/zero vectors and duplicate ids."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Show what PATH holds: its meta, row count and error count."""
    from phrasefuse.inspect import describe

    report = describe(path, verify=verify)
    _print(report.as_dict() if as_json else report.text(), as_json)
    if report.problems:
        raise BadInput(f"{path}: {len(report.problems)} problem(s) found, first: {report.problems[0]}")


@app.command("demo")
def demo(
    work: Path = typer.Option(Path("work/demo"), "--work", help="Folder for the generated dataset and the stores."),
    n: int = typer.Option(200, "--n", help="Images to generate."),
) -> None:
    """Generate a small labelled dataset and run the pipeline on it with the built-in offline encoders."""
    from phrasefuse.demo import run_demo

    for line in run_demo(work, n=n):
        typer.echo(line)


def _print(obj, as_json: bool) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str) if as_json else obj)


def _terminate(signum, frame):  # SIGTERM stops like Ctrl-C: finished shards are kept
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Console entry point: exit 0 done, 2 bad usage or input (one line on stderr), 1 anything else."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app(args=argv, prog_name="phrasefuse", standalone_mode=False)
    except BadInput as e:
        print(f"phrasefuse: error: {e}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Abort:
        print("phrasefuse: interrupted; finished shards are kept, re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("phrasefuse: interrupted; finished shards are kept, re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - one line, not a traceback, unless asked for
        if os.environ.get("PHRASEFUSE_DEBUG"):
            raise
        print(f"phrasefuse: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              f"(set PHRASEFUSE_DEBUG=1 for a traceback)", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
