"""The CLI contract's exit statuses and one-line errors (docs/formats.md, CLI contract)."""

import pytest

from tests.conftest import invoke_cli, run_cli


@pytest.mark.parametrize("args,expected", [
    (["extract", "images"], "Missing argument"),
    (["extract", "images", "m.csv", "--out", "s", "--device", "gpu"], "--device"),
    (["no-such-command"], "No such command"),
])
def test_usage_errors_are_one_line_and_exit_2(args, expected):
    proc = run_cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and lines[0].startswith("phrasefuse: error:")
    assert proc.stdout == ""


def test_help_lists_the_contract_commands():
    proc = run_cli("--help", check=True)
    for command in ("extract", "index", "phrases", "inspect"):
        assert command in proc.stdout


def test_help_lists_the_commands_in_pipeline_order():
    proc = invoke_cli("--help", check=True)
    # each command's line starts with its name (a long help line wraps onto deeper-indented lines)
    names = [line.split()[0] for line in proc.stdout.split("Commands:", 1)[1].splitlines()
             if line.startswith("  ") and not line.startswith("   ")]
    assert names[:8] == ["extract", "index", "phrases", "fuse", "predict", "inspect", "run", "demo"], names


# Every command of the contract (docs/formats.md, CLI contract) and the options it promises (and the
# README documents). Not there yet, so not listed: `phrasefuse --version`, `--id-col`/`--image-col`
# on the manifest-reading commands, `predict HEAD INPUT...`.
CONTRACT = {
    ("extract", "images"): ["--out", "--model", "--batch-size", "--workers", "--device", "--limit", "--engine",
                            "--json"],
    ("extract", "texts"): ["--col", "--out", "--model", "--engine", "--json"],
    ("index", "build"): ["--pairs", "--images", "--out", "--target-recall", "--seed"],
    ("index", "lookup"): ["-k", "--json"],
    ("phrases",): ["--index", "--images", "--out", "-k", "--text-model", "--engine"],
    ("fuse", "train"): ["--manifest", "--feature", "--head", "--out", "--label-col", "--seed", "--multilabel",
                        "--threshold", "--tune-rows"],
    ("fuse", "eval"): ["--manifest", "--split", "--json"],
    ("fuse", "ablate"): ["--manifest", "--feature", "--head", "--shots", "--json", "--with-full", "--row"],
    ("fuse", "zeroshot"): ["--manifest", "--phrases", "--label-descriptions", "--json"],
    ("predict",): ["--manifest", "--out", "--top-k", "--json"],
    ("inspect",): ["--verify"],
    ("export",): ["--format", "--out", "--json"],
    ("import",): ["--out", "--like", "--encoder-family", "--modality", "--dtype"],
    ("run",): ["--json"],
    ("demo",): ["--work", "--n"],
}


@pytest.mark.parametrize("command", list(CONTRACT), ids=" ".join)
def test_every_contract_command_documents_its_options(command):
    from typer.testing import CliRunner

    from phrasefuse.cli import app

    # In-process (cheap): the same Typer app the console script runs; wide, so no option is cut.
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "250", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    assert f"{' '.join(command)} [OPTIONS]" in " ".join(result.output.split()), result.output[:300]
    missing = [option for option in CONTRACT[command] if f"{option} " not in result.output
               and f"{option}," not in result.output]
    assert not missing, f"{' '.join(command)} --help does not document {missing}:\n{result.output}"



@pytest.mark.parametrize("command", list(CONTRACT), ids=" ".join)
def test_usage_lines_show_arguments_as_the_readme_writes_them(command):
    """`run CONFIG`, `index lookup INDEX IMAGE...`: no Typer type marks ({config}, <list[Path]>) in usage."""
    from click.testing import CliRunner

    from phrasefuse.cli import _command

    result = CliRunner().invoke(_command(), [*command, "--help"], prog_name="phrasefuse",
                                env={"COLUMNS": "250", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    usage = next(line for line in result.output.splitlines() if line.startswith("Usage:"))
    assert not any(mark in usage for mark in "{}<>"), usage
    assert "later" not in result.output, result.output  # no stale promise ("or, later, an index or a head")
