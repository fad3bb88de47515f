#!/usr/bin/env bash
# One prepared GPU run (issue 18): every first GPU number in under 8 minutes on one H100/H200,
# everything written under one folder, a markdown summary at the end. Installs nothing from a network.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]                  # default runs/gpu_check
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh OUT    # or --cpu-smoke: every stage on CPU, tiny model,
#                                                           # 2 steps (tests/test_gpu_check.py runs this)
# Stages, most important first; each has its own timeout, capped by what is left of the time budget
# (GPU_CHECK_BUDGET_S, default 420 s), so a hang costs one stage and later ones are skipped, not lost:
#   wheels     missing Python packages from .whl/ (benchmarks/gpu_wheels.sh) into /tmp/site, no index
#   env        versions, GPU, which attention backends import or run and why not    -> env.json, backends.tsv
#   matmul     measured dense bf16 matmul TFLOP/s (MFU is also given against it)     -> matmul.json
#   data       the built-in corpus tokenised once (every later stage reads the cache)
#   parity     bf16 attention parity: sdpa (default, flash, cuDNN, efficient kernels), flash, te vs fp32 math
#   sdpa_eager `python -m flm_lightning bench` of conf/bench_1b.yaml: trainer and hand-written loop
#              tokens/s, MFU, peak memory                                           -> bench/NAME.json
#   fit_fsdp2  20 steps of `python main.py fit` under FLMParallelStrategy 1x1x1 (conf/layouts/cuda_1x1x1.yaml:
#              FSDP2, bf16 params, fp32 reduce) logging to TensorBoard               -> fit_fsdp2/
#   sdpa_compiled                the same bench with model.compile=true (graph breaks and recompiles counted)
#   ac_selective / ac_full       activation checkpointing: peak memory and its cost in tokens/s
#   sdpa_cudnn_eager / sdpa_flash_eager   sdpa with one kernel forced (torch.nn.attention.sdpa_kernel)
#   flash_* / te_*               flash-attn / Transformer Engine, only when they import (else the reason)
#   fit_fsdp2_meta_ckpt          meta-device init, a distributed checkpoint and a resume from it on CUDA
#   summary    summary.md (also printed)
# GPU_CHECK_ONLY="parity sdpa_eager ..." runs only those stages (and env); the others are recorded as not selected.
set -uo pipefail   # no -e: a failed stage is recorded and the next one runs
cd "$(dirname "$0")/.."

OUT=""
DRY=${GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) DRY=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) OUT=$arg ;;
  esac
done
[[ "$DRY" == "0" || -z "$DRY" ]] && DRY=0 || DRY=1
export GPU_CHECK_DRY_RUN=$DRY
OUT=${OUT:-runs/gpu_check}
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/site}
SCRATCH=${GPU_CHECK_SCRATCH:-/tmp/gpu_check_scratch}   # large files that must not come back with OUT
CACHE=${GPU_CHECK_CACHE_DIR:-.cache/flm_lightning}
mkdir -p "$OUT/logs" "$OUT/bench" "$OUT/configs"
OUT=$(cd "$OUT" && pwd)
: >"$OUT/stages.tsv"
START=$(date +%s)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# The project runs from this checkout, installed or not (python benchmarks/X.py puts only benchmarks/ on sys.path).
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [[ $DRY == 1 ]]; then
  BUDGET=${GPU_CHECK_BUDGET_S:-900}
  STEPS=2; WARMUP=1; REPEATS=1; AC_STEPS=2; FIT_STEPS=2; CKPT_STEPS=2; LOG_EVERY=1; T=120
  export FLM_COMPILE_BACKEND=${FLM_COMPILE_BACKEND:-aot_eager}  # dynamo + AOT autograd, no C++ build
  ACCEL=(--trainer.accelerator=cpu)
  PARITY=(--device cpu --dtype bfloat16 --seq 64 --heads 2)
else
  BUDGET=${GPU_CHECK_BUDGET_S:-420}
  STEPS=${STEPS:-12}; WARMUP=${WARMUP:-4}; REPEATS=${REPEATS:-2}
  AC_STEPS=6; FIT_STEPS=20; CKPT_STEPS=4; LOG_EVERY=5; T=0
  ACCEL=()
  PARITY=(--dtype bfloat16 --seq 2048 --heads 16)
fi
limit() { if [[ $T != 0 ]]; then echo "$T"; else echo "$1"; fi; }  # dry run: one limit for every stage

record() {  # name status seconds limit note
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$OUT/stages.tsv"
  echo "[gpu_check] $1: $2 (${3}s of ${4}s)${5:+ - $5}"
}

selected() { [[ -z ${GPU_CHECK_ONLY:-} || $1 == env || " ${GPU_CHECK_ONLY//,/ } " == *" $1 "* ]]; }

stage() {  # name timeout_s command... : its own timeout, never more than the budget left
  local name=$1 want; want=$(limit "$2"); shift 2
  if ! selected "$name"; then record "$name" skipped 0 "$want" "not in GPU_CHECK_ONLY"; return 1; fi
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 20 )); then record "$name" skipped 0 "$want" "time budget (${BUDGET}s) spent"; return 1; fi
  local lim=$(( want < left ? want : left ))
  local t0; t0=$(date +%s)
  timeout -k 15 "$lim" "$@" >"$OUT/logs/$name.log" 2>&1 </dev/null
  local rc=$? dt=$(( $(date +%s) - t0 ))
  case $rc in
    0) record "$name" ok "$dt" "$lim" "" ;;
    124|137) record "$name" timeout "$dt" "$lim" "stopped after ${lim}s" ;;
    *) local last; last=$(grep -E 'Error|error:' "$OUT/logs/$name.log" | tail -1 | cut -c1-200)
       record "$name" failed "$dt" "$lim" "exit $rc: $last" ;;
  esac
  return $rc
}

usable() {
  awk -F'\t' -v b="$1" '$1 == b && $2 == "yes" {found = 1} END {exit !found}' "$OUT/backends.tsv" 2>/dev/null
}
why_not() { awk -F'\t' -v b="$1" '$1 == b {print $3}' "$OUT/backends.tsv" 2>/dev/null | cut -c1-300; }

# ---- wheels: only distributions this Python lacks (copies of installed ones would shadow them) ----------
echo "[gpu_check] $([[ $DRY == 1 ]] && echo 'CPU smoke run' || echo 'GPU run'), budget ${BUDGET}s, output in $OUT"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  t0=$(date +%s)
  if timeout -k 10 120 $PY benchmarks/gpu_check.py install-wheels "$WHEELS" "$SITE" >"$OUT/logs/wheels.log" 2>&1; then
    record wheels ok $(( $(date +%s) - t0 )) 120 "$(grep -c '^install' "$OUT/logs/wheels.log") installed into $SITE"
  else
    record wheels failed $(( $(date +%s) - t0 )) 120 "see logs/wheels.log"
  fi
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
else
  record wheels skipped 0 0 "no $WHEELS/*.whl (benchmarks/gpu_wheels.sh makes them)"
fi

# ---- the model config: bench_1b.yaml, or a tiny copy of it for the CPU smoke run --------------------------
CONFIG=conf/bench_1b.yaml
if [[ $DRY == 1 ]]; then
  CONFIG=$OUT/configs/bench_tiny.yaml
  $PY - "$CONFIG" "$CACHE" <<'PY'
import sys, yaml
cfg = yaml.safe_load(open("conf/bench_1b.yaml"))
cfg["trainer"].update(accelerator="cpu", log_every_n_steps=1)
cfg["model"]["arch"].update(vocab_size=2048, n_layers=2, n_heads=2, hidden_size=64, max_seq_len=64)
cfg["data"]["init_args"].update(seq_len=64, batch_size=2, cache_dir=sys.argv[2])
cfg["trainer"]["callbacks"][0]["init_args"]["window_size"] = 2
yaml.safe_dump(cfg, open(sys.argv[1], "w"), sort_keys=False)
PY
else
  cp conf/bench_1b.yaml "$OUT/configs/"
fi
cp conf/layouts/cuda_1x1x1.yaml "$OUT/configs/"

# ---- stages ------------------------------------------------------------------------------------------------
if ! stage env 90 $PY benchmarks/gpu_check.py env "$OUT"; then
  cat "$OUT/logs/env.log"
  $PY benchmarks/gpu_check.py summary "$OUT" >/dev/null 2>&1
  echo "[gpu_check] stopped: the environment check failed (logs/env.log)"; exit 2
fi
stage matmul 60 $PY benchmarks/gpu_check.py matmul "$OUT"
stage data 180 $PY -c "
import sys, yaml
from flm_lightning.data import TextDataModule
args = yaml.safe_load(open(sys.argv[1]))['data']['init_args']
TextDataModule(**{k: v for k, v in args.items() if k != 'cache_dir'}, cache_dir=sys.argv[2]).prepare_data()
print('prepared', args)" "$CONFIG" "$CACHE"
stage parity 120 $PY benchmarks/attention_parity.py "${PARITY[@]}" --json "$OUT/parity.json"

# --same-process: the sdpa kernel restriction and the memory notes of gpu_check.py run live in this
# process, and the budget has no room for a fresh process (CUDA init, compile) per run.
bench() {  # name timeout_s steps repeats [--kernel K] [--set KEY=VALUE ...]
  local name=$1 lim=$2 steps=$3 repeats=$4; shift 4
  local kernel=()
  if [[ ${1:-} == --kernel ]]; then kernel=(--sdpa-kernel "$2"); shift 2; fi
  local sets=()
  for kv in "$@"; do sets+=(--set "$kv"); done
  [[ " $* " == *"model.compile=true"* ]] && export TORCH_LOGS=graph_breaks,recompiles || unset TORCH_LOGS
  stage "$name" "$lim" $PY benchmarks/gpu_check.py run ${kernel[@]+"${kernel[@]}"} \
    --memlog "$OUT/bench/$name.mem.json" -- \
    -m flm_lightning bench --same-process -c "$CONFIG" --steps "$steps" --warmup "$WARMUP" --repeats "$repeats" \
    --json "$OUT/bench/$name.json" --set "data.init_args.cache_dir=$CACHE" ${sets[@]+"${sets[@]}"}
  unset TORCH_LOGS
}

fit() {  # name timeout_s steps [extra CLI arguments]
  local name=$1 lim=$2 steps=$3; shift 3
  stage "$name" "$lim" $PY benchmarks/gpu_check.py run --memlog "$OUT/logs/$name.mem.json" -- \
    main.py fit -c "$CONFIG" -c conf/layouts/cuda_1x1x1.yaml ${ACCEL[@]+"${ACCEL[@]}"} \
    "--data.init_args.cache_dir=$CACHE" \
    "--trainer.max_steps=$steps" --trainer.enable_progress_bar=false "--trainer.log_every_n_steps=$LOG_EVERY" \
    "--trainer.logger.init_args.save_dir=$OUT/$name" "$@"
}

bench sdpa_eager 200 "$STEPS" "$REPEATS"
fit fit_fsdp2 240 "$FIT_STEPS" --trainer.enable_checkpointing=false
bench sdpa_compiled 300 "$STEPS" "$REPEATS" model.compile=true
bench ac_selective 150 "$AC_STEPS" 1 model.activation_checkpointing=selective
bench ac_full 150 "$AC_STEPS" 1 model.activation_checkpointing=full
for kernel in cudnn flash; do
  if usable "sdpa_$kernel"; then
    bench "sdpa_${kernel}_eager" 150 "$AC_STEPS" 1 --kernel "$kernel"
  else
    record "sdpa_${kernel}_eager" skipped 0 0 "sdpa kernel $kernel cannot run here: $(why_not "sdpa_$kernel")"
  fi
done
for backend in flash te; do
  if usable "$backend"; then
    bench "${backend}_eager" 150 "$AC_STEPS" 1 "model.arch.attention_backend=$backend"
    bench "${backend}_compiled" 240 "$AC_STEPS" 1 "model.arch.attention_backend=$backend" model.compile=true
  else
    record "${backend}_eager" skipped 0 0 "$(why_not "$backend")"
  fi
done
rm -rf "$SCRATCH/ckpt"
CKPT=(--trainer.strategy.init_args.meta_init=true --trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint
      "--trainer.callbacks.dirpath=$SCRATCH/ckpt" "--trainer.callbacks.every_n_train_steps=$CKPT_STEPS"
      --trainer.callbacks.save_last=link)
if fit fit_fsdp2_meta_ckpt 150 "$CKPT_STEPS" "${CKPT[@]}"; then
  fit fit_fsdp2_meta_resume 120 $(( CKPT_STEPS + 2 )) "${CKPT[@]}" --ckpt_path=last
else
  record fit_fsdp2_meta_resume skipped 0 0 "needs the checkpoint of fit_fsdp2_meta_ckpt"
fi
du -sh "$SCRATCH/ckpt" 2>/dev/null | sed 's/^/[gpu_check] distributed checkpoint size: /'
rm -rf "$SCRATCH/ckpt"

echo "[gpu_check] stages done in $(( $(date +%s) - START ))s; summary:"
$PY benchmarks/gpu_check.py summary "$OUT" >"$OUT/logs/summary.log" 2>&1 \
  || echo "[gpu_check] summary failed (logs/summary.log)"
cat "$OUT/summary.md" 2>/dev/null
echo "[gpu_check] everything is in $OUT (total $(( $(date +%s) - START ))s)"
