"""Which stages of `run` re-run when a config option changes (b31): every option of every section,
flipped one at a time, re-runs the stages that read it and only those; an option declared as not
changing a result re-runs nothing. The options are iterated from the dataclasses, so a new option
is covered without touching this file. The planning function is tested directly (no pipeline per
flip); the end-to-end test runs b31 itself: a changed [data] id_col re-extracts, with the new ids."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from phrasefuse.run import config as cfg
from phrasefuse.run.pipeline import STAGE_SECTIONS, plan_settings

# Every section, every option set to a value of its own (none left at a default it could hide behind).
RAW = {
    "work": "work",
    "data": {"manifest": "m.parquet", "label_col": "category", "multilabel": False, "text_columns": ["title"],
             "label_descriptions": "d.parquet", "allow_outside_paths": False, "id_col": "key", "image_col": "jpg"},
    "encoders": {"image": "builtin:efficientnet-lite0", "text": "builtin:all-minilm-l6-v2", "device": "cpu",
                 "batch_size": 8, "workers": 0, "max_image_mb": 20.0, "max_image_megapixels": 50.0,
                 "max_aspect_ratio": 30.0},
    "phrases": {"pairs": "pairs.parquet", "images": "q.parquet", "k": 2, "min_images": 1, "kind": "flat",
                "weights": True},
    "heads": [{"name": "fused", "kind": "linear", "features": ["image", "title", "phrases"], "seed": 1,
               "label_prior": "phrases", "align_descriptions": 0.0, "pseudo_shots": True, "shots": 2},
              {"name": "plain", "kind": "linear", "features": ["image"]}],  # image-only: no baseline added
    "ablation": {"head": "linear", "seeds": 1, "shots": [1], "rows": [["image"]], "shot_rows": [["image"]],
                 "label_prior": "phrases", "pseudo_shots": True},
    "report": {"gallery": 4},
}
# [phrases] reading folders made elsewhere: `index` stands for every key that builds one, `query_store`
# for `images` (the parser refuses them together), so these set the keys RAW's [phrases] cannot.
REUSING = {
    "index": {"index": "other-run/index", "k": 2},
    "query_store": {"pairs": "pairs.parquet", "query_store": "stores/q", "k": 2, "min_images": 1, "kind": "flat",
                    "weights": True},
}
SECTIONS = {"data": cfg.Data, "encoders": cfg.Encoders, "phrases": cfg.Phrases, "ablation": cfg.Ablation,
            "report": cfg.Report}


def base_config(tmp_path: Path, reusing: str | None = None) -> cfg.Config:
    """RAW's config; `reusing` (a key of REUSING): with that [phrases] instead."""
    raw = json.loads(json.dumps(RAW))
    if reusing:
        raw["phrases"] = REUSING[reusing]
    return cfg.parse_config(raw, tmp_path / "run.toml")


def other(value, hint):
    """A value of type `hint` other than `value`."""
    if value is None:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list or isinstance(value, list):
        item = args[0] if args else str
        extra = {str: "other", int: 7}.get(item, ["image"])
        return [*(value or []), extra]
    if hint is bool or isinstance(value, bool):
        return not value
    if hint is int or isinstance(value, int):
        return value + 1 if value is not None else 1
    if hint is float or isinstance(value, float):
        return value + 0.5 if value is not None else 1.5
    if hint is Path or isinstance(value, Path):
        return Path("/elsewhere/other.parquet") if value is None else value.with_name("other-" + value.name)
    if hint is str or isinstance(value, str):
        return "other" if value is None else value + "-other"
    raise AssertionError(f"no flip for {hint} (add one: the test must cover every option)")


def flips(config: cfg.Config):
    """(section, option, config with that one option changed), for every option of every section."""
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        section = getattr(config, name)
        for f in dataclasses.fields(cls):
            changed = dataclasses.replace(section, **{f.name: other(getattr(section, f.name), hints[f.name])})
            yield name, f, dataclasses.replace(config, **{name: changed})
    hints = typing.get_type_hints(cfg.Head)
    for f in dataclasses.fields(cfg.Head):
        head = dataclasses.replace(config.heads[0], **{f.name: other(getattr(config.heads[0], f.name), hints[f.name])})
        yield "head", f, dataclasses.replace(config, heads=[head, *config.heads[1:]])


def kind_of(stage: str) -> str:
    """A stage's kind (config.STAGES) from its name in a run ("extract title", "head fused")."""
    if stage in cfg.STAGES:
        return stage
    return cfg.HEAD_STAGE if stage.startswith("head ") else cfg.EXTRACT_TEXT


def rerun(before: dict[str, str], after: dict[str, str]) -> set[str]:
    """The stages a run would re-run: a new stage, or one whose settings' digest changed."""
    return {stage for stage, digest in after.items() if before.get(stage) != digest}


def declared_readers(section: str, f: dataclasses.Field, flipped: cfg.Config) -> set[str]:
    """The stages of `flipped` that read the option by the declarations (section read, option not unread)."""
    if not f.metadata[cfg.CHANGES_RESULT]:
        return set()
    readers = set()
    for stage in plan_settings(flipped, files=lambda p: "same"):
        kind = kind_of(stage)
        if kind in f.metadata[cfg.UNREAD_BY]:
            continue
        if section == "head":  # a head stage reads its own table; the report reads every head
            if stage == f"head {flipped.heads[0].name}" or kind == cfg.REPORT_STAGE:
                readers.add(stage)
        elif section in STAGE_SECTIONS[kind]:
            readers.add(stage)
    return readers


BASE_STAGES = {"extract image", "extract title", "phrases", "head fused", "head plain", "zeroshot", "ablation",
               "report"}


@pytest.mark.parametrize("reusing, built", [
    (None, {"extract query images", "index"}),  # RAW: the query images extracted, the index built
    ("index", set()),  # an index made elsewhere: neither
    ("query_store", {"index"}),  # a query store made elsewhere: the index built from it
])
def test_every_option_of_every_section_reruns_exactly_its_readers(tmp_path, reusing, built):
    assert set(STAGE_SECTIONS) == set(cfg.STAGES)  # every kind of stage says which sections it reads
    config = base_config(tmp_path, reusing)
    files = lambda p: f"content of {p}"  # noqa: E731 - a changed path is a changed file
    base = plan_settings(config, files=files)
    assert set(base) == BASE_STAGES | built
    seen = set()
    for section, f, flipped in flips(config):
        after = plan_settings(flipped, files=files)
        ran = rerun(base, after)
        new = set(after) - set(base)  # a renamed head, an added text column: a stage that never ran
        assert ran == declared_readers(section, f, flipped) | new, f"{section}.{f.name}"
        if f.metadata[cfg.CHANGES_RESULT]:
            assert ran, f"{section}.{f.name} changes a result but re-runs no stage"
        else:
            assert not ran, f"{section}.{f.name} changes no result but re-runs {sorted(ran)}"
        seen.add(f"{section}.{f.name}")
    assert len(seen) == sum(len(dataclasses.fields(c)) for c in [*SECTIONS.values(), cfg.Head])


@pytest.mark.parametrize("option, must_rerun", [
    # written out, not derived: the declarations cannot hide these stages from their options
    ("data.id_col", {"extract image", "extract title", "phrases", "head fused", "head plain", "zeroshot", "ablation"}),
    ("data.image_col", {"extract image", "head fused", "head plain"}),
    ("data.manifest", {"extract image", "extract title", "head fused", "head plain", "zeroshot", "ablation"}),
    ("data.label_col", {"head fused", "head plain", "zeroshot", "ablation", "report"}),
    ("data.multilabel", {"head fused", "head plain", "zeroshot", "ablation"}),
    ("data.label_descriptions", {"head fused", "head plain", "zeroshot", "ablation"}),
    ("data.allow_outside_paths", {"extract image", "extract query images"}),
    ("encoders.image", {"extract image", "extract query images"}),
    ("encoders.text", {"extract title", "phrases", "head fused", "ablation"}),
    ("encoders.max_image_mb", {"extract image", "extract query images"}),
    ("phrases.pairs", {"index"}),
    ("phrases.images", {"extract query images", "index"}),
    ("phrases.index", {"phrases"}),  # and no index stage, no query images extracted
    ("phrases.query_store", {"index"}),  # and no query images extracted
    ("phrases.k", {"phrases"}),
    ("phrases.kind", {"index"}),
    ("head.seed", {"head fused"}),
    ("head.features", {"head fused"}),
    ("ablation.seeds", {"ablation"}),
    ("report.gallery", {"report"}),
])
def test_options_rerun_the_stages_that_use_them(tmp_path, option, must_rerun):
    config = base_config(tmp_path)
    files = lambda p: f"content of {p}"  # noqa: E731
    flipped = {f"{s}.{f.name}": c for s, f, c in flips(config)}[option]
    ran = rerun(plan_settings(config, files=files), plan_settings(flipped, files=files))
    assert must_rerun <= ran, sorted(must_rerun - ran)
    if option.startswith("head."):
        assert "head plain" not in ran  # a changed head re-trains only that head


@pytest.mark.parametrize("option", ["encoders.device", "encoders.batch_size", "encoders.workers"])
def test_where_and_how_fast_rerun_nothing(tmp_path, option):
    config = base_config(tmp_path)
    flipped = {f"{s}.{f.name}": c for s, f, c in flips(config)}[option]
    assert plan_settings(config, files=str) == plan_settings(flipped, files=str)


def test_a_changed_file_under_the_same_path_reruns_its_readers(tmp_path):
    config = base_config(tmp_path)
    before = plan_settings(config, files=lambda p: "v1")
    after = plan_settings(config, files=lambda p: "v2" if p.name == "pairs.parquet" else "v1")
    assert rerun(before, after) == {"index", "report"}


def test_a_rebuilt_index_made_elsewhere_reruns_the_phrases(tmp_path):
    """[phrases] index: the folder's content is in the settings of the stages that read it."""
    config = base_config(tmp_path, "index")
    before = plan_settings(config, files=lambda p: "v1")
    after = plan_settings(config, files=lambda p: "v2" if p.name == "index" else "v1")
    assert rerun(before, after) == {"phrases", "report"}


def test_every_declared_option_is_a_key_of_the_config_file(tmp_path):
    """The parser accepts exactly the declared options: a key cannot be read without being fingerprinted."""
    for name, cls in [*SECTIONS.items(), ("head", cfg.Head)]:
        raw = RAW["heads"][0] if name == "head" else RAW[name]
        keys = set(raw).union(*REUSING.values()) if name == "phrases" else set(raw)
        assert keys == cfg.option_names(cls), name  # RAW sets every option (the flips start from real values)
    for reusing in REUSING:
        assert base_config(tmp_path, reusing).phrases  # each base parses


def make_b31_data(folder: Path, spec: str) -> None:
    """40 coloured squares whose manifest has two id columns; configs c1 (id) and c2 (id_col = key2)."""
    import numpy as np
    from PIL import Image

    (folder / "img").mkdir()
    lines = ["id,key2,image,label,split"]
    for i in range(40):
        c = i % 2
        a = np.clip(np.array([(30, 30, 200), (200, 30, 30)][c]) + np.random.default_rng(i).normal(0, 20, (32, 32, 3)),
                    0, 255)
        Image.fromarray(a.astype(np.uint8)).save(folder / "img" / f"{i}.png")
        lines.append(f"a{i},b{i},img/{i}.png,{['blue', 'red'][c]},{['train', 'train', 'train', 'val', 'test'][i % 5]}")
    (folder / "m.csv").write_text("\n".join(lines) + "\n")
    base = ('work = "work"\n[data]\nmanifest = "m.csv"\n{}[encoders]\nimage = "' + spec + '"\nworkers = {}\n'
            '[[heads]]\nname = "h"\nkind = "linear"\nfeatures = ["image"]\n')
    (folder / "c1.toml").write_text(base.format("", 0))
    (folder / "c2.toml").write_text(base.format('id_col = "key2"\n', 0))
    (folder / "c3.toml").write_text(base.format('id_col = "key2"\n', 1))  # only `workers` differs from c2


def test_changed_id_col_reextracts_with_the_new_ids_end_to_end(tmp_path, tiny_clip_spec):
    """b31: `run` with [data] id_col changed re-runs extract and the heads; the store and the predictions
    hold the new ids only. Then a changed `workers` (no result changes) skips every stage."""
    import pyarrow.parquet as pq

    from phrasefuse.run.pipeline import StageResult, run_config
    from phrasefuse.store import EmbeddingStore

    make_b31_data(tmp_path, tiny_clip_spec)

    def run(name: str) -> dict[str, str]:
        return {r.stage: r.status for r in run_config(tmp_path / name, progress=False) if isinstance(r, StageResult)}

    assert set(run("c1.toml").values()) == {"ran"}
    second = run("c2.toml")
    assert second["extract image"] == "ran" and second["head h"] == "ran"
    work = tmp_path / "work"
    new_ids = sorted(f"b{i}" for i in range(40))
    assert sorted(EmbeddingStore(work / "stores" / "image").ids_and_keys()["id"].to_pylist()) == new_ids
    assert sorted(pq.read_table(work / "predictions" / "h.parquet")["id"].to_pylist()) == new_ids
    assert set(run("c3.toml").values()) == {"skipped"}


def test_changed_image_encoder_reembeds_every_row(tmp_path, tiny_clip_config):
    """[encoders] image changed: the run's image store (derived data) is re-made by the new encoder,
    not refused ("holds embeddings of ...; write to another --out folder": no --out in a config)."""
    from phrasefuse.run.pipeline import StageResult, run_config
    from phrasefuse.store import EmbeddingStore

    other_config = tmp_path / "other-clip.json"
    other_config.write_text(json.dumps({**json.loads(tiny_clip_config.read_text()), "embed_dim": 16}))
    make_b31_data(tmp_path, f"open_clip:{tiny_clip_config}@")
    list(run_config(tmp_path / "c1.toml", progress=False))
    text = (tmp_path / "c1.toml").read_text().replace(str(tiny_clip_config), str(other_config))
    (tmp_path / "c1.toml").write_text(text)
    second = {r.stage: r for r in run_config(tmp_path / "c1.toml", progress=False) if isinstance(r, StageResult)}
    assert second["extract image"].status == "ran" and second["extract image"].summary["embedded"] == 40
    store = EmbeddingStore(tmp_path / "work" / "stores" / "image")
    assert store.dim == 16 and store.num_rows() == 40
