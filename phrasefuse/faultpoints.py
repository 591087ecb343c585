"""Fault points: a test hook, not a user-facing feature.

The write paths call `fault_point(NAME)` at the exact steps of the store's write contract, so
a test can stop the real CLI at a provably known point instead of racing the clock. Nothing
happens unless the environment variable ``PHRASEFUSE_FAULT`` names that point::

    PHRASEFUSE_FAULT="shard-renamed@3:kill"          # the 3rd time this process reaches it: SIGKILL self
    PHRASEFUSE_FAULT="rows-buffered@6:pause"         # stop there until a signal arrives
    PHRASEFUSE_FAULT="shard-tmp-written@2:kill,meta.json-renamed:term"   # several, comma-separated

``NAME[@N]:ACTION``: N (default 1) counts the times this process reached NAME. Actions:

- ``kill``: SIGKILL self (a crash: nothing runs after it)
- ``int``, ``term``: SIGINT / SIGTERM self (delivered before `fault_point` returns, so the
  handler runs at this point; Python raises from the handler synchronously)
- ``fail``: raise RuntimeError (an unexpected failure at this point: exit 1)
- ``pause``: write the point's name to the file named by ``PHRASEFUSE_FAULT_MARK`` (if set;
  whole, through a rename), then sleep until a signal handler raises (the CLI's Ctrl-C and
  SIGTERM handlers do) or the process is killed, so a test can deliver Ctrl-C or SIGTERM from
  outside while the process is known to be at this point.

The points (see the callers):

- ``write_atomic``: ``KIND-tmp-written`` (temporary file written, not fsync'ed),
  ``KIND-synced`` (fsync'ed, not renamed), ``KIND-renamed`` (in place); KIND is ``shard`` for
  ``part-NNNNN.parquet`` and the file name otherwise (``meta.json``, ``errors.parquet``,
  ``index.faiss``, ``weights.safetensors``...)
- folder outputs (``atomic_folder``): ``folder-built`` (temporary folder complete),
  ``folder-old-moved`` (between the two renames of a swap: the old folder moved aside, the new
  one not yet in place), ``folder-renamed`` (the new folder in place)
- ``StoreWriter``: ``shard-written`` (after each shard and its errors update), ``rows-buffered``
  (after each `add`, once full shards are written: the buffer holds what did not fill one),
  ``shard-revised`` (after each shard `revise` rewrote: changed rows dropped, before they are embedded again)

The variable is parsed once, at import: unset, a call is one global lookup and a return.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "PHRASEFUSE_FAULT"
MARK_ENV = "PHRASEFUSE_FAULT_MARK"
ACTIONS = {"kill": signal.SIGKILL, "int": signal.SIGINT, "term": signal.SIGTERM, "pause": None, "fail": None}


def parse(spec: str) -> dict[str, tuple[int, str]]:
    """``"a@3:kill,b:pause"`` -> {"a": (3, "kill"), "b": (1, "pause")}. A malformed spec is a
    ValueError: a test that asks for a fault it does not get must not pass quietly."""
    plan: dict[str, tuple[int, str]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, action = item.rpartition(":")
        name, _, nth = point.partition("@")
        if not name or action not in ACTIONS or (nth and not nth.isdigit()) or nth == "0":
            raise ValueError(f"{ENV}={spec!r}: expected NAME[@N]:{'|'.join(ACTIONS)} (N >= 1), comma-separated")
        plan[name] = (int(nth or 1), action)
    return plan


_PLAN = parse(os.environ.get(ENV, ""))
_reached: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Act if ``PHRASEFUSE_FAULT`` names this point and this is the asked-for time; else nothing."""
    if not _PLAN or name not in _PLAN:
        return
    nth, action = _PLAN[name]
    _reached[name] = count = _reached.get(name, 0) + 1
    if count != nth:
        return
    if action == "pause":
        _pause(name)
    elif action == "fail":
        raise RuntimeError(f"fault point {name} (test fault {ENV})")
    else:
        signal.raise_signal(ACTIONS[action])


def _pause(name: str) -> None:
    mark = os.environ.get(MARK_ENV)
    if mark:
        tmp = Path(f"{mark}.tmp-{os.getpid()}")
        tmp.write_text(f"{name} {os.getpid()}\n", encoding="utf-8")
        os.replace(tmp, mark)  # the test sees the mark whole
    # Not signal.pause(): a signal landing between the mark and the pause() call would be missed
    # for good. A sleep is cut short by a signal (the handler runs at once) and a signal that came
    # just before it is handled when it ends: never missed, never a race with the test.
    while True:
        time.sleep(0.05)
