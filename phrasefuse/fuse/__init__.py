"""Fuse: heads that train in seconds on cached embeddings (DESIGN.md, Pipeline).

A head reads embedding stores (`--feature`), joined on `id` to a manifest's
labels and splits, and never re-embeds anything. Read the modules in this order:

  data.py       stores -> feature blocks (zero vector + missing indicator), labels, block normalisation
  metrics.py    top-1/top-5/macro-F1/per-class accuracy; mAP, micro P/R/F1, recall at 80% precision
  heads.py      the three heads (linear, mlp: torch; lgbm: LightGBM), fit and predict on arrays
  select.py     validation schemes (val split, or cross-validation within few shots), the
                simpler-unless-clearly-better rule, text trust tuning, few-shot sampling
  labeltext.py  label names / descriptions embedded once: alignment targets, label prior, zero-shot
  train.py      `fuse train`: tune trust, image-only baseline beside the fused head, save the better one
  artifact.py   the head folder (safetensors / LightGBM text + meta.json), loading with identity checks
  evaluate.py   `fuse eval`, `predict`
  ablate.py     `fuse ablate`: the feature-subset table, full data or K shots, over seeds
"""

HEAD_KINDS = ("linear", "mlp", "lgbm")
