"""The index kinds are a registry: a kind registered at runtime is built, tuned, saved and
searched like the built-in ones, with no other file knowing its name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from phrasefuse.errors import BadInput
from phrasefuse.index.build import build_index
from phrasefuse.index.folder import PhraseIndex
from phrasefuse.index.kinds import KINDS, Flat, IvfFlat, register
from tests.index.conftest import read_meta

ROOT = Path(__file__).resolve().parents[2]


class ExactCopy(Flat):
    """Exact inner-product search under another name."""

    name = "exact-copy"
    automatic = False


class IvfFlatCopy(IvfFlat):
    name = "ivf-flat-copy"
    automatic = False


@pytest.fixture
def registered():
    added = [register(ExactCopy()), register(IvfFlatCopy())]
    yield added
    for kind in added:
        KINDS.pop(kind.name, None)


def test_the_cli_offers_the_registry():
    from phrasefuse.cli import IndexKind
    from phrasefuse.index.ann import plan_index

    assert [k.value for k in IndexKind] == ["auto", *KINDS]
    assert all(kind.name == name for name, kind in KINDS.items())
    with pytest.raises(ValueError):
        register(Flat())  # a name already taken
    with pytest.raises(BadInput, match="expected auto or one of flat, hnsw, ivf-sq8, ivf-flat, ivf-pq"):
        plan_index(100, 8, 2**30, "exact-copy")  # not registered outside the fixture


def test_a_kind_registered_at_runtime_builds_and_searches(registered, random_pairs, random_store, random_vectors,
                                                           tmp_path):
    built = {}
    for name in ("flat", "exact-copy", "ivf-flat", "ivf-flat-copy"):
        build_index(random_pairs, random_store, tmp_path / name, kind=name, progress=False, device="cpu")
        built[name] = PhraseIndex(tmp_path / name, device="cpu")
    meta = {name: read_meta(tmp_path / name)["index"] for name in built}
    assert meta["exact-copy"]["kind"] == "exact-copy" and meta["exact-copy"]["factory"] == "Flat"
    assert meta["exact-copy"]["recall_at_10"] == 1.0 and meta["exact-copy"]["search_param"] is None
    assert meta["ivf-flat-copy"]["factory"] == meta["ivf-flat"]["factory"]
    assert meta["ivf-flat-copy"]["search_value"] == meta["ivf-flat"]["search_value"]  # tuned the same way
    assert meta["ivf-flat-copy"]["recall_at_10"] == meta["ivf-flat"]["recall_at_10"] >= 0.9

    queries = random_vectors[:50]
    for copy, original in (("exact-copy", "flat"), ("ivf-flat-copy", "ivf-flat")):
        scores, rows = built[copy].search(queries, 5)
        want_scores, want_rows = built[original].search(queries, 5)
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_allclose(scores, want_scores, atol=1e-6)

    # Opened where its kind is not registered: one line, not a KeyError.
    del KINDS["ivf-flat-copy"]
    with pytest.raises(BadInput, match="index kind 'ivf-flat-copy' is not registered here"):
        PhraseIndex(tmp_path / "ivf-flat-copy", device="cpu").search(queries, 5)


def test_a_config_accepts_a_registered_kind(registered, tmp_path):
    from phrasefuse.run.config import load_config

    example = (ROOT / "manifests" / "example.toml").read_text(encoding="utf-8")
    for kind in ("exact-copy", "no-such-kind"):
        path = tmp_path / f"{kind}.toml"
        path.write_text(example.replace('kind = "auto"', f'kind = "{kind}"', 1), encoding="utf-8")
        if kind == "no-such-kind":
            with pytest.raises(BadInput, match="phrases.kind"):
                load_config(path)
        else:
            assert load_config(path).phrases.kind == kind
