#!/usr/bin/env bash
# GPU throughput of a ~1B-parameter model (conf/bench_1b.yaml, bf16-mixed, seq 2048, batch 4) for
# each attention backend that is installed (sdpa always; flash-attn and Transformer Engine only if
# already importable: this script installs nothing and needs no network), with and without
# torch.compile, and peak memory with activation checkpointing none / selective / full.
# Also the backend parity check against the reference attention on the GPU.
#
#   bash benchmarks/gpu_backends.sh [OUT_DIR]        # default docs/performance/gpu
#
# Every run is `python -m flm_lightning bench` (trainer vs hand-written loop, MFU against the
# GPU's bf16 peak). Budget: about 25 minutes on one H100 (compile runs pay ~1 min of compilation
# each). Set STEPS / REPEATS to change the length. For a short GPU session use benchmarks/gpu_check.sh
# (under 8 minutes, per-stage timeouts, installs missing packages from .whl/).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # a checkout that is not pip-installed works too
OUT=${1:-docs/performance/gpu}
STEPS=${STEPS:-20}
REPEATS=${REPEATS:-3}
PY=${PYTHON:-python}
mkdir -p "$OUT"

$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
$PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
$PY benchmarks/attention_parity.py --json "$OUT/parity.json" | tee "$OUT/parity.txt"

installed() {  # backend -> 0 when it can be imported
  case "$1" in
    sdpa) return 0 ;;
    flash) $PY -c "import flash_attn" 2>/dev/null ;;
    te) $PY -c "import transformer_engine.pytorch" 2>/dev/null ;;
  esac
}

bench() {  # name, then --set overrides
  local name=$1; shift
  local sets=()
  for kv in "$@"; do sets+=(--set "$kv"); done
  echo "== $name"
  $PY -m flm_lightning bench -c conf/bench_1b.yaml --steps "$STEPS" --warmup 5 --repeats "$REPEATS" \
      --json "$OUT/$name.json" "${sets[@]}" 2>"$OUT/$name.log" | tee "$OUT/$name.txt" \
    || echo "   failed: see $OUT/$name.log"
}

for backend in sdpa flash te; do
  if ! installed "$backend"; then echo "== $backend: not installed, skipped" | tee "$OUT/$backend.skipped"; continue; fi
  bench "${backend}_eager" "model.arch.attention_backend=$backend"
  bench "${backend}_compiled" "model.arch.attention_backend=$backend" "model.compile=true"
done
for ac in selective full; do
  bench "sdpa_ac_$ac" "model.activation_checkpointing=$ac"
done
$PY - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
rows = []
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    r = json.load(open(path))
    if "median_ratio" in r:
        rows.append((os.path.basename(path)[:-5], r))
print(f"{'run':<16} {'trainer tok/s':>13} {'loop tok/s':>11} {'ratio':>6} {'MFU':>6} {'peak GiB':>9}")
for name, r in rows:
    med = lambda xs: sorted(xs)[len(xs) // 2]
    print(f"{name:<16} {med(r['trainer_tokens_per_sec']):13,.0f} {med(r['loop_tokens_per_sec']):11,.0f} "
          f"{r['median_ratio']:6.3f} {r.get('trainer_mfu', float('nan')):6.1%} {r['trainer_peak_memory_bytes'] / 2**30:9.2f}")
PY
