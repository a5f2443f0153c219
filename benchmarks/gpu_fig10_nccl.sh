#!/usr/bin/env bash
# Fig 10 across two processes: the destination engine in a child process on the second GPU, KV over NCCL
# (results/fig10/README.md, "two H100s"), with the same-process device transport as the baseline on the same machine.
# Run on the device machine (two GPUs, torch preinstalled; pydantic and its needs carried as wheels in .whl/).
# Usage: bash benchmarks/gpu_fig10_nccl.sh [smoke|llama-7b|graphs|paced|paced-more|paced2|ab|nccl-sms|ctas1|overlap|rerun|idsab|more];
# writes the CSVs and log-WHAT.txt under $OUT.
set -u
OUT=${OUT:-/tmp/gpu-out}
WHAT=${1:-smoke}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=".:${PYTHONPATH:-}"
L="python3 -m llumnix.bench.cli"
LENGTHS=256,512,1024,2048,4096,8192
ARGS="--device cuda --dtype bfloat16 --output-tokens 48 --migrations 4 --repeats 3"
{
  date -u
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
  nvidia-smi topo -m
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', \
torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count())"
  case $WHAT in
    smoke)
      for t in nccl gloo; do
        timeout 120 $L bench migration --device cuda --model tiny --lengths 64,256 --repeats 1 --migrations 2 \
          --output-tokens 16 --transport $t -o "$OUT/smoke-$t.csv"
      done
      timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_bench.py -k cuda
      ;;
    llama-7b)
      for t in nccl device; do
        timeout 270 $L bench migration --model llama-7b $ARGS --lengths $LENGTHS --transport $t \
          -o "$OUT/h100x2-$t-llama-7b.csv"
      done
      ;;
    graphs)
      # 2026-11-26: the nccl line again with the current engine (CUDA graphs, paged decode kernel), files named by GPU
      G=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}')
      timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_bench.py -k cuda
      timeout 300 $L bench migration --model llama-7b $ARGS --lengths $LENGTHS --transport nccl \
        -o "$OUT/${G}x2-nccl-llama-7b-graphs.csv"
      ;;
    paced)
      # 2026-11-29: the nccl line with the engine as it is (one-tile split-KV, 2-warp one pass) and the bulk stage
      # paced in chunks (the default), fewer lengths and samples: the source's decode step while the bulk copies
      WHAT=x . benchmarks/gpu_env.sh > /dev/null
      timeout 200 $L bench migration --model llama-7b --device cuda --dtype bfloat16 --output-tokens 100 \
        --migrations 2 --repeats 1 --lengths 512,2048,8192 --transport nccl -o "$OUT/${G}x2-nccl-llama-7b-paced.csv"
      ;;
    paced-more)
      # 2026-11-29 (evening): more samples of the paced bulk stage at the shorter lengths, chunks of 16 blocks (the
      # default) and of 8
      WHAT=x . benchmarks/gpu_env.sh > /dev/null
      for c in 16 8; do
        timeout 240 $L bench migration --model llama-7b --device cuda --dtype bfloat16 --output-tokens 100 \
          --migrations 4 --repeats 2 --lengths 256,512,1024 --transport nccl --chunk-blocks $c \
          -o "$OUT/${G}x2-nccl-llama-7b-paced-c$c.csv"
      done
      ;;
    paced2)
      # 2026-11-29 (evening): the paced line at every length with more samples; run with a change since reverted (block
      # ids through pinned memory, the receive on the channel's own stream:
      # benchmarks/logs/h200x2-serve-migration-2.txt) -> benchmarks/h200x2-nccl-llama-7b-paced-change.csv. The same
      # change against the code as it is, interleaved, twice (ab: the change applied for the -change runs) ->
      # benchmarks/h200x2-nccl-ab-{head,change}-{1,2}.csv
      WHAT=x . benchmarks/gpu_env.sh > /dev/null
      timeout 300 $L bench migration --model llama-7b --device cuda --dtype bfloat16 --output-tokens 160 \
        --migrations 4 --repeats 1 --lengths $LENGTHS --transport nccl -o "$OUT/${G}x2-nccl-llama-7b-paced-2.csv"
      ;;
    ab)
      WHAT=x . benchmarks/gpu_env.sh > /dev/null
      for i in 1 2; do
        timeout 200 $L bench migration --model llama-7b --device cuda --dtype bfloat16 --output-tokens 160 \
          --migrations 4 --repeats 1 --lengths 512,2048,8192 --transport nccl -o "$OUT/${G}x2-nccl-ab-$i.csv"
      done
      ;;
    nccl-sms)
      # 2026-11-29 (evening): NCCL's own kernels share the source's SMs with its decode step while the bulk stage
      # copies: the paced line under NCCL settings that give the transfer fewer of them (or the copy engines), default
      # first
      WHAT=x . benchmarks/gpu_env.sh > /dev/null
      for v in default NCCL_MAX_CTAS=1 NCCL_MAX_P2P_NCHANNELS=1 NCCL_P2P_USE_CUDA_MEMCPY=1; do
        env $([ $v = default ] || echo $v) timeout 150 $L bench migration --model llama-7b --device cuda \
          --dtype bfloat16 --output-tokens 160 --migrations 4 --repeats 1 --lengths 512,2048,8192 --transport nccl \
          -o "$OUT/${G}x2-nccl-sms-${v%%=*}.csv" 2>&1 | grep -A4 "^transport"
      done
      ;;
    ctas1)
      # NCCL_MAX_CTAS=1 broke token and KV identity at 8k (3 stages) in nccl-sms: again, paced and in one go
      WHAT=x . benchmarks/gpu_env.sh > /dev/null
      for c in 16 0; do
        NCCL_MAX_CTAS=1 timeout 120 $L bench migration --model llama-7b --device cuda --dtype bfloat16 \
          --output-tokens 160 --migrations 4 --repeats 1 --lengths 4096,8192 --transport nccl --chunk-blocks $c \
          -o "$OUT/${G}x2-nccl-ctas1-c$c.csv"
      done
      ;;
    overlap)
      # 2026-11-29 (night): the CUDA tests, then NCCL_MAX_CTAS=1's 8k case with output tokens enough for its slower
      # stages (in ctas1 the third of four migrations aborted as the request finished, which the CSV then showed as
      # not identical), then the line at every length twice. Run at 51b2642 with a change to the sends since
      # reverted (benchmarks/logs/h200x2-fig10-nccl-overlap.txt; its A/B: h200x2-fig10-nccl-overlap-ab.txt, the
      # mode overlap-ab at 7072786).
      WHAT=x . benchmarks/gpu_env.sh > /dev/null
      timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_bench.py -k cuda
      NCCL_MAX_CTAS=1 timeout 120 $L bench migration --model llama-7b --device cuda --dtype bfloat16 \
        --output-tokens 400 --migrations 4 --repeats 1 --lengths 8192 --transport nccl \
        -o "$OUT/${G}x2-nccl-ctas1-out400.csv"
      for i in 1 2; do
        timeout 200 $L bench migration --model llama-7b --device cuda --dtype bfloat16 --output-tokens 160 \
          --migrations 4 --repeats 1 --lengths $LENGTHS --transport nccl -o "$OUT/${G}x2-nccl-overlap-$i.csv"
      done
      ;;
    rerun)
      # 2026-11-30: the line at every length twice again, after the engine's block ids through pinned memory and its
      # tokens read back through pinned memory: at f6f2d2c (with the NCCL waits' backed-off checks, since reverted)
      # -> benchmarks/...-backoff-{1,2}.csv; at 5ac476f -> split-3, split-4. RUNS="5 6": after the block ids went
      # back to a plain copy on the default stream (the bench's processes; 8f06b02)
      WHAT=x . benchmarks/gpu_env.sh > /dev/null
      for i in ${RUNS:-3 4}; do
        timeout 200 $L bench migration --model llama-7b --device cuda --dtype bfloat16 --output-tokens 160 \
          --migrations 4 --repeats 1 --lengths $LENGTHS --transport nccl -o "$OUT/${G}x2-nccl-llama-7b-split-$i.csv"
      done
      ;;
    idsab)
      # 2026-11-30: rerun's way back (the child process the source) was +0.9..+10.1% where split-1/2 (7072786) had
      # -2.2..+3.9%; A/B of the suspect, the KV pool's block ids through pinned memory (kv_cache.block_index) against
      # the pageable ids before (the probe LLUMNIX_PROBE_PAGEABLE_IDS, in both processes), interleaved, twice
      WHAT=x . benchmarks/gpu_env.sh > /dev/null
      for i in 1 2; do
        for v in pinned: pageable:1; do
          IFS=: read -r name pg <<< "$v"
          LLUMNIX_PROBE_PAGEABLE_IDS=$pg PYTHONPATH="benchmarks/probes:$PYTHONPATH" timeout 100 $L bench migration \
            --model llama-7b --device cuda --dtype bfloat16 --output-tokens 160 --migrations 4 --repeats 1 \
            --lengths 1024,2048,8192 --transport nccl -o "$OUT/${G}x2-nccl-ids-$name-$i.csv"
        done
      done
      ;;
    more)
      # the paper's transport (gloo: through host memory) between the same two processes / GPUs, fewer samples
      timeout 200 $L bench migration --model llama-7b --device cuda --dtype bfloat16 --output-tokens 32 \
        --migrations 2 --repeats 2 --lengths $LENGTHS --transport gloo -o "$OUT/h100x2-gloo-llama-7b.csv"
      # LLaMA-30B: 65 GB of bf16 weights, so one instance per GPU only (no same-process baseline), up to 4k tokens
      timeout 370 $L bench migration --model llama-30b $ARGS --lengths 256,512,1024,2048,4096 --transport nccl \
        -o "$OUT/h100x2-nccl-llama-30b.csv"
      ;;
  esac
  date -u
} 2>&1 | tee "$OUT/log-$WHAT.txt"
