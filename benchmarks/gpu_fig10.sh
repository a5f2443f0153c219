#!/usr/bin/env bash
# The GPU measurements behind results/fig10/, llumnix/profiles/h100-llama-7b.json and benchmarks/h100-decode-floor.json,
# as run on the device machine (one H100, torch preinstalled; pydantic and its needs carried as wheels in .whl/).
# Usage: bash benchmarks/gpu_fig10.sh [all|fig10|profile]; writes log.txt and the outputs under $OUT too.
set -u
OUT=${OUT:-/tmp/gpu-out}
WHAT=${1:-all}
mkdir -p "$OUT" results/fig10 benchmarks
export PYTHONUNBUFFERED=1 PYTHONPATH=".:${PYTHONPATH:-}"
L="python3 -m llumnix.bench.cli"
LENGTHS=256,512,1024,2048,4096,8192
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, pandas, pydantic; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'pandas', pandas.__version__, 'pydantic', pydantic.__version__)"
  if [ "$WHAT" != profile ]; then
    timeout 90 $L bench migration --device cuda --model tiny --lengths 64,256 --repeats 1 --migrations 2 \
      --output-tokens 16 --transports device,host -o "$OUT/smoke.csv"
    timeout 300 $L bench migration --device cuda --model llama-7b --dtype bfloat16 --lengths $LENGTHS \
      --output-tokens 48 --migrations 4 --repeats 5 --transports device,host -o results/fig10/h100-llama-7b.csv \
      && cp results/fig10/h100-llama-7b.csv "$OUT/"
    timeout 200 $L bench migration --device cuda --model llama-7b --dtype bfloat16 --lengths $LENGTHS \
      --output-tokens 32 --migrations 2 --repeats 3 --batch 8 --background-tokens 512 --transports device,host \
      -o results/fig10/h100-llama-7b-batch8.csv && cp results/fig10/h100-llama-7b-batch8.csv "$OUT/"
  fi
  if [ "$WHAT" != fig10 ]; then
    timeout 200 $L profile --device cuda --model llama-7b --dtype bfloat16 --num-blocks 792 --transport host \
      -o llumnix/profiles/h100-llama-7b.json && cp llumnix/profiles/h100-llama-7b.json "$OUT/"
    timeout 90 $L bench decode-floor --device cuda --model llama-7b --dtype bfloat16 --batch 32 --context 1024 \
      -o benchmarks/h100-decode-floor.json && cp benchmarks/h100-decode-floor.json "$OUT/"
  fi
  date -u
} 2>&1 | tee "$OUT/log.txt"
