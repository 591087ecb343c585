"""The fault-injection hook itself (phrasefuse/faultpoints.py): parsing, counting, actions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from phrasefuse.faultpoints import parse

REACH = ("import sys; from phrasefuse.faultpoints import fault_point\n"
         "for i in range(1, 6):\n"
         "    print(i, flush=True); fault_point('p')\n")


def run_points(spec: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", REACH], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PHRASEFUSE_FAULT": spec})


def test_parse_names_counts_and_actions():
    assert parse("") == {}
    assert parse("shard-renamed@3:kill, rows-buffered:pause") == {"shard-renamed": (3, "kill"),
                                                                  "rows-buffered": (1, "pause")}
    assert parse("meta.json-tmp-written@12:term") == {"meta.json-tmp-written": (12, "term")}


@pytest.mark.parametrize("spec", ["p", "p:explode", "p@x:kill", "p@0:kill", "@2:kill", ":kill"])
def test_a_malformed_spec_is_refused(spec):
    with pytest.raises(ValueError, match="PHRASEFUSE_FAULT"):
        parse(spec)


def test_acts_at_the_nth_time_and_not_before():
    proc = run_points("p@3:kill")
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout.split() == ["1", "2", "3"]  # killed at the 3rd point, before printing 4


def test_other_points_and_unset_do_nothing():
    for spec in ("", "q@1:kill", "p@9:kill"):
        proc = run_points(spec)
        assert proc.returncode == 0 and proc.stdout.split() == ["1", "2", "3", "4", "5"], spec


def test_term_runs_the_handler_at_the_point():
    proc = run_points("p@2:term")
    assert proc.returncode == -signal.SIGTERM and proc.stdout.split() == ["1", "2"]
