"""[data] takes any MANIFEST source and the column mapping (issue 14)."""

from __future__ import annotations

from phrasefuse.manifests import Source, read_manifest
from phrasefuse.run.config import load_config
from phrasefuse.run.pipeline import check_inputs, files_fingerprint
from tests import inputs_data as data


def test_data_keys_map_columns_and_fingerprint_a_folder(tmp_path):
    path = data.bytes_parquet(tmp_path / "b.parquet", n=4)
    config = tmp_path / "c.toml"
    config.write_text('[data]\nmanifest = "b.parquet"\nid_col = "key"\nimage_col = "jpg"\nlabel_col = "cls"\n'
                      '[encoders]\nimage = "builtin:efficientnet-lite0"\n[[heads]]\nname = "h"\nkind = "linear"\n'
                      'features = ["image"]\n')
    c = load_config(config)
    assert isinstance(c.data.source, Source) and (c.data.source.id_col, c.data.source.image_col) == ("key", "jpg")
    assert read_manifest(c.data.source).ids.to_pylist() == ["p0", "p1", "p2", "p3"]
    check_inputs(c)
    assert files_fingerprint(path) != files_fingerprint(tmp_path / "missing.parquet")

    folder = data.image_folder(tmp_path / "imgs", splits=None, per_class=2)
    before = files_fingerprint(folder)
    (folder / "cat" / "9.jpg").write_bytes(data.jpeg(9))
    assert files_fingerprint(folder) != before  # a new image re-runs the extract stage


def test_brace_range_of_shards_is_an_existing_input(tmp_path):
    shards = data.tar_shards(tmp_path / "s", shards=2, per_shard=2)
    config = tmp_path / "c.toml"
    config.write_text(f'[data]\nmanifest = "s/{{00000..00001}}.tar"\n[[heads]]\nname = "h"\nkind = "linear"\n'
                      f'features = ["image"]\n')
    c = load_config(config)
    check_inputs(c)
    assert files_fingerprint(c.data.manifest) != files_fingerprint(shards / "00000.tar")
