"""WORK/report.html (`write_report`): the page and its plots, from the outputs of a run."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from phrasefuse.report import BASELINE, plots
from phrasefuse.folders import make_folder, write_atomic
from phrasefuse.fuse.metrics import headline, headline_key

THUMB = 128  # gallery thumbnail size (pixels)

# The words the report uses, in README's wording ("The words it uses"): tests/report/test_page.py
# checks each one is still written so there, so that the page and the README say the same thing.
GLOSSARY = {
    "text trust": "the weight of a text feature in a fused head (0, 0.25, 0.5 or 1 for linear and lgbm; learned "
                  "gates for mlp), tuned on the val split. A fused head is saved only if it beats the image-only "
                  "head by more than one standard error; \"text kept 1/3 seeds\" counts where it did.",
    "label prior": "how close an image's phrases are to each label's name (or description), added to the head's "
                   "scores with a weight fitted on held-out rows and kept only when it beats shuffled priors. It "
                   "needs no labelled image; zeroshot.json is its accuracy alone.",
    "prototype": "the mean embedding of the images of one query phrase; the index holds one per phrase.",
    "pseudo-shots": "prototypes whose phrase matches a label's name, offered as extra training rows.",
    "second look": "when the held-out rows are too few to decide on the prior (e.g. 5 shots), its own temperature "
                   "is fitted on the training rows (which it never saw) and kept only if held-out top-1 does not "
                   "drop.",
}


def write_report(config, layout, heads: list) -> list[Path]:
    """Write the plots and report.html for a run (`config`, `layout`: `phrasefuse.run`'s) whose
    heads are `heads` (the baseline among them); returns [report.html, *plots]."""
    from phrasefuse.fuse.artifact import read_head_meta

    plot_dir = layout.work / "plots"
    make_folder(plot_dir, "work folder")
    written: list[Path] = []
    sections: list[str] = []

    ablation = _read_json(layout.ablation / "ablation.json")
    if ablation:
        sections.append(_ablation_html(ablation, plot_dir, written))
    metas = {h.name: read_head_meta(layout.head(h.name)) for h in heads if layout.head(h.name).exists()}
    if metas:
        sections.append(_heads_html(metas))
    zeroshot = _read_json(layout.zeroshot)
    if zeroshot:
        sections.append(_zeroshot_html(zeroshot))
    sections += _best_head_html(config, layout, metas, plot_dir, written)
    sections.append(_glossary_html())

    page = _page(f"phrasefuse report: {config.path.name}", sections, config)
    write_atomic(layout.report, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return [layout.report, *written]


def _ablation_html(ablation: dict, plot_dir: Path, written: list[Path]) -> str:
    """The ablation section: its tables and bars, and the few-shot curves (plots appended to `written`)."""
    full = [t for t in ablation["tables"] if not t["shots"]]
    shot_tables = [t for t in ablation["tables"] if t["shots"]]
    body = ""
    for t in full:
        path = plot_dir / "ablation.png"
        write_atomic(path, lambda tmp, t=t: plots.ablation_bars(t, tmp, ablation['head']))
        written.append(path)
        alt = f"ablation bar chart, {ablation['head']} head, test split"
        body += _table_html(t, ablation["test_rows"]) + _img(path, alt) \
            + ("<p class='note'>Bars: mean test score over seeds; error bars: ± 1 standard deviation over seeds; "
               "dashed line: the image-only row, the reference.</p>")
    if shot_tables:
        path = plot_dir / "few_shot.png"
        write_atomic(path, lambda tmp: plots.few_shot_curves(shot_tables, tmp, ablation['head']))
        written.append(path)
        body += ("<h3>Few-shot</h3>" + _img(path, f"few-shot curves, {ablation['head']} head, test split")
                 + "<p class='note'>Each line: the mean test score over seeds at K labelled examples per class; "
                   "each band: ± 1 standard deviation over seeds. The dashed line is image only, drawn on top: a "
                   "line hidden under it scored the same (text not kept).</p>") + "".join(
            _table_html(t, ablation["test_rows"]) for t in shot_tables)
    return f"<h2>Ablation: {html.escape(ablation['head'])} head</h2>{body}"


def _glossary_html() -> str:
    return ("<h2>Words used here</h2><dl>" + "".join(f"<dt><b>{html.escape(w)}</b></dt><dd>{html.escape(t)}</dd>"
                                                    for w, t in GLOSSARY.items()) + "</dl>")


def _zeroshot_html(zeroshot: dict) -> str:
    m = zeroshot["metrics"]
    return ("<h2>Zero-shot label prior</h2><p>Generated phrases scored against the embedded "
            f"{html.escape(zeroshot['label_texts'])} (no head, no labelled image): "
            f"<b>{_pct(m.get('top1', m.get('mAP')))}</b> {'top-1' if 'top1' in m else 'mAP'} on the "
            f"{html.escape(zeroshot['split'])} split ({zeroshot['rows']} rows, "
            f"{100 * zeroshot['coverage']:.0f}% with phrases; chance {_pct(zeroshot.get('chance_top1'))}).</p>")


def _best_head_html(config, layout, metas: dict, plot_dir: Path, written: list[Path]) -> list[str]:
    """The best fused head's sections: its confusion matrix (single-label) and the gallery against the baseline."""
    from phrasefuse.fuse.data import label_column, label_values
    from phrasefuse.manifests import read_manifest

    fused = [n for n in metas if n != BASELINE]
    best = max(fused, key=lambda n: _test_score(metas[n]), default=None)
    if best is None or not layout.predictions(best).is_file():
        return []
    manifest = read_manifest(config.data.source)
    multilabel = metas[best].get("task") == "multilabel"
    # the labels as the heads read them: [data] label_col (else label / labels), trimmed, split if multi-label
    col = label_column(manifest, config.data.label_col)
    is_test = pc.equal(manifest.table["split"], "test")
    labels = label_values(manifest, col, multilabel, np.zeros(manifest.table.num_rows, bool)).filter(is_test)
    test = manifest.table.filter(is_test)
    if not test.num_rows:
        return [f"<h2>Test split</h2><p>The manifest has no test rows ({manifest.table.num_rows} rows, none with "
                f"split = test): the heads' test scores are n/a, and there is no confusion matrix and no gallery. "
                f"Give some rows split = test to measure them.</p>"]
    truth = [", ".join(v or []) for v in labels.to_pylist()] if multilabel else \
        [v if v is not None else "" for v in labels.to_pylist()]
    sections = []
    best_pred = _predictions(layout.predictions(best), test["id"])
    # The head is the fused head with the highest test score, which may still be below image-only:
    # every title names it, its split and that comparison rather than calling it "best".
    shown = _head_caption(best, metas)
    if not multilabel:
        vocab = list(metas[best]["labels"])
        index = {v: i for i, v in enumerate(vocab)}
        true = np.array([index.get(v, -1) for v in truth], dtype=np.int64)
        pred = np.array([index.get(v, -1) for v in best_pred["label"].to_pylist()], dtype=np.int64)
        matrix = plots.confusion_matrix(true, pred, len(vocab))
        path = plot_dir / "confusion.png"
        title = f"{best} head, test split ({len(truth)} rows)"
        write_atomic(path, lambda tmp: plots.confusion(matrix, vocab, tmp, title))
        written.append(path)
        sections.append(f"<h2>Confusion matrix: {html.escape(best)} head, test split</h2><p>{shown}. Rows: the "
                        f"true label; columns: the predicted one; each cell is the share of its row (the true "
                        f"class's test rows), so every class reads on the same 0-100% scale; counts in "
                        f"brackets.</p>" + _img(path, f"confusion matrix, {best} head, test split"))
    if config.report.gallery and BASELINE in metas and layout.predictions(BASELINE).is_file():
        base_pred = _predictions(layout.predictions(BASELINE), test["id"])
        sections.append(_gallery_html(config, layout, manifest, test, truth, base_pred, best_pred, best,
                                      metas[best], config.report.gallery))
    return sections


def is_image_only_fallback(meta: dict) -> bool:
    """Whether the saved head predicts as the image-only head does: image-only was kept and nothing
    else that changes a prediction was (a label prior with a weight, pseudo-shot rows). `selection.saved`
    alone says only which network was kept: a prior kept on top of it changes predictions."""
    selection = meta.get("selection") or {}
    return (selection.get("saved") == "image-only" and not (meta.get("prior") or {}).get("weight")
            and not (selection.get("pseudo_shots") or {}).get("per_label"))


def _head_caption(name: str, metas: dict) -> str:
    """The head's test score beside image-only's, and what it is made of (as `fuse train` says it)."""
    from phrasefuse.fuse.artifact import saved_parts

    meta = metas[name]
    score, base = _test_score(meta), _test_score(metas[BASELINE]) if BASELINE in metas else -1.0
    key = headline_key(((meta.get("metrics") or {}).get("test") or {}).get("saved") or {})
    versus = "" if base < 0 else (f" (image-only {_pct(base)}: " + (
        "below it)" if score < base else "above it)" if score > base else "level)"))
    return (f"Head {html.escape(name)}, of the fused heads the one with the highest test "
            f"{plots.NAMES.get(key, key)}: {_pct(score if score >= 0 else None)}{versus}; saved as: "
            f"{html.escape(saved_parts(meta))}")


# ---------------------------------------------------------------- data


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _test_score(meta: dict) -> float:
    m = ((meta.get("metrics") or {}).get("test") or {}).get("saved") or {}
    return headline(m) if m else -1.0


def _predictions(path: Path, ids: pa.Array) -> pa.Table:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return table.take(pc.index_in(ids, value_set=table["id"]))


# ---------------------------------------------------------------- html


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.1f}%"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<p><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"></p>'


def _table_html(table: dict, test_rows: int) -> str:
    cols = table["columns"]
    head = "".join(f"<th>{plots.NAMES.get(c, c)}</th>" for c in cols)
    rows = []
    for r in table["rows"]:
        cells = "".join(f"<td>{100 * r[c]['mean']:.1f} ± {100 * r[c]['std']:.1f}</td>" for c in cols)
        gain = ""
        if "gain" in r:
            g = r["gain"]["mean"]
            gain = f"<span class='{'up' if g > 0 else 'down' if g < 0 else ''}'>{100 * g:+.1f}</span> ± " \
                   f"{100 * r['gain']['std']:.1f}"
        kept = f"{r['text_kept']}/{table['seeds']} seeds" if "text_kept" in r else ""
        if "prior_weights" in r:
            kept += ("; " if kept else "") + "prior weight " + ", ".join(f"{w:.3g}" for w in r["prior_weights"]) \
                + f" ({r.get('prior_chosen_by', '')})"
        if "pseudo_kept" in r:
            kept += ("; " if kept else "") + "pseudo-shots kept " + ", ".join(map(str, r["pseudo_kept"]))
        rows.append(f"<tr><td>{html.escape(r['features'])}</td>{cells}<td>{gain}</td>"
                    f"<td class='note'>{html.escape(kept)}</td></tr>")
    return (f"<h3>{html.escape(table['regime'])} ({table['seeds']} seed(s), mean ± std over seeds; test split, "
            f"{test_rows} rows)</h3><table><tr><th>features</th>{head}<th>Δ vs image only</th>"
            f"<th>text kept / label prior</th></tr>"
            + "".join(rows) + f"</table><p class='note'>{html.escape(table['note'])}</p>")


def _heads_html(metas: dict) -> str:
    rows = []
    for name, meta in metas.items():
        test = (meta.get("metrics") or {}).get("test") or {}
        val = (meta.get("metrics") or {}).get("val") or {}
        key = headline_key(test.get("saved") or {})
        cells = [_pct((val.get("saved") or {}).get(key)), _pct((val.get("image_only") or {}).get(key)),
                 _pct((test.get("saved") or {}).get(key)), _pct((test.get("image_only") or {}).get(key))]
        features = ", ".join(f"{f['name']}" + (f" ×{f['trust']:.2f}" if f.get("role") != "image" and
                                                 f.get("trust") is not None else "") for f in meta["features"])
        reason = _decision_text(meta)
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(meta['kind'])}</td>"
                    f"<td>{html.escape(features)}</td>" + "".join(f"<td>{c}</td>" for c in cells)
                    + f"<td class='note'>{html.escape(reason)}</td></tr>")
    return ("<h2>Heads</h2><table><tr><th>head</th><th>kind</th><th>features (text trust)</th><th>val saved</th>"
            "<th>val image-only</th><th>test saved</th><th>test image-only</th><th>why this one was saved</th></tr>"
            + "".join(rows) + "</table>")


def _decision_text(meta: dict) -> str:
    """Why the head is what it is: the reason, each candidate's validation score, the rule, the
    label prior's weight and the scores it was chosen on, and the warnings."""
    selection = meta.get("selection") or {}
    parts = [selection.get("reason", "")]
    if selection.get("chosen_by"):  # the val split, cross-validation within the training rows, or --shots K
        parts.append(f"chosen by {selection['chosen_by']}")
    scores = selection.get("validation") or {}
    if scores:
        parts.append("validation: " + ", ".join(f"{k.replace('_', '-')} {_pct(v)}" for k, v in scores.items()))
    for tuning in selection.get("trust_tuning") or []:
        parts.append(f"{tuning['feature']} trust " + ", ".join(f"{s:g}: {_pct(v)}" for s, v in
                                                               zip(tuning["scales"], tuning["scores"]))
                     + f" -> {tuning['chosen']:g}")
    if selection.get("rule"):
        parts.append(f"rule: {selection['rule']}")
    prior = meta.get("prior")
    if prior:
        parts.append(f"label prior {prior['store']['name']} weight {prior['weight']:g} (val top-1 by weight: "
                     + ", ".join(f"{g['weight']:g}: {_pct(g['val_top1'])}" for g in prior.get("grid", [])) + ")")
    pseudo = selection.get("pseudo_shots")
    if pseudo:
        scores = ", ".join([f"none: {_pct(pseudo['score_without'])}"] * ("score_without" in pseudo)
                           + [f"{c['per_label']} per label: {_pct(c['score'])}" for c in pseudo["candidates"]])
        parts.append(f"pseudo-shots from {pseudo['index']}: {pseudo['rows']} rows kept ({pseudo['reason']}"
                     + (f"; held-out top-1 {scores}" if scores else "") + ")")
    parts += [f"warning: {w}" for w in meta.get("warnings") or []]
    return "; ".join(p for p in parts if p)


def _thumbnails(manifest, rows: pa.Table, limits) -> dict[str, str]:
    """Each row's thumbnail (by id), its bytes read as `extract images` reads them (the source's
    reader: an image file, a tar member at its offset, a Parquet bytes cell), within `limits`."""
    from phrasefuse.extract.images import image_sources
    from phrasefuse.manifests import image_chunks

    out = {}
    for chunk in image_chunks(rows, manifest.image_bytes):
        for ident, source in zip(chunk["id"].to_pylist(), image_sources(chunk)):
            out[ident] = _thumbnail(source, limits)
    return out


def _thumbnail(source, limits=None) -> str:
    """A small JPEG, inline, of the image at `source` (`extract.images.image_sources`: a path, a tar
    member's (shard, offset, size), or the bytes); one that is not a sane image (a bomb, a FIFO, a
    folder, too large, corrupt, missing) shows as unreadable: the report never fails on one picture."""
    from phrasefuse.extract.images import DEFAULT_LIMITS, decode_errors, open_image, read_source

    data, _ = read_source(source, limits or DEFAULT_LIMITS)
    if data is None:
        return "<div class='noimg'>image unreadable</div>"
    try:
        with decode_errors():
            im = open_image(data)
            im.draft("RGB", (THUMB, THUMB))
            im = im.convert("RGB")
            im.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
    except (ValueError, MemoryError):
        return "<div class='noimg'>image unreadable</div>"
    return f"<img src='data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}' alt=''>"


def _gallery_html(config, layout, manifest, test: pa.Table, truth: list[str], base: pa.Table, fused: pa.Table,
                  fused_name: str, fused_meta: dict, count: int) -> str:
    from phrasefuse.store import EmbeddingStore

    def shown(pred: pa.Table) -> list[str]:
        if "label" in pred.column_names:
            return [f"{l} ({100 * p:.0f}%)" if l is not None else "?" for l, p in
                    zip(pred["label"].to_pylist(), pred["probability"].to_pylist())]
        return [", ".join(v or []) for v in pred["labels"].to_pylist()]

    def bare(pred: pa.Table) -> list:
        return pred["label"].to_pylist() if "label" in pred.column_names else \
            [", ".join(v or []) for v in pred["labels"].to_pylist()]

    base_ok = np.array([a == b for a, b in zip(bare(base), truth)], dtype=bool)
    fused_ok = np.array([a == b for a, b in zip(bare(fused), truth)], dtype=bool)
    groups = [("fixed by text", ~base_ok & fused_ok), ("broken by text", base_ok & ~fused_ok),
              ("both wrong", ~base_ok & ~fused_ok), ("both right", base_ok & fused_ok)]
    statement = _text_effect(fused_name, fused_meta, len(truth), *(int(m.sum()) for _, m in groups))
    if is_image_only_fallback(fused_meta) and not groups[0][1].any() and not groups[1][1].any():
        return f"<h2>Gallery: test split, image-only head vs {html.escape(fused_name)}</h2><p>{statement}</p>"
    quota = [count // 2, count // 4, count // 8, count]
    chosen: list[tuple[str, int]] = []
    for (name, mask), q in zip(groups, quota):
        for i in np.flatnonzero(mask)[: min(q, count - len(chosen))]:
            chosen.append((name, int(i)))

    phrases, scores = {}, {}
    store = EmbeddingStore(layout.phrases_store)
    if config.phrases and store.exists():
        ids = pa.array([test["id"][i].as_py() for _, i in chosen], pa.string())
        table = store.read_table(["id", "phrases", "scores"])
        table = table.take(pc.index_in(ids, value_set=table["id"]))
        for ident, ph, sc in zip(ids.to_pylist(), table["phrases"].to_pylist(), table["scores"].to_pylist()):
            phrases[ident], scores[ident] = ph or [], sc or []
    thumbs = _thumbnails(manifest, test.take(pa.array([i for _, i in chosen], pa.int64())),
                         config.encoders.image_limits())
    text_cols = [c for c in config.data.text_columns if c in test.column_names]
    base_text, fused_text = shown(base), shown(fused)
    cards = []
    for group, i in chosen:
        ident = test["id"][i].as_py()
        meta_text = "".join(
            f"<div class='meta'><b>{html.escape(c)}</b>: {html.escape(_cell(test[c][i].as_py()))}</div>"
            for c in text_cols)
        ph = "".join(f"<li>{html.escape(p)} <span class='score'>{s:.2f}</span></li>"
                     for p, s in zip(phrases.get(ident, []), scores.get(ident, [])))
        cls = group.split()[0]
        cards.append(
            f"<div class='card {cls}'>{thumbs[ident]}"
            f"<div class='id'>{html.escape(ident)} · <i>{group}</i></div>"
            f"<div><b>true</b>: {html.escape(truth[i])}</div>"
            f"<div class='{'ok' if base_ok[i] else 'bad'}'><b>image only</b>: {html.escape(base_text[i])}</div>"
            f"<div class='{'ok' if fused_ok[i] else 'bad'}'><b>{html.escape(fused_name)}</b>: "
            f"{html.escape(fused_text[i])}</div>{meta_text}"
            + (f"<div class='meta'><b>generated phrases</b><ul>{ph}</ul></div>" if ph else "") + "</div>")
    return (f"<h2>Gallery: test split, image-only head vs {html.escape(fused_name)}</h2>"
            f"<p>{statement} Shown: up to {count} (text's fixes first, then what it broke).</p>"
            f"<div class='gallery'>{''.join(cards)}</div>")


def _text_effect(name: str, meta: dict, rows: int, fixed: int, broke: int, both_wrong: int, both_right: int) -> str:
    """What text did, counted from the two heads' prediction files on the test rows (never inferred
    from which network `fuse train` kept: a label prior kept on the image-only network changes
    predictions too). The test reads these words: keep them in step with tests/run/test_run_report.py."""
    from phrasefuse.fuse.artifact import saved_parts

    head = f"the saved {html.escape(name)} head"
    if is_image_only_fallback(meta):
        what = (f"The saved {html.escape(name)} head is the image-only fallback (text did not beat image-only "
                f"on validation)")
    else:
        what = f"The saved {html.escape(name)} head is made of: {html.escape(saved_parts(meta))}"
    return (f"{what}. On the test split ({rows} rows), {head} against the image-only head: text fixed "
            f"{fixed} and broke {broke} (both wrong: {both_wrong}, both right: {both_right}).")


def _cell(value) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    text = str(value)
    return text if len(text) <= 160 else text[:157] + "..."


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:1.5em} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.6em} h3{font-size:1.05em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0} td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f4f4f4} .up{color:#1a7f37;font-weight:600} .down{color:#c0392b;font-weight:600}
.note{color:#666;font-size:.85em} img{max-width:100%}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:10px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;font-size:.8em;background:#fff}
.card img{display:block;margin:0 auto 6px;border-radius:4px} .card.fixed{border-color:#2a9d8f;border-width:2px}
.card.broken{border-color:#e76f51;border-width:2px} .ok{color:#1a7f37} .bad{color:#c0392b}
.id{color:#888;font-size:.9em} .meta{color:#444;margin-top:3px} .meta ul{margin:2px 0 0 14px;padding:0}
.score{color:#888} .noimg{height:64px;background:#eee;text-align:center;line-height:64px}
"""


def _page(title: str, sections: list[str], config) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='note'>Manifest {html.escape(str(config.data.manifest))}; work folder "
            f"{html.escape(str(config.work))}; image encoder {html.escape(config.encoders.image)}, text encoder "
            f"{html.escape(config.encoders.text)}.</p>" + "".join(sections) + "</body></html>")
