"""Few-shot lab (not a test): label-prior and pseudo-shot rules, in process, on cached real stores.

Reads the stores `bench/real.py` caches (c10-img, c10-phrases, tin-index in --work) with
phrasefuse's own readers and fits heads with phrasefuse's own functions (fit_and_choose, Tuner,
calibrate_prior, apply_prior), so a figure here is what the product would give. Every arm is
scored on the target's test split against the image-only head of the same seed and shots.

Label-text variants (a weak prior simulated on a strong dataset, for the safety check):
  names       the label names as the product embeds them
  templates   names split into words (underscores, camelCase) in 4 templates, embeddings averaged
              (labeltext.label_texts(..., prompts=True))
  shuffled    names assigned to the wrong classes (a derangement): prior and pseudo-shots confidently wrong
  half        half the classes' names swapped among themselves
  garbled     names clipped to 3 capitals and a number (`AIR_0x`): odd names as some datasets have
  noise       random label vectors (the prior and the pseudo-shots are noise)

    PYTHONPATH=. .venv/bin/python bench/fewshot_lab.py --work W --seeds 5 --shots 1 2 5
    PYTHONPATH=. .venv/bin/python bench/fewshot_lab.py --work W --dataset tin200 --fast --seeds 5 --shots 1

`--dataset tin200`: the 200-class check, built in memory from W/tin-img and the Tiny ImageNet pairs
(load_tin200). `--fast`: the label-prior arms only. Figures: docs/method.md (The few-shot lab).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phrasefuse.extract import DEFAULT_TEXT_MODEL
from phrasefuse.fuse.data import Blocks, prepare
from phrasefuse.fuse.heads import Task, head_params
from phrasefuse.fuse.labeltext import apply_prior, calibrate_prior, cosine_scores, embed_texts, label_texts
from phrasefuse.fuse.pseudo import PseudoShots, read_prototypes, match_labels, with_pseudo_rows
from phrasefuse.fuse.select import Scheme, Tuner, cross_validation, fit_and_choose, sample_shots
from phrasefuse.fuse.select import choose_label_prior as prior_weight
from phrasefuse.store import encoder_identity, l2_normalize

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "realdev"
@dataclass
class Variant:
    name: str
    label_emb: np.ndarray  # (C, d) unit
    cos: np.ndarray  # (n, C) every manifest row's prior score
    pseudo: PseudoShots


@dataclass
class Lab:
    name: str
    blocks: Blocks  # image, phrases
    task: Task
    y: np.ndarray
    train: np.ndarray
    test: np.ndarray
    variants: dict[str, Variant]
    hp: dict


def embed(texts: list[str]) -> np.ndarray:
    return l2_normalize(embed_texts(texts, DEFAULT_TEXT_MODEL)[0])


def make_variants(vocab: list[str], text: np.ndarray, present: np.ndarray, phrase_emb: np.ndarray,
                  vectors: np.ndarray, phrases: list[str], identity: dict, which: list[str]) -> dict[str, Variant]:
    names_emb = embed(list(vocab))
    rng = np.random.default_rng(12345)
    C = len(vocab)
    derange = np.argsort(rng.random(C))
    while C > 1 and (derange == np.arange(C)).any():
        derange = np.argsort(rng.random(C))
    half = np.arange(C)
    swap = rng.permutation(C)[: C // 2]
    half[swap] = np.roll(swap, 1)
    makers = {
        "names": lambda: names_emb,
        "templates": lambda: embed_texts(label_texts(vocab, None, prompts=True), DEFAULT_TEXT_MODEL)[0],
        "shuffled": lambda: names_emb[derange],
        "half": lambda: names_emb[half],
        # odd, clipped names (as `Faces_easy`, `BACKGROUND_Google` are for their images)
        "garbled": lambda: embed([f"{str(v)[:3].upper()}_{i}x" for i, v in enumerate(vocab)]),
        "noise": lambda: l2_normalize(rng.standard_normal(names_emb.shape)).astype(np.float32),
    }
    variants = {}
    for name in which:
        emb = makers[name]().astype(np.float32)
        labels, margins = match_labels(phrase_emb, emb)
        pseudo = PseudoShots("index", vectors, labels, margins, phrases, identity)
        variants[name] = Variant(name, emb, cosine_scores(text, present, emb), pseudo)
    return variants


def load_cifar(work: Path, data: Path, which: list[str]) -> Lab:
    """CIFAR-10 (realdev) with the Tiny ImageNet index, from bench/real.py's cached stores."""
    from phrasefuse.index.folder import PhraseIndex

    prep = prepare(data / "cifar10" / "manifest.parquet",
                   [f"image={work / 'c10-img'}", f"phrases={work / 'c10-phrases'}"], need=("train", "test"))
    index = PhraseIndex(work / "tin-index")
    phrases = [str(p) for p in index.phrases.to_pylist()]
    vectors = l2_normalize(read_prototypes(index)).astype(np.float32)
    phrase_emb, identity = embed_texts(phrases, DEFAULT_TEXT_MODEL)
    if encoder_identity(identity) != encoder_identity(prep.features[1].store.meta["encoder"]):
        raise SystemExit("c10-phrases was not embedded with the built-in text model")
    variants = make_variants(prep.task.vocab, prep.blocks.arrays[1], prep.blocks.present[:, 1], phrase_emb, vectors,
                             phrases, identity, which)
    return Lab("cifar10", prep.blocks, prep.task, prep.labels.y, prep.rows["train"], prep.rows["test"], variants,
               head_params("linear"))


def load_tin200(work: Path, data: Path, which: list[str], k_phrases: int = 3) -> Lab:
    """The 200-class check, built in memory: Tiny ImageNet split in two halves by id hash; one half
    the target (label = each class's first WordNet name; 60% train / 40% test), the other the query
    corpus with only the *other* synonyms as queries (prototypes = the mean of their images); each
    target image's phrase feature is the mean text embedding of its top-3 prototypes' phrases, as
    `phrasefuse phrases` makes it."""
    import zlib

    import pyarrow.parquet as pq

    from phrasefuse.fuse.data import Blocks, prepare
    from phrasefuse.index.prototypes import prototypes
    from phrasefuse.store import EmbeddingStore

    ids = pq.read_table(data / "tinyimagenet" / "manifest.parquet")["id"].to_pylist()
    emb, found = EmbeddingStore(work / "tin-img").lookup(ids)
    ids = [i for i, f in zip(ids, found) if f]
    emb = l2_normalize(np.ascontiguousarray(emb[found], np.float32))
    pairs = pq.read_table(data / "tinyimagenet" / "pairs.parquet").to_pylist()
    wnid = np.array([i[4:].rsplit("_", 1)[0] for i in ids])
    first: dict[str, str] = {}
    row_of = {i: r for r, i in enumerate(ids)}
    for p in pairs:
        r = row_of.get(p["image_id"])
        if r is not None:
            first.setdefault(wnid[r], p["query"])
    target = np.array([zlib.crc32(i.encode()) % 2 == 0 for i in ids])
    query_pairs = [(p["query"], row_of[p["image_id"]]) for p in pairs if p["image_id"] in row_of
                   and not target[row_of[p["image_id"]]] and p["query"] != first[wnid[row_of[p["image_id"]]]]]
    phrases = sorted({q for q, _ in query_pairs})
    seg = np.array([phrases.index(q) for q, _ in query_pairs])
    rows = np.array([r for _, r in query_pairs])
    vectors, ok = prototypes(seg, rows, emb, len(phrases))
    phrases = [p for p, o in zip(phrases, ok) if o]
    vectors = vectors[ok].astype(np.float32)
    phrase_emb, identity = embed_texts(phrases, DEFAULT_TEXT_MODEL)
    t_rows = np.flatnonzero(target)
    x = emb[t_rows]
    top = np.argsort(-(x @ vectors.T), axis=1)[:, :k_phrases]
    text = l2_normalize(phrase_emb[top].mean(1)).astype(np.float32)
    classes = sorted(set(wnid[t_rows]))
    vocab = [first[c] for c in classes]
    y = np.searchsorted(np.array(classes), wnid[t_rows])
    rng = np.random.default_rng(7)
    is_test = rng.random(len(y)) < 0.4
    blocks = Blocks([x, text], np.ones((len(y), 2), bool))
    variants = make_variants(vocab, text, np.ones(len(y), bool), phrase_emb, vectors, phrases, identity, which)
    print(f"tin200: {len(classes)} classes, {len(y)} target rows, {len(phrases)} query phrases", flush=True)
    return Lab("tin200", blocks, Task(vocab, False), y.astype(np.int64), np.flatnonzero(~is_test),
               np.flatnonzero(is_test), variants, head_params("linear"))


def top1(probs: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=1) == y))


def zero_shot(lab: Lab) -> dict[str, float]:
    return {n: top1(v.cos[lab.test], lab.y[lab.test]) for n, v in lab.variants.items()}


# ---------------------------------------------------------------- arms


def image_only(lab: Lab, k: int, seed: int):
    """The product's image-only head for K shots (CV within the shots; 1 shot: default steps)."""
    pool = sample_shots(lab.train, lab.y, False, k, seed)
    scheme = cross_validation(pool, lab.y, False, k, seed)
    blocks = lab.blocks.select([0])
    outcome = fit_and_choose("linear", blocks, lab.y, lab.task, ["image"], lab.hp, seed, scheme)
    return pool, scheme, blocks, outcome


def test_probs(lab: Lab, head) -> np.ndarray:
    return head.predict(lab.blocks.take(lab.test).select([0]))


def loo_with_pseudo(lab: Lab, blocks, pool: np.ndarray, pseudo: PseudoShots, per_label: int, seed: int):
    """Leave one real shot out, its class still represented by its pseudo-shots: the held-out
    probabilities of the image + pseudo-shot head, and that head refitted on every shot + pseudo-shot."""
    taken = pseudo.taken(per_label)
    ext_blocks, ext_y, extra = with_pseudo_rows(blocks, lab.y, 0, pseudo, taken)
    folds = [(np.r_[np.delete(pool, i), extra], pool[i:i + 1]) for i in range(len(pool))]
    scheme = Scheme("leave one shot out, pseudo-shots kept", folds, np.r_[pool, extra], False)
    tuner = Tuner("linear", ext_blocks, ext_y, lab.task, ["image"], lab.hp, seed, scheme)
    trial = tuner.trial({0: 1.0})
    return trial, tuner.final({0: 1.0})


def fit_prior_temperature(cos: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(b, 2 dlogL against uniform) of softmax(b * cos) on rows the prior never trained on."""
    grid = np.r_[0.0, np.geomspace(0.1, 1000.0, 41)]
    rows = np.arange(len(y))
    ll = []
    for b in grid:
        z = b * cos.astype(np.float64)
        z -= z.max(1, keepdims=True)
        ll.append(float((z[rows, y] - np.log(np.exp(z).sum(1))).sum()))
    i = int(np.argmax(ll))
    return float(grid[i]), float(2 * (ll[i] - ll[0]))


def temperature_lower_bound(cos: np.ndarray, y: np.ndarray) -> float:
    """The smallest b whose likelihood is within the chi-square(1) 95% level of the best."""
    grid = np.r_[0.0, np.geomspace(0.1, 1000.0, 81)]
    rows = np.arange(len(y))
    ll = []
    for b in grid:
        z = b * cos.astype(np.float64)
        z -= z.max(1, keepdims=True)
        ll.append(float((z[rows, y] - np.log(np.exp(z).sum(1))).sum()))
    ll = np.array(ll)
    return float(grid[np.flatnonzero(2 * (ll.max() - ll) <= 3.841)[0]])


def permutation_critical(cos: np.ndarray, y: np.ndarray, n: int = 19, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    return max([3.841] + [fit_prior_temperature(cos, y[rng.permutation(len(y))])[1] for _ in range(n)])


def fit_sharpness(log_p: np.ndarray, y: np.ndarray) -> float:
    grid = np.geomspace(0.02, 5.0, 41)
    rows = np.arange(len(y))
    best, arg = -np.inf, 1.0
    for a in grid:
        z = a * log_p
        z = z - z.max(1, keepdims=True)
        ll = float((z[rows, y] - np.log(np.exp(z).sum(1))).sum())
        if ll > best:
            best, arg = ll, float(a)
    return arg


def log_of(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(p.astype(np.float64), 1e-12, None))


# ---------------------------------------------------------------- one seed


def run_seed(lab: Lab, variant: Variant, k: int, seed: int, per_label: int, fast: bool = False) -> dict[str, float]:
    y, cos = lab.y, variant.cos
    yt, cos_t = y[lab.test], cos[lab.test]
    pool, scheme, blocks, outcome = image_only(lab, k, seed)
    p0 = test_probs(lab, outcome.saved)
    out = {"image": top1(p0, yt), "fixed10": top1(apply_prior(p0, cos_t, 10.0), yt)}
    # the prior's own temperature on the shots (it never trained on them) and a permutation gate
    b, lr_b = fit_prior_temperature(cos[pool], y[pool])
    crit_b = permutation_critical(cos[pool], y[pool], seed=seed)
    out["prior_b"], out["prior_lr_pass"] = b, float(lr_b > crit_b)
    # pseudo-shots + leave-one-shot-out (any k: one shot of each class out at a time is k=1's case)
    out["rule:prior-gate w=b"] = top1(apply_prior(p0, cos_t, b), yt) if lr_b > crit_b else out["image"]
    if k == 1:  # the product's rule (labeltext.calibrate_prior with no held-out head: fitted on the shots)
        fit = calibrate_prior(None, cos[pool], y[pool])
        out["product: prior fitted on the shots"] = top1(apply_prior(p0, cos_t, fit.weight), yt)
        out["product_w"] = fit.weight
        b_low = temperature_lower_bound(cos[pool], y[pool]) if fit.weight > 0 else 0.0
        out["rule: gate, w = 95% lower bound of b"] = top1(apply_prior(p0, cos_t, b_low), yt)
        out["low_w"] = b_low
        grid = np.r_[0.0, np.geomspace(0.5, 200, 25)]
        oracle = [top1(apply_prior(p0, cos_t, w), yt) for w in grid]
        out["oracle_w"], out["oracle(test-chosen w)"] = float(grid[int(np.argmax(oracle))]), max(oracle)
        out["test_a"] = fit_sharpness(log_of(p0), yt)  # the 1-shot head's sharpness on test: < 1 = overconfident
    if k == 1 and fast:
        return out
    if k == 1:
        out.update(one_shot_arms(lab, variant, blocks, pool, outcome, p0, b, lr_b > crit_b, seed, per_label))
    else:
        w, _ = prior_weight(outcome, cos, y)
        out["current"] = top1(apply_prior(p0, cos_t, w), yt)
        out["current_w"] = w
        trial = outcome.tuner.trial(outcome.saved_config)
        lp = log_of(trial.probs)
        a = fit_sharpness(lp, y[trial.rows])
        # calibrated product with the prior's temperature fixed from the shots: weight b / a on log p
        out["nb(a oof, b shots)"] = top1(apply_prior(p0, cos_t, b / a), yt)
        fit_nb = _nb_gate(lp, cos[trial.rows], y[trial.rows], b)
        out["rule:nb-gate"] = top1(apply_prior(p0, cos_t, b / fit_nb), yt) if fit_nb > 0 else out["image"]
        out["oof_a"] = a
        out["rule:current-gate w=b/a_oof"] = out["nb(a oof, b shots)"] if w > 0 else out["image"]
        out["rule:prior-gate w=b/a_oof"] = out["nb(a oof, b shots)"] if lr_b > crit_b else out["image"]
        if fast:
            return out
        # product pseudo-shots rule + current prior rule on top
        ps = fit_and_choose("linear", blocks, y, lab.task, ["image"], lab.hp, seed, scheme,
                            pseudo=variant.pseudo)
        pps = test_probs(lab, ps.saved)
        wps, _ = prior_weight(ps, cos, y)
        out["pseudo(rule)"] = top1(pps, yt)
        out["pseudo(rule)+current"] = top1(apply_prior(pps, cos_t, wps), yt)
        out["pseudo_kept"] = float(ps.pseudo["per_label"] > 0)
    return out


def centroid_scores(pseudo: PseudoShots, per_label: int, x: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, C) cosine of image rows `x` to each label's mean pseudo-shot (0 for a label without one):
    a zero-shot classifier that never saw a labelled row."""
    taken = pseudo.taken(per_label)
    sums = np.zeros((n_classes, pseudo.vectors.shape[1]))
    np.add.at(sums, pseudo.labels[taken], pseudo.vectors[taken])
    return (l2_normalize(x) @ l2_normalize(sums.astype(np.float32)).T).astype(np.float64)


def one_shot_arms(lab: Lab, variant: Variant, blocks, pool, outcome, p0, b, prior_pass, seed, per_label) -> dict:
    y, cos = lab.y, variant.cos
    yt, cos_t = y[lab.test], cos[lab.test]
    out = {}
    x_shots = blocks.arrays[0][pool]
    C = lab.task.num_classes
    # pseudo-shot centroids as a zero-shot classifier, scored on the shots (honest: never trained on them)
    cen = centroid_scores(variant.pseudo, per_label, x_shots, C)
    t, lr_t = fit_prior_temperature(cen, y[pool])
    crit_t = permutation_critical(cen, y[pool], seed=seed)
    out["centroid_shots_top1"] = float(np.mean(np.argmax(cen, 1) == y[pool]))
    out["centroid_pass"] = float(lr_t > crit_t)
    trial, head_ps = loo_with_pseudo(lab, blocks, pool, variant.pseudo, per_label, seed)
    pps = test_probs(lab, head_ps)
    out["loo_top1"] = float(np.mean(trial.scores))
    out["pseudo(ungated)"] = top1(pps, yt)
    out["rule:centroid-gate"] = out["pseudo(ungated)"] if lr_t > crit_t else top1(p0, yt)
    fit = calibrate_prior(trial.probs, cos[trial.rows], y[trial.rows])
    out["loo_w"], out["loo_pass"] = fit.fitted, float(fit.weight > 0)
    out["pseudo+prior(loo w, ungated)"] = top1(apply_prior(pps, cos_t, fit.fitted), yt)
    # per-class gate: a label keeps its pseudo-shots when its real shot's nearest centroid is its own
    own = np.argmax(cen, 1) == y[pool]
    keep_labels = set(y[pool][own].tolist())
    sub = PseudoShots(variant.pseudo.index, variant.pseudo.vectors, variant.pseudo.labels,
                      np.where(np.isin(variant.pseudo.labels, list(keep_labels)), variant.pseudo.margins, -np.inf),
                      variant.pseudo.phrases, variant.pseudo.text_encoder)
    taken = sub.taken(per_label)
    taken = taken[np.isfinite(sub.margins[taken])]
    if len(taken):
        ext_blocks, ext_y, extra = with_pseudo_rows(blocks, y, 0, variant.pseudo, taken)
        scheme = Scheme("none", [], np.r_[pool, extra], False)
        head = Tuner("linear", ext_blocks, ext_y, lab.task, ["image"], lab.hp, seed, scheme).final({0: 1.0})
        out["rule:per-class-gate"] = top1(test_probs(lab, head), yt)
    else:
        out["rule:per-class-gate"] = top1(p0, yt)
    out["per_class_kept"] = len(keep_labels) / C
    # the prior: head sharpness on pseudo-shot rows (noisy labels, held out from the 1-shot head)
    taken8 = variant.pseudo.taken(8)
    pp = outcome.saved.predict(type(blocks)([variant.pseudo.vectors[taken8]], np.ones((len(taken8), 1), bool)))
    a = fit_sharpness(log_of(pp), variant.pseudo.labels[taken8])
    out["head_a"] = a
    out["nb(a pseudo, b shots) ungated"] = top1(a * log_of(p0) + b * cos_t, yt)
    out["rule:prior-gate nb"] = out["nb(a pseudo, b shots) ungated"] if prior_pass else top1(p0, yt)
    both = lr_t > crit_t
    # head sharpness from agreement with the (shot-calibrated) prior on unlabelled rows
    unlabelled = np.setdiff1d(lab.train, pool)
    unlabelled = np.random.default_rng(seed).permutation(unlabelled)[:3000]
    pu = outcome.saved.predict(lab.blocks.take(unlabelled).select([0]))
    a_agree, acc_h = agreement_sharpness(pu, cos[unlabelled], b)
    out["agree_a"], out["agree_acc_head"] = a_agree, acc_h
    w_agree = b / a_agree if prior_pass else 0.0
    out["agree_w"] = w_agree
    out["rule:prior-gate w=b/a_agree"] = top1(apply_prior(p0, cos_t, w_agree), yt)
    grid = np.r_[0.0, np.geomspace(0.5, 200, 25)]
    oracle = [top1(apply_prior(p0, cos_t, w), yt) for w in grid]
    out["oracle_w"], out["oracle(test-chosen w)"] = float(grid[int(np.argmax(oracle))]), max(oracle)
    out["rule:centroid-gate+prior-gate w=b"] = top1(apply_prior(pps if both else p0, cos_t,
                                                                b if prior_pass else 0.0), yt)
    return out


def agreement_sharpness(p_head: np.ndarray, cos: np.ndarray, b: float) -> tuple[float, float]:
    """(a, estimated head top-1) from unlabelled rows: the prior's top-1 is its expected one under
    softmax(b cos) (b fitted on the shots); if head and prior erred independently, their agreement
    rate P = h r + (1 - h)(1 - r) / (C - 1) gives the head's top-1 h; a makes the head's mean
    max probability equal h. Correlated errors (both read the image) inflate P, so h and a come
    out too high: the prior's weight b / a errs small."""
    C = cos.shape[1]
    z = b * cos.astype(np.float64)
    z -= z.max(1, keepdims=True)
    pr = np.exp(z)
    pr /= pr.sum(1, keepdims=True)
    r = float(pr.max(1).mean())
    agree = float(np.mean(np.argmax(p_head, 1) == np.argmax(cos, 1)))
    chance = (1 - r) / (C - 1)
    h = float(np.clip((agree - chance) / max(r - chance, 1e-6), 1.0 / C, 1.0))
    lp = log_of(p_head)
    best, arg = np.inf, 1.0
    for a in np.geomspace(0.02, 5.0, 61):
        q = a * lp
        q -= q.max(1, keepdims=True)
        q = np.exp(q)
        conf = float((q.max(1) / q.sum(1)).mean())
        if abs(conf - h) < best:
            best, arg = abs(conf - h), float(a)
    return arg, h


def _nb_gate(log_p: np.ndarray, cos: np.ndarray, y: np.ndarray, b: float, n: int = 19) -> float:
    """The head's sharpness a when softmax(a log p + b cos) beats softmax(a' log p) on out-of-fold
    rows by more than every shuffled prior and the chi-square 5% level; 0 otherwise."""
    if b <= 0:
        return 0.0

    def gain(c: np.ndarray) -> tuple[float, float]:
        grid = np.geomspace(0.02, 5.0, 31)
        rows = np.arange(len(y))
        best = {}
        for with_prior in (0, 1):
            lls = []
            for a in grid:
                z = a * log_p + with_prior * b * c
                z = z - z.max(1, keepdims=True)
                lls.append(float((z[rows, y] - np.log(np.exp(z).sum(1))).sum()))
            best[with_prior] = (max(lls), float(grid[int(np.argmax(lls))]))
        return 2 * (best[1][0] - best[0][0]), best[1][1]

    lr, a = gain(cos)
    rng = np.random.default_rng(0)
    crit = 3.841
    for _ in range(n if lr > crit else 0):
        crit = max(crit, gain(cos[rng.permutation(len(y))])[0])
        if crit >= lr:
            break
    return a if lr > crit else 0.0


def summarise(results: list[dict]) -> dict[str, tuple[float, float, float]]:
    """arm -> (mean, mean gain over image, std of the gain), percentages (rates for gates)."""
    keys = [k for k in results[0] if k != "image"]
    base = np.array([r["image"] for r in results])
    out = {"image": (100 * base.mean(), 0.0, 0.0)}
    for key in keys:
        v = np.array([r[key] for r in results], float)
        if key.endswith(("_w", "_b", "_a")):  # weights and sharpnesses: plain means
            out[key] = (float(v.mean()), float("nan"), float("nan"))
        elif key.endswith(("pass", "kept")) or key in ("loo_top1", "agree_acc_head", "centroid_shots_top1"):
            out[key] = (100 * float(v.mean()), float("nan"), float("nan"))
        else:
            out[key] = (100 * float(v.mean()), 100 * float((v - base).mean()), 100 * float((v - base).std()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="Folder with c10-img, c10-phrases, tin-index.")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--dataset", choices=["cifar10", "tin200"], default="cifar10")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--shots", nargs="+", type=int, default=[1, 2, 5])
    ap.add_argument("--variants", nargs="+", default=["names", "templates", "shuffled", "half", "garbled", "noise"])
    ap.add_argument("--per-label", type=int, default=4, help="Pseudo-shots per label in the 1-shot LOO arm.")
    ap.add_argument("--fast", action="store_true", help="Prior arms only (no leave-one-out, no pseudo-shot arms).")
    ap.add_argument("--out", type=Path, help="JSON of every seed's figures.")
    args = ap.parse_args()
    start = time.perf_counter()
    lab = (load_tin200 if args.dataset == "tin200" else load_cifar)(args.work, args.data, args.variants)
    zs = zero_shot(lab)
    print("zero-shot top-1 (test): " + ", ".join(f"{n} {100 * v:.1f}" for n, v in zs.items()), flush=True)
    everything = {"zero_shot": zs, "runs": {}}
    for name in args.variants:
        for k in args.shots:
            results = [run_seed(lab, lab.variants[name], k, s, args.per_label, args.fast) for s in range(args.seeds)]
            everything["runs"][f"{name}/{k}"] = results
            print(f"\n## {name}, {k} shot(s), {args.seeds} seeds ({time.perf_counter() - start:.0f} s)", flush=True)
            for key, (mean, gain, std) in summarise(results).items():
                extra = "" if np.isnan(gain) else f"  Δ {gain:+.1f} ± {std:.1f}"
                print(f"  {key:<32} {mean:7.2f}{extra}", flush=True)
            if args.out:
                args.out.write_text(json.dumps(everything, indent=1), encoding="utf-8")
    print(f"\n{time.perf_counter() - start:.0f} s; command: bench/fewshot_lab.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
