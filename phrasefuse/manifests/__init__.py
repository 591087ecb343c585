"""Reading and validating user tables: dataset manifests, pairs, label descriptions."""

from phrasefuse.manifests.dataset import Manifest, hash_split, read_manifest
from phrasefuse.manifests.tables import read_table

__all__ = ["Manifest", "hash_split", "read_manifest", "read_table"]
