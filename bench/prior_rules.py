"""Label-prior rules from 2 shots (not a test): the product's rule against the alternatives, in process.

For each seed and shot count (0 = the full train split, 5-fold cross-validation) the image-only
linear head is fitted as `fuse ablate` fits it (bench/fewshot_lab.py's loaders and image_only),
and the label prior is added with the weight each rule gives, scored on the test split:

  product      select.choose_label_prior: held-out (out-of-fold) rows first; when they are
               inconclusive, the prior's temperature fitted on the head's training rows, kept
               unless held-out top-1 drops by more than one standard error
  held-out     the held-out rows alone (the rule before the second look)
  prior alone  the prior's temperature fitted on the training rows, no held-out check
  oracle       the test-best weight (a ceiling, not a rule)

    PYTHONPATH=. .venv/bin/python bench/prior_rules.py --work W --shots 2 5 20 --seeds 8
    PYTHONPATH=. .venv/bin/python bench/prior_rules.py --work W --dataset tin200 --shots 2 5 20
    PYTHONPATH=. .venv/bin/python bench/prior_rules.py --work W --variant half --shots 2 5 20

W is bench/real.py's work folder. Figures: docs/method.md (The few-shot lab).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fewshot_lab as lab_mod  # noqa: E402

from phrasefuse.fuse.labeltext import apply_prior, calibrate_prior_on_shots, choose_prior_weight  # noqa: E402
from phrasefuse.fuse.select import choose_label_prior, cross_validation, fit_and_choose  # noqa: E402

RULES = ("product", "held-out", "prior alone", "oracle")


def fitted_head(lab, k: int, seed: int):
    """(training rows, outcome) of the image-only linear head; k = 0: the whole train split."""
    if k > 0:
        pool, _, _, outcome = lab_mod.image_only(lab, k, seed)
        return pool, outcome
    scheme = cross_validation(lab.train, lab.y, False, 5, seed)
    return lab.train, fit_and_choose("linear", lab.blocks.select([0]), lab.y, lab.task, ["image"], lab.hp, seed,
                                     scheme)


def weights(outcome, pool: np.ndarray, cos: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Each rule's weight for one fitted head (the oracle's is filled in on test)."""
    trial = outcome.held_out()
    held_out = choose_prior_weight(trial.probs, cos[trial.rows], y[trial.rows])[0] if trial else 0.0
    return {"product": choose_label_prior(outcome, cos, y)[0], "held-out": held_out,
            "prior alone": calibrate_prior_on_shots(cos[pool], y[pool]).weight}


def run(lab, variant: str, k: int, seed: int) -> dict[str, float]:
    cos, y = lab.variants[variant].cos, lab.y
    pool, outcome = fitted_head(lab, k, seed)
    p0 = lab_mod.test_probs(lab, outcome.saved)
    yt, ct = y[lab.test], cos[lab.test]
    out = {"image": lab_mod.top1(p0, yt)}
    for rule, w in weights(outcome, pool, cos, y).items():
        out[rule] = lab_mod.top1(apply_prior(p0, ct, w), yt)
    out["oracle"] = max(lab_mod.top1(apply_prior(p0, ct, w), yt) for w in np.r_[0.0, np.geomspace(0.5, 200, 25)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="bench/real.py's work folder.")
    ap.add_argument("--data", type=Path, default=lab_mod.DEFAULT_DATA)
    ap.add_argument("--dataset", choices=["cifar10", "tin200"], default="cifar10")
    ap.add_argument("--variant", default="templates", help="Label texts (bench/fewshot_lab.py's variants).")
    ap.add_argument("--shots", nargs="+", type=int, default=[2, 5, 20], help="0 = the full train split.")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    start = time.perf_counter()
    loader = lab_mod.load_tin200 if args.dataset == "tin200" else lab_mod.load_cifar
    lab = loader(args.work, args.data, [args.variant])
    print(f"{args.dataset}, label texts '{args.variant}', linear head, {args.seeds} seeds; Δ top-1 over image-only "
          f"(mean ± std, lowest seed)")
    for k in args.shots:
        results = [run(lab, args.variant, k, s) for s in range(args.seeds)]
        base = np.array([r["image"] for r in results])
        print(f"\n{k or 'full'} shots: image-only {100 * base.mean():.1f}  ({time.perf_counter() - start:.0f} s)")
        for rule in RULES:
            gain = 100 * (np.array([r[rule] for r in results]) - base)
            print(f"  {rule:<12} Δ {gain.mean():+.2f} ± {gain.std():.2f}  (lowest {gain.min():+.1f})", flush=True)
    print(f"\ncommand: bench/prior_rules.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
