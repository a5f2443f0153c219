#!/usr/bin/env bash
# Issue 19, item 2 and the prefill floor, as run on the device machine (one H200; torch and Triton preinstalled,
# pydantic and gguf carried as wheels in .whl/). Usage: bash benchmarks/gpu_migration_pacing.sh [all|tests|breakdown|prefill|chunks|fig10]
#   tests      the transfer's pacing tests on CUDA and the migration bench's CUDA tests
#   breakdown  where a LLaMA-7B decode step's time goes (kernel time by kind, torch.profiler) -> benchmarks/<gpu>-step-breakdown.csv
#   prefill    prefill of one sequence of 256..8k tokens vs FLOPs over the measured matmul rate -> benchmarks/<gpu>-prefill-floor.csv
#   chunks     the bulk stage copied whole vs CHUNK blocks per source step: decode slowdown and downtime, batch 1,
#              256..8k tokens -> benchmarks/<gpu>-migration-chunks.csv
#   fig10      Fig 10 with the engine's default pacing (device and host transports; batch 1 and batch 8)
#              -> results/fig10/<gpu>-llama-7b.csv, <gpu>-llama-7b-batch8.csv
# Everything also goes under $OUT, with the log.
set -u
WHAT=${1:-all}
. benchmarks/gpu_env.sh
mkdir -p results/fig10
M="--device cuda --model llama-7b --dtype bfloat16"
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  if run tests; then
    timeout 200 python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_bench.py \
      -k "chunk or paced or runs or cuda or exactly or async" 2>&1 | tail -15
  fi
  if run breakdown; then
    timeout 150 $L bench step-breakdown $M --cells 1x1,1x512,1x8192,32x2048,256x512 -o "benchmarks/$G-step-breakdown.csv" \
      && cp "benchmarks/$G-step-breakdown.csv" "$OUT/"
  fi
  if run prefill; then
    timeout 120 $L bench prefill-floor $M -o "benchmarks/$G-prefill-floor.csv" && cp "benchmarks/$G-prefill-floor.csv" "$OUT/"
  fi
  if run chunks; then
    rm -f "$OUT"/chunks-*.csv
    for C in 0 16 32; do
      timeout 120 $L bench migration $M --lengths 256,1024,4096,8192 --output-tokens 100 --migrations 2 --repeats 3 \
        --transports device --chunk-blocks $C -o "$OUT/chunks-$C.csv"
    done
    python3 -c "import pandas as pd, glob; pd.concat([pd.read_csv(f) for f in sorted(glob.glob('$OUT/chunks-*.csv'))]).to_csv('benchmarks/$G-migration-chunks.csv', index=False)" \
      && cp "benchmarks/$G-migration-chunks.csv" "$OUT/"
  fi
  if run fig10; then
    timeout 240 $L bench migration $M --lengths 256,512,1024,2048,4096,8192 --output-tokens 100 --migrations 2 \
      --repeats 3 --transports device,host -o "results/fig10/$G-llama-7b.csv" && cp "results/fig10/$G-llama-7b.csv" "$OUT/"
    timeout 150 $L bench migration $M --lengths 512,2048,8192 --output-tokens 100 --migrations 2 --repeats 2 \
      --batch 8 --background-tokens 512 --transports device -o "results/fig10/$G-llama-7b-batch8.csv" \
      && cp "results/fig10/$G-llama-7b-batch8.csv" "$OUT/"
  fi
  date -u
} 2>&1 | tee "$OUT/log-migration-pacing-$WHAT.txt"
