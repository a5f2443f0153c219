#!/usr/bin/env bash
# Issue 19: does cuBLAS's choice of GEMM kernels cost the small-batch decode step? At batch 1 the step's matrix
# products are 1.11x the weights' floor, two of the four per layer split over K with a separate reduction kernel
# (64 more launches a step; benchmarks/h200-step-breakdown-p256b.csv). The same decode grid (LLaMA-7B bf16, CUDA
# graphs, paged kernel) at batch {1, 8, 32} x context {512, 2048} under: torch's defaults; cuBLASLt preferred
# (TORCH_BLAS_PREFER_CUBLASLT=1); no cuBLAS workspace (CUBLAS_WORKSPACE_CONFIG=:0:0, CUBLASLT_WORKSPACE_SIZE=0: no
# split-K needing one) -> $OUT/<gpu>-decode-grid-blas-<name>.csv, and the GEMM kernels each one runs at batch 1 and 8
# -> $OUT/<gpu>-blas-kernels-<name>.txt. Compare step times (the copy bandwidth is measured per run).
# Found (one H200, torch 2.11 + CUDA 13.0, 2026-11-29; benchmarks/h200-*blas*): without a workspace cuBLAS drops split-K
# (at M=1: o_proj 8.1 + 1.5 us reduction -> 8.4 us, down 25.0 + 1.6 -> 23.6 us; 64 fewer kernels a step). Inside the
# replayed graph (host): the products 0.12-0.16 ms shorter, steps 4.60 -> 4.41 ms at 1 x 512, 5.76 -> 5.26 at 8 x 512,
# 7.43 -> 7.17 at 32 x 512; but the grid, alternated twice (abab), moved less than its spread at batch 1 and 2% at 8 and
# 32 x 512 (steps differ by up to 5% between processes of the same setting), and without a workspace prefill of
# 256-1024 tokens is 1.8-3x slower (14 -> 44 ms at 256). cuBLASLt preferred is 1-5% slower and refuses to run without
# a workspace. So not process-wide: the engine captures its decode graphs alone without one
# (runner.DECODE_GRAPH_BLAS_WORKSPACE; torch makes a workspace per stream, sized when made), measured with
# `bash benchmarks/gpu_decode_grid.sh blasws`.
# Usage: bash benchmarks/gpu_blas_choice.sh [choice|abab]
#   choice  the four settings above (the first run, 2026-11-29 -> benchmarks/h200-decode-grid-blas-*.csv, -kernels-*)
#   abab    the whole grid (batch {1,8,32,128,256} x context {512,2048,8192}) with the defaults and without a cuBLAS
#           workspace, alternated twice in separate processes (the copy bandwidth moved 3% between processes), and
#           the prefill floor with each -> $OUT/<gpu>-decode-grid-blas-{default,noworkspace}-{1,2}.csv,
#           <gpu>-prefill-floor-blas-{default,noworkspace}.csv
#   host    where the step's time goes with each (benchmarks/gpu_step_host.py at 1, 8, 32 x 512, a process each)
#           -> $OUT/<gpu>-step-host-blas-{default,noworkspace}.csv
set -u
WHAT=${1:-choice}
. benchmarks/gpu_env.sh
grid() {  # name, env assignments...
  local name=$1; shift
  env "$@" timeout 240 $L bench decode-floor --device cuda --model llama-7b --dtype bfloat16 --batch 1,8,32 \
    --context 512,2048 --repeats 20 -o "$OUT/$G-decode-grid-blas-$name.csv" 2>&1 | grep -v Warning | tail -8
  env "$@" timeout 120 python3 - "$OUT/$G-blas-kernels-$name.txt" <<'PY'
import sys, torch
from torch.profiler import profile, ProfilerActivity
torch.manual_seed(0)
shapes = {"qkv": (12288, 4096), "o_proj": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
w = {k: torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) for k, (n, kk) in shapes.items()}
with open(sys.argv[1], "w") as f:
    for m in (1, 8, 32):
        for k, (n, kk) in shapes.items():
            x = torch.randn(m, kk, device="cuda", dtype=torch.bfloat16)
            for _ in range(3):
                torch.nn.functional.linear(x, w[k])
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                for _ in range(20):
                    torch.nn.functional.linear(x, w[k])
                torch.cuda.synchronize()
            for e in p.key_averages():
                if e.device_type.name == "CUDA" and e.count:
                    f.write(f"M={m} {k} {e.key[:90]} x{e.count // 20} {e.device_time_total / 20:.2f}us\n")
PY
}
nvidia-smi -L; python3 -c "import torch; print(torch.__version__, torch.version.cuda)"
NOWS="CUBLAS_WORKSPACE_CONFIG=:0:0 CUBLASLT_WORKSPACE_SIZE=0"
if [ "$WHAT" = host ]; then
  timeout 200 python3 benchmarks/gpu_step_host.py --cells 1x512,8x512,32x512 -o "$OUT/$G-step-host-blas-default.csv"
  env $NOWS timeout 200 python3 benchmarks/gpu_step_host.py --cells 1x512,8x512,32x512 \
    -o "$OUT/$G-step-host-blas-noworkspace.csv"
  exit 0
fi
if [ "$WHAT" = abab ]; then
  for i in 1 2; do
    for name in default noworkspace; do
      if [ $name = default ]; then e=""; else e=$NOWS; fi
      env $e timeout 200 $L bench decode-floor --device cuda --model llama-7b --dtype bfloat16 --batch 1,8,32,128,256 \
        --context 512,2048,8192 -o "$OUT/$G-decode-grid-blas-$name-$i.csv" 2>&1 | grep -v Warning | tail -16
    done
  done
  timeout 100 $L bench prefill-floor --device cuda --model llama-7b --dtype bfloat16 \
    -o "$OUT/$G-prefill-floor-blas-default.csv" 2>&1 | tail -8
  env $NOWS timeout 100 $L bench prefill-floor --device cuda --model llama-7b --dtype bfloat16 \
    -o "$OUT/$G-prefill-floor-blas-noworkspace.csv" 2>&1 | tail -8
  exit 0
fi
grid default
grid cublaslt TORCH_BLAS_PREFER_CUBLASLT=1
grid noworkspace CUBLAS_WORKSPACE_CONFIG=:0:0 CUBLASLT_WORKSPACE_SIZE=0
grid lt-noworkspace TORCH_BLAS_PREFER_CUBLASLT=1 CUBLAS_WORKSPACE_CONFIG=:0:0 CUBLASLT_WORKSPACE_SIZE=0
for f in "$OUT"/$G-blas-kernels-*.txt; do echo "== $f"; cat "$f"; done
