"""phrasefuse: better image classifiers by adding text to images.

Stages (one folder each): `extract/` embeds images and texts once into embedding
stores, `index/` builds query prototypes and generates phrases, `fuse/` trains
light heads on cached embeddings. `store.py` is the on-disk format every stage
shares; `manifests/` reads and validates tables; `cli.py` is the thin CLI.
"""

__version__ = "0.1.0"
