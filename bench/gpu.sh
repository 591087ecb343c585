#!/usr/bin/env bash
# The whole GPU check in one run, from a fresh clone on a machine with one NVIDIA GPU:
#
#     bash bench/gpu.sh                # or: make bench-gpu
#
# installs with the gpu extra (make install GPU=1), then prints one line per check, each with its
# figure and PASS or FAIL:
#   1. pytest -m gpu: extract on CUDA equals the CPU (cosine > 0.999 under autocast), GPU FAISS search
#      equals CPU search within the recall tolerance, a GPU-built index loads and answers on the CPU
#   2. bench/extract.py --device cuda on 2,048 generated JPEGs: the built-in EfficientNet-Lite0 and a
#      ViT-B/32-sized open_clip with random weights: images/s of the plain loop, model only and
#      extract; efficiency (goal >= 0.85 of model only) and the ratio to the plain loop
#   3. bench/index.py on the GPU and on the CPU (build time, queries/s, recall@10), and `phrases` rows/s
#   4. the total wall time (goal < 8 min) and the peak GPU memory (nvidia-smi, sampled every 0.5 s)
# and writes every figure to $OUT/gpu.json (OUT: work/gpu-bench). With no GPU visible it stops at
# once with one line (exit 2). Exit 0 only when every line passes.
#
# Sizes (environment): INDEX_N (prototypes of the GPU-vs-CPU index bench, default 500000),
# PHRASES_IMAGES / PHRASES_PROTOTYPES (default 500000 / 100000), EXTRACT_N (default 2048).
# `bash bench/gpu.sh --rehearse` runs every step on the CPU with tiny sizes and the installed .venv
# (no install, no GPU check): to check the script itself on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

REHEARSE=0
[[ "${1:-}" == "--rehearse" ]] && REHEARSE=1
START=$(date +%s)
OUT=${OUT:-work/gpu-bench}
PY=${PY:-.venv/bin/python}
DEVICE=cuda
EXTRACT_N=${EXTRACT_N:-2048}
INDEX_N=${INDEX_N:-500000}
PHRASES_IMAGES=${PHRASES_IMAGES:-500000}
PHRASES_PROTOTYPES=${PHRASES_PROTOTYPES:-100000}
VIT_B32="open_clip:ViT-B-32@"  # the open_clip ViT-B/32 config, random weights (seed 0): nothing downloaded
if (( REHEARSE )); then
    DEVICE=cpu EXTRACT_N=64 INDEX_N=60000 PHRASES_IMAGES=20000 PHRASES_PROTOTYPES=2000 OUT=${OUT}-rehearsal
    VIT_B32="open_clip:$PWD/$OUT/tiny-clip.json@"
fi

if (( ! REHEARSE )); then
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
        echo "bench/gpu.sh: FAIL no NVIDIA GPU visible (nvidia-smi -L lists none); run it on a machine with one"
        exit 2
    fi
fi

rm -rf "$OUT" && mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LINES="$OUT/lines.tsv"
: > "$LINES"

line() {  # line NAME STATUS FIGURE: one printed line, also kept for gpu.json
    printf '%-28s %-4s %s\n' "$1" "$2" "$3"
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$LINES"
}

# Peak GPU memory over the whole run: nvidia-smi samples every 0.5 s in the background.
SAMPLER=""
if (( ! REHEARSE )); then
    nvidia-smi -L | head -1
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 500 > "$OUT/gpu-memory.log" 2>/dev/null &
    SAMPLER=$!
    trap '[[ -n "$SAMPLER" ]] && kill "$SAMPLER" 2>/dev/null' EXIT
fi

# 0. Install (the gpu extra replaces faiss-cpu by faiss-gpu), then check both libraries see the GPU.
if (( ! REHEARSE )); then
    t0=$(date +%s)
    if ! make install GPU=1 > "$OUT/install.log" 2>&1; then
        line "install (make install GPU=1)" FAIL "see $OUT/install.log"
        exit 1
    fi
    line "install (make install GPU=1)" PASS "$(( $(date +%s) - t0 )) s"
    if ! seen=$("$PY" -c "import torch, faiss; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', faiss.get_num_gpus() if hasattr(faiss, 'StandardGpuResources') else 0, sep='|')" 2>"$OUT/devices.log"); then
        line "devices" FAIL "torch or faiss did not import: see $OUT/devices.log"
        exit 1
    fi
    if [[ "${seen%%|*}" == "" || "${seen##*|}" == "0" ]]; then
        line "devices" FAIL "torch sees '${seen%%|*}', FAISS sees ${seen##*|} GPUs: both must see the GPU"
        exit 1
    fi
    line "devices" PASS "torch: ${seen%%|*}; FAISS: ${seen##*|} GPU(s)"
else
    "$PY" -c "import json; from tests.conftest import TINY_CLIP_CONFIG as c; print(json.dumps(c))" > "$OUT/tiny-clip.json"
fi

# 1. The tests marked gpu (a skip counts as a failure here: this machine has the GPU they need).
t0=$(date +%s)
"$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" tests > "$OUT/pytest-gpu.log" 2>&1
counts=$("$PY" - "$OUT/pytest-gpu.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    s = ET.parse(sys.argv[1]).getroot()
    s = s if s.tag == "testsuite" else s[0]
    n, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
    print(n - f - e - k, f + e, k)
except Exception:
    print(0, 1, 0)
EOF
)
read -r passed failed skipped <<< "$counts"
status=$([[ $passed -gt 0 && $failed -eq 0 && $skipped -eq 0 ]] && echo PASS || echo FAIL)
line "pytest -m gpu" "$status" "$passed passed, $failed failed, $skipped skipped ($(( $(date +%s) - t0 )) s; $OUT/pytest-gpu.log)"

# 2. extract on the device: the built-in encoder, then a ViT-B/32-sized open_clip (random weights).
for model in builtin:efficientnet-lite0 "$VIT_B32"; do
    name=$([[ "$model" == builtin:* ]] && echo extract-builtin || echo extract-vit-b-32)
    if "$PY" bench/extract.py --device "$DEVICE" --n "$EXTRACT_N" --model "$model" --work "$OUT/extract-data" \
            --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1; then
        figure=$("$PY" -c "
import json; f = json.load(open('$OUT/$name.json'))
print(f\"{f['extract_images_per_s']:.0f} images/s (plain loop {f['plain_loop_images_per_s']:.0f}, model only {f['model_only_images_per_s']:.0f}); efficiency {f['efficiency']:.2f} (goal >= 0.85); {f['extract_over_plain_loop']:.1f}x the plain loop\")
print('PASS' if f['efficiency'] >= 0.85 else 'FAIL')")
        line "$name" "$(tail -1 <<< "$figure")" "$(head -1 <<< "$figure")"
    else
        line "$name" FAIL "exited $?: see $OUT/$name.log"
    fi
done

# 3. The index on the GPU against the CPU, then `phrases` on the GPU.
for side in gpu cpu; do  # (a rehearsal runs the gpu side on the CPU too)
    name="index-$side"
    device=$([[ $side == gpu ]] && echo "$DEVICE" || echo cpu)
    if "$PY" bench/index.py --device "$device" --n "$INDEX_N" --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1; then
        figure=$("$PY" -c "
import json; f = json.load(open('$OUT/$name.json'))
print(f\"{f['index']} nprobe={f['search_value']}: build {f['build_seconds']:.1f} s, {f['queries_per_second']:,.0f} queries/s at recall@10 {f['recall_at_10']:.3f} (exact {f['exact_queries_per_second']:,.0f}/s)\")
print('PASS' if f['recall_at_10'] >= 0.95 else 'FAIL')")
        line "$name" "$(tail -1 <<< "$figure")" "$(head -1 <<< "$figure")"
    else
        line "$name" FAIL "exited $?: see $OUT/$name.log"
    fi
done
if [[ -f "$OUT/index-gpu.json" && -f "$OUT/index-cpu.json" ]]; then
    figure=$("$PY" -c "
import json; g, c = (json.load(open(f'$OUT/index-{side}.json')) for side in ('gpu', 'cpu'))
print(f\"queries/s {g['queries_per_second'] / c['queries_per_second']:.1f}x the CPU's, build {c['build_seconds'] / max(g['build_seconds'], 1e-9):.1f}x faster; recall@10 {g['recall_at_10']:.3f} vs {c['recall_at_10']:.3f}\")
print('PASS' if g['queries_per_second'] >= c['queries_per_second'] and abs(g['recall_at_10'] - c['recall_at_10']) <= 0.02 else 'FAIL')")
    line "index gpu vs cpu" "$(tail -1 <<< "$figure")" "$(head -1 <<< "$figure")"
fi
if "$PY" bench/index.py --phrases --device "$DEVICE" --images "$PHRASES_IMAGES" --prototypes "$PHRASES_PROTOTYPES" \
        --work "$OUT/phrases-work" --json "$OUT/phrases.json" > "$OUT/phrases.log" 2>&1; then
    figure=$("$PY" -c "
import json; f = json.load(open('$OUT/phrases.json'))
print(f\"{f['phrases_rows_per_second']:,.0f} rows/s ({f['images']:,} images x {f['prototypes']:,} prototypes; index build {f['index_build_seconds']:.1f} s, {f['index']}, recall@10 {f['recall_at_10']:.3f})\")
print('PASS' if f['recall_at_10'] >= 0.95 else 'FAIL')")
    line "phrases" "$(tail -1 <<< "$figure")" "$(head -1 <<< "$figure")"
else
    line "phrases" FAIL "exited $?: see $OUT/phrases.log"
fi
rm -rf "$OUT/phrases-work"

# 4. Wall time and peak GPU memory; every figure into one JSON file.
if [[ -n "$SAMPLER" ]]; then
    kill "$SAMPLER" 2>/dev/null
    wait "$SAMPLER" 2>/dev/null
    SAMPLER=""
    peak=$(sort -n "$OUT/gpu-memory.log" | tail -1)
    line "peak GPU memory" "$([[ -n "$peak" ]] && echo PASS || echo FAIL)" "${peak:-?} MiB (nvidia-smi, every 0.5 s)"
fi
total=$(( $(date +%s) - START ))
line "total wall time" "$([[ $total -lt 480 ]] && echo PASS || echo FAIL)" "$total s (goal < 480 s, install included)"

"$PY" - "$OUT" <<'EOF'
import json, pathlib, platform, sys
out = pathlib.Path(sys.argv[1])
lines = [dict(zip(("check", "status", "figure"), row.split("\t", 2))) for row in (out / "lines.tsv").read_text().splitlines()]
figures = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem not in ("gpu", "tiny-clip")}
memory = out / "gpu-memory.log"
peak = max((int(v) for v in memory.read_text().split() if v.isdigit()), default=None) if memory.exists() else None
doc = {"passed": all(l["status"] == "PASS" for l in lines), "lines": lines, "figures": figures,
       "peak_gpu_memory_mib": peak, "machine": platform.node()}
(out / "gpu.json").write_text(json.dumps(doc, indent=2))
print(f"figures: {out / 'gpu.json'}")
EOF
! grep -q $'\tFAIL\t' "$LINES"
