"""Reading and validating user tables: dataset manifests, pairs, label descriptions."""

from phrasefuse.manifests.dataset import Manifest, hash_split, read_manifest
from phrasefuse.manifests.sources import Source, image_chunks, source_with
from phrasefuse.manifests.tables import read_table

__all__ = ["Manifest", "Source", "hash_split", "image_chunks", "read_manifest", "read_table", "source_with"]
