"""phrasefuse: better image classifiers by adding text to images.

Stages (one folder each): `extract/` embeds images and texts once into embedding
stores, `index/` builds query prototypes and generates phrases, `fuse/` trains
light heads on cached embeddings; `run/` runs a whole config and `report/` writes its
page. `store.py` is the embedding store every stage shares, `folders.py` the atomic
writes and folder swaps every output uses; `engine.py` runs a batch
job's mapper locally or on Ray; `manifests/` reads and validates tables; `cli.py` is
the thin CLI. The layers and their order: docs/architecture.md, Layers (tests/test_layers.py).
"""

__version__ = "0.1.0"
