"""Index: phrases for images that came with no text (docs/formats.md, Index folder).

A prototype is the re-normalised mean embedding of the images a query phrase is
associated with (a pairs table: query, image_id, optional weight); a FAISS index
over the prototypes gives an image its k nearest phrases; the phrases, embedded
with a text model and averaged, become a text feature of that image.

Modules, in pipeline order:
  pairs.py       read and clean a pairs table: phrase normalisation, drop counts
  prototypes.py  prototypes as segment sums (arrays in, arrays out)
  streaming.py   the same prototypes under --memory: pairs coded and spilled by query partition,
                 summed shard by shard over the store (local, or Ray tasks), in passes
  kinds.py       the FAISS index kinds, one class each, registered in KINDS (what --kind offers)
  devices.py     where FAISS runs (--device), the GPU copy of an index
  tuning.py      search, exact search, the search setting tuned for recall@10
  ann.py         FAISS: index kind under a memory budget, training, the build and its report
  folder.py      the index folder on disk (meta.json, phrases.parquet, index.faiss) and `PhraseIndex`
  build.py       `phrasefuse index build`
  lookup.py      `phrasefuse index lookup`
  phrases.py     `phrasefuse phrases`: the batch job writing a phrases embedding store

Nothing heavy is imported here, so the CLI's --help stays instant.
"""

# The method this comes from averages the top-3 phrases of an image.
DEFAULT_PHRASES_K = 3
DEFAULT_LOOKUP_K = 5
# Recall@10 the automatic choice aims for, against exact search.
DEFAULT_TARGET_RECALL = 0.95
