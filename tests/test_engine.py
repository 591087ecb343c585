"""`phrasefuse.engine`: the engine choice and what runs when nothing is pending.
(Both engines on real jobs, store against store: tests/extract/test_ray_engine.py.)"""

from __future__ import annotations

import pyarrow as pa
import pytest

from phrasefuse.engine import Job, LocalEngine, RayEngine, RayOptions, get_engine
from phrasefuse.errors import BadInput


def never(*_args, **_kwargs):
    raise AssertionError("called although nothing is pending")


def job(pending: bool, local=never) -> Job:
    return Job(pending=pending, local=local, actor=object, actor_args={}, read=never, batch_size=4, collect=never)


def test_an_unknown_engine_is_refused_with_the_choices():
    with pytest.raises(BadInput, match=r"--engine spark: expected one of local, ray"):
        get_engine("spark")
    assert isinstance(get_engine("local"), LocalEngine)


def test_the_local_engine_maps_only_pending_rows():
    assert list(LocalEngine().map(job(False))) == []
    batches = [pa.table({"id": ["a"]}), pa.table({"id": ["b", "c"]})]
    assert list(LocalEngine().map(job(True, local=lambda: iter(batches)))) == batches


def test_the_ray_engine_does_not_start_ray_when_nothing_is_pending():
    import ray  # the [ray] extra: installed by make install
    was_running = ray.is_initialized()
    engine = get_engine("ray", RayOptions(actors=1))
    assert isinstance(engine, RayEngine) and engine.options.actors == 1
    assert list(engine.map(job(False))) == []
    assert ray.is_initialized() == was_running


def test_an_unreachable_ray_address_is_refused_before_any_work():
    with pytest.raises(BadInput, match=r"--ray-address 127\.0\.0\.1:9: nothing answers there"):
        get_engine("ray", RayOptions(address="127.0.0.1:9"))
