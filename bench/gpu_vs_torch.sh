#!/usr/bin/env bash
# The accelerator rows of BENCHMARKS.md in one go on one CUDA GPU, within BUDGET seconds:
#   1. bench.vs_torch: JAX against PyTorch on the same RN50 model of EEES (embedding of 64 images
#      with the mirrored copy, train step P=8 K=4), float32 and bfloat16;
#   2. bench.train_step: the RN50 train-step batch sweep ($SWEEP, default 8x4,16x4) in bfloat16
#      with MFU against the dense bf16 peak, then float32 (TF32 peak) if time is left. Each shape
#      compiles for about a minute on an H100 (autotuning included); the shapes compile in parallel.
#
#   bash bench/gpu_vs_torch.sh                 # writes into $OUT (default: gpu_bench_out/)
#   BUDGET=600 SWEEP=8x4,16x4,32x4 PEAK_BF16=989 PEAK_TF32=494 bash bench/gpu_vs_torch.sh
#   STAGES=train_step_bf16 bash bench/gpu_vs_torch.sh      # only that stage
#
# Needs python3 (or $PYTHON) with CUDA builds of jax and torch, flax, optax, orbax-checkpoint,
# ml_collections, chex and numpy; TensorFlow is not imported. OpenAI's clip/model.py comes from the
# installed clip-anytorch package, else from a copy of its folder: $CLIP_DIR (the folder holding
# clip/model.py) or .venv/lib/python3*/site-packages/clip in this checkout. No network.
# Peaks default to H100/H200 SXM dense figures (989 TFLOP/s bf16, 494 TF32), as BENCHMARKS.md's
# H100 rows. Each stage runs under `timeout` with what is left of BUDGET (default 220 s) and leaves
# what it measured; $OUT gets BENCHMARKS.md (the new *_gpu sections), vs_torch_gpu.md and the logs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_bench_out}
BUDGET=${BUDGET:-220}
PEAK_BF16=${PEAK_BF16:-989}
PEAK_TF32=${PEAK_TF32:-494}
SWEEP=${SWEEP:-8x4,16x4}
STAGES=${STAGES:-vs_torch,train_step_bf16,train_step_fp32}
mkdir -p "$OUT"
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
save() { cp BENCHMARKS.md "$OUT/BENCHMARKS.md"; }

# OpenAI's clip/model.py without the rest of a virtual environment on the path.
if ! $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('clip') is None)"; then
  found=""
  for d in ${CLIP_DIR:-} .venv/lib/python3*/site-packages; do
    if [ -f "$d/clip/model.py" ]; then found="$d/clip"; break; fi
  done
  if [ -z "$found" ]; then
    echo "OpenAI's clip/model.py not found: pip install --no-deps clip-anytorch==2.6.0, or set" \
         "CLIP_DIR to a folder holding clip/model.py" >&2
    exit 1
  fi
  shim=$(mktemp -d)
  ln -s "$(cd "$found" && pwd)" "$shim/clip"
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi

# JAX and PyTorch share the GPU in one process: no preallocation. The compilation cache (and with
# it XLA's autotuning results) is shared between the stages.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/eees_jax_gpu_xla_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
{ nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv 2>/dev/null || true
  $PY -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.is_available())"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
if ! $PY -c "import bench.vs_torch, bench.train_step" 2> "$OUT/import_check.txt"; then
  echo "bench/ does not import on this host (a package is missing; pip install it):" >&2
  tail -n 3 "$OUT/import_check.txt" >&2
  exit 1
fi

stage() {  # stage NAME MIN_SECONDS_LEFT COMMAND...: runs COMMAND under what is left of BUDGET
  local name=$1 need=$2; shift 2
  case ",$STAGES," in *",$name,"*) ;; *) return 0 ;; esac
  local t; t=$(left)
  if [ "$t" -lt "$need" ]; then
    echo "skipped $name: ${t} s left of BUDGET=${BUDGET}" | tee -a "$OUT/skipped.txt"
    return 0
  fi
  echo "== $name (${t} s left)"
  timeout --signal=INT "$t" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && echo "$name exited with $rc (124: cut at the budget)" | tee -a "$OUT/skipped.txt"
  save
  return 0
}

stage vs_torch 60 $PY -m bench.vs_torch --embed_batch=64 --sizes=8x4 --dtypes=float32,bfloat16 \
  --rounds=3 --calls=10 --out="$OUT"
stage train_step_bf16 45 $PY -m bench.train_step --model=rn50 --dtype=bfloat16 --steps=10 \
  --sweep="$SWEEP" --compile_parallel --peak_tflops="$PEAK_BF16"
stage train_step_fp32 90 $PY -m bench.train_step --model=rn50 --dtype=float32 --steps=10 \
  --sweep="$SWEEP" --compile_parallel --peak_tflops="$PEAK_TF32"
echo "done in $(( $(date +%s) - start )) s; results in $OUT"
