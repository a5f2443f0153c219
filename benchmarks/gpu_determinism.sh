#!/usr/bin/env bash
# Issue 6: is the bf16 CUDA engine deterministic, and batch-invariant? As run on the device machine (one H100, torch
# preinstalled; pydantic and its needs carried as wheels in .whl/). Writes log.txt and the CSVs under $OUT.
# Usage: bash benchmarks/gpu_determinism.sh [probe|fig10|profile|final] (final: profile, then fig10)
set -u
OUT=${OUT:-/tmp/gpu-out}
WHAT=${1:-probe}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=".:${PYTHONPATH:-}"
L="python3 -m llumnix.bench.cli"
G=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}')  # h100 / h200: file prefix
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  if [ "$WHAT" = probe ]; then
    timeout 120 python3 -m pytest -q --tb=short tests/test_engine_model.py -k "cuda or static or paged or invariant" 2>&1 | tail -40
    timeout 420 $L bench determinism --device cuda --model llama-7b --dtype bfloat16 --lengths 512,4096 \
      --batches 1,3,32 --output-tokens 48 --repeats 3 -o "$OUT/$G-determinism-llama-7b-bf16.csv"
  fi
  if [ "$WHAT" = profile ] || [ "$WHAT" = final ]; then  # tests, the graphed modes again, the profile, the floor
    timeout 120 python3 -m pytest -q --tb=short tests/test_engine_model.py -k "cuda or static or paged or invariant" 2>&1 | tail -20
    timeout 120 $L bench determinism --device cuda --model llama-7b --dtype bfloat16 --lengths 512,4096 \
      --batches 1,3,32 --output-tokens 48 --repeats 3 --modes graphs+kernel,graphs+kernel+invariant \
      -o "$OUT/$G-determinism-llama-7b-bf16-2.csv"
    timeout 300 $L profile --device cuda --model llama-7b --dtype bfloat16 --num-blocks 792 --transport host \
      -o "$OUT/$G-llama-7b.json"
    timeout 90 $L bench decode-floor --device cuda --model llama-7b --dtype bfloat16 --batch 32 --context 1024 \
      -o "$OUT/$G-decode-floor-graphs-paged-3.json"
  fi
  if [ "$WHAT" = fig10 ] || [ "$WHAT" = final ]; then
    timeout 330 $L bench migration --device cuda --model llama-7b --dtype bfloat16 --lengths 256,512,1024,2048,4096,8192 \
      --output-tokens 48 --migrations 4 --repeats 3 --transports device,host -o "$OUT/$G-llama-7b-graphs.csv"
    timeout 200 $L bench migration --device cuda --model llama-7b --dtype bfloat16 --lengths 512,2048,8192 \
      --output-tokens 32 --migrations 2 --repeats 2 --batch 8 --background-tokens 512 --transports device \
      --invariant-batch 8 -o "$OUT/$G-llama-7b-batch8-invariant.csv"
  fi
  date -u
} 2>&1 | tee "$OUT/log-$WHAT.txt"
