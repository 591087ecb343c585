"""Fuse: heads that train in seconds on cached embeddings (docs/architecture.md).

A head reads embedding stores (`--feature`), joined on `id` to a manifest's
labels and splits, and never re-embeds anything. Read the modules in this order:

  data.py       stores -> feature blocks (zero vector + missing indicator), labels, block normalisation;
                `prepare`: a manifest joined with its stores; the splits' statistical caveats
  metrics.py    top-1/top-5/macro-F1/per-class accuracy; mAP, micro P/R/F1, recall at 80% precision;
                `evaluate_probs` (a head's probabilities against labels), per-label thresholds
  heads/        the three heads, registered classes in HEADS (linear, mlp: torch; lgbm: LightGBM),
                fit and predict on arrays
  labeltext.py  label names / descriptions embedded once: alignment targets, label prior (its scores
                and its weight), zero-shot
  pseudo.py     pseudo-shots: a phrase index's prototypes as extra labelled image rows
  select.py     validation schemes (val split, or cross-validation within few shots), the
                simpler-unless-clearly-better rule, text trust tuning, few-shot sampling,
                `fit_and_choose` (image-only or fused, with or without pseudo-shots)
  train.py      `fuse train`: the command (fit_and_choose, label prior, thresholds, metrics, save)
  artifact.py   the head folder (safetensors / LightGBM text + meta.json), loading with identity checks
  evaluate.py   `fuse eval`, `predict`
  ablate.py     `fuse ablate`: the feature-subset table, full data or K shots, over seeds
"""

# The head kinds, as heads.HEADS registers them (tests/fuse/test_heads.py checks the two agree):
# spelled out here so that the CLI's choices and the config checks import neither numpy nor torch.
HEAD_KINDS = ("linear", "mlp", "lgbm")

# Words of an ablation row (`fuse ablate --row`, the config's [ablation] rows) that name no feature.
LABEL_PRIOR = "label-prior"  # add the label prior of the --label-prior feature
PSEUDO_SHOTS = "pseudo-shots"  # offer the --pseudo-shots index's pseudo-labelled prototypes
