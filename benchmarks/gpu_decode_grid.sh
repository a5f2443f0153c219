#!/usr/bin/env bash
# Issue 19: decode at the memory-bandwidth floor with the split-KV paged kernel (llumnix/engine/paged_attention.py),
# as run on the device machine (one H200, torch and Triton preinstalled; pydantic and its needs carried as wheels in
# .whl/, installed here if present). Usage: bash benchmarks/gpu_decode_grid.sh [all|tests|kernel|grid|determinism]
#   tests        the kernel's tests on CUDA (float64 reference, batch invariance, CUDA-graph replay) and the engine's
#   kernel       the kernel alone vs the copy bandwidth, over shapes x batch x context x kernel constants
#                -> benchmarks/<gpu>-decode-kernel.csv (benchmarks/gpu_decode_kernel.py)
#   grid         LLaMA-7B bf16 decode steps (CUDA graphs + paged kernel) over batch {1,8,32,128,256} x context
#                {512,2048,8192} where the KV fits, split-KV (512) and one partition per sequence (8192/64/4/1: the
#                kernel before split-KV) -> benchmarks/<gpu>-decode-grid.csv: step time, floor and ratio per cell
#   determinism  bf16 determinism and batch invariance with the split kernel -> $OUT/<gpu>-determinism-splitkv.csv
#   fused        the fused element-wise kernels (llumnix/engine/fused_ops.py): their tests on CUDA, the grid with them
#                (the default) and without -> benchmarks/<gpu>-decode-grid-fused.csv, -unfused.csv; the step breakdown
#                with them -> benchmarks/<gpu>-step-breakdown-fused.csv; bf16 determinism and a migration's token
#                identity with them -> benchmarks/<gpu>-determinism-fused.csv, <gpu>-migration-fused.csv
#   store        the rotary and the KV cache write as one kernel (fused_ops.rope_store): the fused kernels' tests on
#                CUDA, the grid -> benchmarks/<gpu>-decode-grid-store.csv (and with split-KV at every batch, never one
#                pass: ...-grid-store-split.csv), the step breakdown -> ...-step-breakdown-store.csv, bf16 determinism
#                and a migration's token identity -> ...-determinism-store.csv, ...-migration-store.csv
#   address      the kernel's block ids per block and 32-bit offsets (paged_attention.TABLE_PER_BLOCK, OFFS32; the
#                kernel alone: python3 benchmarks/gpu_kernel_variants.py): the kernel's and the engine's tests on CUDA,
#                the grid -> benchmarks/<gpu>-decode-grid-address.csv, the step breakdown, bf16 determinism and a
#                migration's token identity -> ...-step-breakdown-address.csv, -determinism-address.csv,
#                -migration-address.csv
#   order        the kernel's program order (paged_attention.HEAD_MAJOR: neighbouring programs read neighbouring KV
#                heads of the same tokens) against the current order, the kernel alone over batch x context ->
#                benchmarks/<gpu>-decode-kernel-order.csv; where a step's wall time goes besides its kernels (input
#                fill, replay, sampling) -> benchmarks/<gpu>-step-host.csv; the grid with HEAD_MAJOR on ->
#                benchmarks/<gpu>-decode-grid-order.csv
#   tiles        the kernel with HEAD_MAJOR, 512-token partitions and 128-token tiles (then the defaults; 256-token
#                partitions came back with p256): its tests and the engine's on CUDA, SmolLM2's shape against the
#                constants before (the kernel alone) ->
#                benchmarks/<gpu>-decode-kernel-smollm2-tiles.csv, the engine's checks -> ...-tile128.csv
#   host         the static step's inputs packed and sent asynchronously: the engine's tests on CUDA, where a step's
#                wall time goes (benchmarks/gpu_step_host.py) -> benchmarks/<gpu>-step-host.csv, the engine's checks
#                -> ...-host.csv
#   dynamic      the kernel's tile loops bounded by each sequence's context in both modes against the fixed trip
#                counts, the kernel alone -> benchmarks/<gpu>-decode-kernel-dynamic.csv; so in the engine: where a
#                step's time goes -> ...-step-host-dynamic.csv, the grid -> ...-decode-grid-dynamic.csv (the CSVs: run
#                with the switch of then, DYNAMIC, which also bounded the partitions' loop and had pipelined variants,
#                DYNAMIC=2 / 3; the commands below use today's switches, DYNAMIC_ONE_PASS and DYNAMIC_SPLIT)
#   onepass      the tile loop bounded by the context in one pass only (the default since): the kernel alone against
#                the fixed counts and against bounded loops in split-KV too -> benchmarks/<gpu>-decode-kernel-onepass.csv,
#                the engine's checks -> ...-onepass.csv, where a step's time goes -> ...-step-host-onepass.csv
#   smollm2      SmolLM2's shape with the split-KV partitions capped at 8 tiles (MAX_PARTITION_TILES: a default from
#                then until 256-token partitions came back, which made it moot)
#                against the constants before the day's tile changes, the kernel alone ->
#                benchmarks/<gpu>-decode-kernel-smollm2-cap.csv; the kernel's tests on CUDA
#   hostprof     where a step's host time goes (cProfile over 200 steps at 1 x 512, 8 x 2k, 128 x 512) ->
#                $OUT/<gpu>-step-host-cprofile.txt; the grid with 256-token partitions for LLaMA-7B (PARTITION=256)
#                -> benchmarks/<gpu>-decode-grid-p256.csv
#   p256         the engine with 256-token partitions again (the default since): its checks -> ...-p256b.csv (the
#                grid: -decode-grid-p256b.csv), where a step's time goes -> ...-step-host-p256.csv; the profile
#   blasws       captured decode steps with no cuBLAS workspace (runner.DECODE_GRAPH_BLAS_WORKSPACE: no split-K in
#                their products): the engine's checks -> ...-blasws.csv, where a step's time goes ->
#                ...-step-host-blasws.csv, prefill (keeps torch's workspace) -> ...-prefill-floor-blasws.csv, the
#                engine's CUDA tests (-blasws-control.*: a first run whose setting did nothing, torch 2.11 having no
#                cublas_workspace_size: the defaults' files)
#   partitions   split-KV's constants (PARTITION/TILE/WARPS/PROGRAMS_PER_SM, $PARTITION_CONFIGS, the first the
#                reference) at batch 1-16, LLaMA-7B's and SmolLM2's shapes, the kernel alone ->
#                benchmarks/<gpu>-decode-kernel-partitions.csv; the engine's grid at batch 1-16 under each of
#                $PARTITION_ENGINE (NAME=INT+NAME=INT entries, e.g. PARTITION=256 for the defaults) ->
#                ...-decode-grid-part-<entry>.csv; where a step's time goes with the sampling inside the graph ->
#                ...-step-host-argmax.csv
#   tilescale    split-KV's constants for one 128-token tile (2 warps, 16 programs per SM; scaled with smaller tiles,
#                paged_attention.split_constants): the CUDA tests; one pass's warps at batch 32-256, the kernel alone ->
#                benchmarks/<gpu>-decode-kernel-full-warps.csv; the grid -> ...-decode-grid-tilescale.csv; where a
#                step's time goes -> ...-step-host-tilescale.csv
#   tilescale-checks  with one pass's 2 warps from 8 programs per SM: the CUDA tests, the engine's checks ->
#                ...-tilescale.csv (the grid's: -decode-grid-tilescale.csv; tilescale's own grid, one pass still with 4
#                warps then, was kept as -decode-grid-tilescale-4warps.csv), where a step's
#                time goes, with a profiled timeline of host and GPU per call -> ...-step-host-timeline.csv; SmolLM2's
#                one pass with 1, 2 and 4 warps, the kernel alone -> ...-decode-kernel-smollm2-full-warps.csv
#   hostsplit    a decode call's parts chained, one part fewer each -> ...-step-host-decompose.csv; the grid again ->
#                ...-decode-grid-tilescale-2.csv
#   copy1        the static step's inputs in one packed buffer, one copy a step: the engine's CUDA tests, its checks ->
#                ...-copy1.csv, a decode call's parts -> ...-step-host-copy1.csv, the grid again ->
#                ...-decode-grid-copy1-2.csv; the profile
#   spread       the decode step at batch 1 and 8 x 512 and 2k in four processes one after another, the GPU's clocks,
#                power and throttle reasons logged every 250 ms meanwhile: is the first process's slower step the GPU's
#                or the host's -> ...-decode-spread-{1..4}.csv, ...-decode-spread-clocks.csv
#   profile      the simulator's h200-llama-7b profile re-measured with the engine as it is -> llumnix/profiles/
# Everything also goes under $OUT, with the log. Expected: about 6-7 minutes for all on an H200.
set -u
WHAT=${1:-all}
. benchmarks/gpu_env.sh
# The engine as it is, its files named by $1: the decode grid, the step breakdown, bf16 determinism, a migration's
# token identity -> benchmarks/$G-decode-grid-$1.csv, -step-breakdown-$1.csv, -determinism-$1.csv, -migration-$1.csv
engine_checks() {
  timeout 200 $L bench decode-floor --device cuda --model llama-7b --dtype bfloat16 --batch 1,8,32,128,256 \
    --context 512,2048,8192 -o "benchmarks/$G-decode-grid-$1.csv" && cp "benchmarks/$G-decode-grid-$1.csv" "$OUT/"
  timeout 120 $L bench step-breakdown --device cuda --model llama-7b --dtype bfloat16 --cells 1x512,32x2048,128x512 \
    -o "benchmarks/$G-step-breakdown-$1.csv" && cp "benchmarks/$G-step-breakdown-$1.csv" "$OUT/"
  timeout 200 $L bench determinism --device cuda --model llama-7b --dtype bfloat16 --lengths 512,4096 \
    --batches 1,3,32 --output-tokens 48 --repeats 2 --modes graphs+kernel,graphs+kernel+invariant \
    -o "benchmarks/$G-determinism-$1.csv" && cp "benchmarks/$G-determinism-$1.csv" "$OUT/"
  timeout 120 $L bench migration --device cuda --model llama-7b --dtype bfloat16 --lengths 512,4096 \
    --output-tokens 64 --migrations 2 --repeats 1 --transports device -o "benchmarks/$G-migration-$1.csv" \
    && cp "benchmarks/$G-migration-$1.csv" "$OUT/"
}
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  if run tests; then
    timeout 240 python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_paged_attention.py \
      tests/test_engine_model.py -k "split or paged or invariant or static or cuda" 2>&1 | tail -30
  fi
  if run kernel; then
    C=256/64/4/4/4,512/64/4/4/4,512/32/4/4/1,256/64/4/4/0,8192/64/4/1/0  # P/tile/warps/per SM/one pass from
    timeout 300 python3 benchmarks/gpu_decode_kernel.py --batches 1,8,32,128 --contexts 512,2048,8192 --configs $C \
      -o "benchmarks/$G-decode-kernel.csv" && cp "benchmarks/$G-decode-kernel.csv" "$OUT/"
  fi
  if run grid; then
    # one process per kernel config: re-capturing CUDA graphs in one process after a constants change failed in the
    # caching allocator (torch 2.11), and the second config then ran eagerly
    timeout 200 $L bench decode-floor --device cuda --model llama-7b --dtype bfloat16 --batch 1,8,32,128,256 \
      --context 512,2048,8192 -o "benchmarks/$G-decode-grid.csv" && cp "benchmarks/$G-decode-grid.csv" "$OUT/"
    timeout 200 $L bench decode-floor --device cuda --model llama-7b --dtype bfloat16 --batch 1,8,32 \
      --context 512,2048,8192 --kernel-configs 8192/64/4/1/0 -o "benchmarks/$G-decode-grid-presplit.csv" \
      && cp "benchmarks/$G-decode-grid-presplit.csv" "$OUT/"
  fi
  if run determinism; then
    timeout 240 $L bench determinism --device cuda --model llama-7b --dtype bfloat16 --lengths 512,4096 \
      --batches 1,3,32 --output-tokens 48 --repeats 3 \
      --modes graphs+kernel,graphs+kernel+invariant,eager+kernel+invariant \
      -o "$OUT/$G-determinism-splitkv.csv"
  fi
  if [ "$WHAT" = fused ]; then
    timeout 300 python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_fused_ops.py tests/test_engine_model.py \
      -k "fused or cuda or static or paged or invariant or model_decodes" 2>&1 | tail -15
    engine_checks fused
    timeout 150 $L bench decode-floor --device cuda --model llama-7b --dtype bfloat16 --batch 1,32,256 \
      --context 512,2048 --no-fused-ops -o "benchmarks/$G-decode-grid-unfused.csv" \
      && cp "benchmarks/$G-decode-grid-unfused.csv" "$OUT/"
  fi
  if [ "$WHAT" = store ]; then
    timeout 300 python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_fused_ops.py tests/test_engine_model.py \
      -k "fused or rope or cuda or static or paged or invariant or model_decodes" 2>&1 | tail -15
    engine_checks store
    timeout 200 $L bench decode-floor --device cuda --model llama-7b --dtype bfloat16 --batch 8,32,128,256 \
      --context 512,2048,8192 --kernel-configs 256/64/4/4/0 -o "benchmarks/$G-decode-grid-store-split.csv" \
      && cp "benchmarks/$G-decode-grid-store-split.csv" "$OUT/"
  fi
  if [ "$WHAT" = address ]; then
    timeout 300 python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_paged_attention.py tests/test_fused_ops.py \
      tests/test_engine_model.py -k "split or paged or switches or fused or rope or invariant or static or cuda" 2>&1 | tail -8
    engine_checks address
  fi
  if [ "$WHAT" = order ]; then
    timeout 200 python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_paged_attention.py -k "split or paged or switches" 2>&1 | tail -4
    timeout 240 python3 benchmarks/gpu_kernel_variants.py --batches 1,8,32,128,256 --contexts 512,2048,8192 \
      --variants address,head_major -o "benchmarks/$G-decode-kernel-order.csv" && cp "benchmarks/$G-decode-kernel-order.csv" "$OUT/"
    timeout 120 python3 benchmarks/gpu_step_host.py --cells 1x512,32x2048,128x512,256x512 -o "benchmarks/$G-step-host.csv" \
      && cp "benchmarks/$G-step-host.csv" "$OUT/"
    timeout 200 python3 -c "import runpy, sys; import llumnix.engine.paged_attention as pa; pa.HEAD_MAJOR = True
sys.argv[0] = 'llumnix.bench.cli'; runpy.run_module('llumnix.bench.cli', run_name='__main__')" bench decode-floor \
      --device cuda --model llama-7b --dtype bfloat16 --batch 1,8,32,128,256 --context 512,2048,8192 \
      -o "benchmarks/$G-decode-grid-order.csv" && cp "benchmarks/$G-decode-grid-order.csv" "$OUT/"
  fi
  if [ "$WHAT" = tiles ]; then
    timeout 300 python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_paged_attention.py tests/test_fused_ops.py \
      tests/test_engine_model.py -k "split or paged or switches or fused or rope or invariant or static or cuda" 2>&1 | tail -4
    timeout 200 python3 benchmarks/gpu_kernel_variants.py --shape smollm2-135m --batches 1,8,32,128 --contexts 512,2048,8192 \
      --variants head_major,address+PARTITION=256+BLOCK_N=64+FULL_BLOCK_N=64 \
      -o "benchmarks/$G-decode-kernel-smollm2-tiles.csv" && cp "benchmarks/$G-decode-kernel-smollm2-tiles.csv" "$OUT/"
    engine_checks tile128
  fi
  if [ "$WHAT" = host ]; then
    timeout 300 python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_engine_model.py tests/test_engine_device.py \
      -k "paged or fused or invariant or static or cuda or graph" 2>&1 | tail -4
    timeout 150 python3 benchmarks/gpu_step_host.py --cells 1x512,8x2048,32x2048,128x512,256x512 \
      -o "benchmarks/$G-step-host.csv" && cp "benchmarks/$G-step-host.csv" "$OUT/"
    engine_checks host
  fi
  if [ "$WHAT" = dynamic ]; then
    timeout 200 python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_paged_attention.py 2>&1 | tail -2
    timeout 240 python3 benchmarks/gpu_kernel_variants.py --batches 1,8,32,128,256 --contexts 512,2048,8192 \
      --variants head_major,dynamic+split \
      -o "benchmarks/$G-decode-kernel-dynamic.csv" && cp "benchmarks/$G-decode-kernel-dynamic.csv" "$OUT/"
    K="python3 benchmarks/with_kernel.py DYNAMIC_ONE_PASS=1 DYNAMIC_SPLIT=1 --"
    timeout 150 $K benchmarks/gpu_step_host.py --cells 1x512,8x2048,32x2048,128x512,256x512 \
      -o "benchmarks/$G-step-host-dynamic.csv" && cp "benchmarks/$G-step-host-dynamic.csv" "$OUT/"
    timeout 200 $K -m llumnix.bench.cli bench decode-floor --device cuda --model llama-7b --dtype bfloat16 \
      --batch 1,8,32,128,256 --context 512,2048,8192 -o "benchmarks/$G-decode-grid-dynamic.csv" \
      && cp "benchmarks/$G-decode-grid-dynamic.csv" "$OUT/"
  fi
  if [ "$WHAT" = onepass ]; then
    timeout 200 python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_paged_attention.py 2>&1 | tail -2
    timeout 240 python3 benchmarks/gpu_kernel_variants.py --batches 1,8,32,128,256 --contexts 512,2048,8192 \
      --variants head_major,dynamic,dynamic+split \
      -o "benchmarks/$G-decode-kernel-onepass.csv" && cp "benchmarks/$G-decode-kernel-onepass.csv" "$OUT/"
    engine_checks onepass
    timeout 150 python3 benchmarks/gpu_step_host.py --cells 1x512,8x2048,32x2048,128x512,256x512 \
      -o "benchmarks/$G-step-host-onepass.csv" && cp "benchmarks/$G-step-host-onepass.csv" "$OUT/"
  fi
  if [ "$WHAT" = smollm2 ]; then
    timeout 200 python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_paged_attention.py 2>&1 | tail -2
    timeout 200 python3 benchmarks/gpu_kernel_variants.py --shape smollm2-135m --batches 1,8,32,128,256 \
      --contexts 512,2048,8192 --variants address+PARTITION=256+BLOCK_N=64+FULL_BLOCK_N=64+HEAD_MAJOR=0+DYNAMIC_ONE_PASS=0,dynamic \
      -o "benchmarks/$G-decode-kernel-smollm2-cap.csv" && cp "benchmarks/$G-decode-kernel-smollm2-cap.csv" "$OUT/"
    timeout 200 python3 benchmarks/gpu_kernel_variants.py --batches 1,8,32 --contexts 512,2048,8192 \
      --variants dynamic -o "$OUT/$G-decode-kernel-llama-cap-check.csv"
  fi
  if [ "$WHAT" = hostprof ]; then
    timeout 200 python3 benchmarks/gpu_step_host.py --cells 1x512,8x2048,128x512 --cprofile 200 \
      -o "$OUT/$G-step-host-cprofile.csv" > "$OUT/$G-step-host-cprofile.txt" 2>&1; tail -150 "$OUT/$G-step-host-cprofile.txt"
    timeout 200 python3 benchmarks/with_kernel.py PARTITION=256 -- -m llumnix.bench.cli bench decode-floor --device cuda \
      --model llama-7b --dtype bfloat16 --batch 1,8,32,128,256 --context 512,2048,8192 \
      -o "benchmarks/$G-decode-grid-p256.csv" && cp "benchmarks/$G-decode-grid-p256.csv" "$OUT/"
  fi
  if [ "$WHAT" = p256 ]; then
    timeout 200 python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_paged_attention.py 2>&1 | tail -2
    engine_checks p256b
    timeout 150 python3 benchmarks/gpu_step_host.py --cells 1x512,8x2048,32x2048,128x512,256x512 \
      -o "benchmarks/$G-step-host-p256.csv" && cp "benchmarks/$G-step-host-p256.csv" "$OUT/"
  fi
  if [ "$WHAT" = blasws ]; then
    python3 -c "import torch; print('cublas_workspace_size:', hasattr(torch.backends.cuda, 'cublas_workspace_size'))"
    engine_checks blasws
    timeout 100 python3 benchmarks/gpu_step_host.py --cells 1x512,8x512,32x512,8x2048 \
      -o "benchmarks/$G-step-host-blasws.csv" && cp "benchmarks/$G-step-host-blasws.csv" "$OUT/"
    timeout 100 $L bench prefill-floor --device cuda --model llama-7b --dtype bfloat16 \
      -o "benchmarks/$G-prefill-floor-blasws.csv" && cp "benchmarks/$G-prefill-floor-blasws.csv" "$OUT/"
    timeout 150 python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_engine_model.py \
      -k "cuda or static or graph or invariant or paged" 2>&1 | tail -3
  fi
  if [ "$WHAT" = partitions ]; then
    # split-KV's constants at the batches that take it (1-16 for LLaMA-7B), the kernel alone; the engine's steps at
    # batch 1-16 under candidates; where a step's time goes with the greedy sampling inside the graph
    timeout 240 python3 benchmarks/gpu_decode_kernel.py --shapes llama-7b,smollm2-135m --batches 1,2,4,8,16 \
      --contexts 512,2048,8192 --configs "$PARTITION_CONFIGS" \
      -o "benchmarks/$G-decode-kernel-partitions.csv" && cp "benchmarks/$G-decode-kernel-partitions.csv" "$OUT/"
    timeout 100 python3 benchmarks/gpu_step_host.py --cells 1x512,8x512,32x512,8x2048 \
      -o "benchmarks/$G-step-host-argmax.csv" && cp "benchmarks/$G-step-host-argmax.csv" "$OUT/"
    for c in $PARTITION_ENGINE; do  # NAME=INT+NAME=INT...: paged_attention constants
      timeout 100 python3 benchmarks/with_kernel.py ${c//+/ } -- -m llumnix.bench.cli bench decode-floor --device cuda \
        --model llama-7b --dtype bfloat16 --batch 1,8,16 --context 512,2048,8192 \
        -o "benchmarks/$G-decode-grid-part-${c//[=+]/-}.csv" && cp "benchmarks/$G-decode-grid-part-${c//[=+]/-}.csv" "$OUT/"
    done
  fi
  if [ "$WHAT" = tilescale ] || [ "$WHAT" = tilescale-checks ]; then
    # split-KV's constants for one tile (128 tokens, 2 warps, 16 programs per SM for LLaMA-7B; scaled with smaller
    # tiles): the kernel's and the engine's CUDA tests; one pass's warps at batch 32-256 (the kernel alone)
    timeout 200 python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_paged_attention.py tests/test_fused_ops.py \
      tests/test_engine_model.py 2>&1 | tail -2
  fi
  if [ "$WHAT" = tilescale ]; then
    timeout 200 python3 benchmarks/gpu_kernel_variants.py --batches 32,64,128,256 --contexts 512,2048,8192 \
      --variants FULL_NUM_WARPS=4,FULL_NUM_WARPS=2,FULL_NUM_WARPS=1,FULL_PROGRAMS_PER_SM=8 \
      -o "benchmarks/$G-decode-kernel-full-warps.csv" && cp "benchmarks/$G-decode-kernel-full-warps.csv" "$OUT/"
    timeout 200 $L bench decode-floor --device cuda --model llama-7b --dtype bfloat16 --batch 1,8,32,128,256 \
      --context 512,2048,8192 -o "benchmarks/$G-decode-grid-tilescale.csv" && cp "benchmarks/$G-decode-grid-tilescale.csv" "$OUT/"
    timeout 100 python3 benchmarks/gpu_step_host.py --cells 1x512,8x512,32x512,8x2048 \
      -o "benchmarks/$G-step-host-tilescale.csv" && cp "benchmarks/$G-step-host-tilescale.csv" "$OUT/"
  fi
  if [ "$WHAT" = tilescale-checks ]; then
    # with one pass's 2 warps from 8 programs per SM (FULL_NUM_WARPS, FULL_PROGRAMS_PER_SM)
    engine_checks tilescale
    timeout 100 python3 benchmarks/gpu_step_host.py --cells 1x512,8x512,32x512,8x2048 --timeline 20 \
      -o "benchmarks/$G-step-host-timeline.csv" && cp "benchmarks/$G-step-host-timeline.csv" "$OUT/"
    timeout 100 python3 benchmarks/gpu_kernel_variants.py --shape smollm2-135m --batches 384,512 --contexts 512,2048 \
      --variants FULL_NUM_WARPS=2,FULL_NUM_WARPS=8,FULL_NUM_WARPS=16 \
      -o "benchmarks/$G-decode-kernel-smollm2-full-warps.csv" && cp "benchmarks/$G-decode-kernel-smollm2-full-warps.csv" "$OUT/"
  fi
  if [ "$WHAT" = hostsplit ]; then
    # a decode call's parts chained, one fewer each (gpu_step_host.py --decompose); the grid a second time
    timeout 150 python3 benchmarks/gpu_step_host.py --cells 1x512,8x512,32x512 --decompose \
      -o "benchmarks/$G-step-host-decompose.csv" && cp "benchmarks/$G-step-host-decompose.csv" "$OUT/"
    timeout 200 $L bench decode-floor --device cuda --model llama-7b --dtype bfloat16 --batch 1,8,32,128,256 \
      --context 512,2048,8192 -o "benchmarks/$G-decode-grid-tilescale-2.csv" && cp "benchmarks/$G-decode-grid-tilescale-2.csv" "$OUT/"
  fi
  if [ "$WHAT" = spread ]; then
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,pstate,clocks_throttle_reasons.active \
      --format=csv -lms 250 > "$OUT/$G-decode-spread-clocks.csv" &
    CLOCKS=$!
    for i in 1 2 3 4; do
      date -u +%T.%N
      timeout 100 $L bench decode-floor --device cuda --model llama-7b --dtype bfloat16 --batch 1,8 --context 512,2048 \
        -o "$OUT/$G-decode-spread-$i.csv" 2>&1 | grep "decode batch"
    done
    kill $CLOCKS
  fi
  if [ "$WHAT" = copy1 ]; then
    # the static step's inputs sent with one copy a step (one packed buffer) instead of two
    timeout 150 python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_engine_model.py 2>&1 | tail -2
    engine_checks copy1
    timeout 150 python3 benchmarks/gpu_step_host.py --cells 1x512,8x512,32x512 --decompose \
      -o "benchmarks/$G-step-host-copy1.csv" && cp "benchmarks/$G-step-host-copy1.csv" "$OUT/"
    timeout 200 $L bench decode-floor --device cuda --model llama-7b --dtype bfloat16 --batch 1,8,32,128,256 \
      --context 512,2048,8192 -o "benchmarks/$G-decode-grid-copy1-2.csv" && cp "benchmarks/$G-decode-grid-copy1-2.csv" "$OUT/"
  fi
  if [ "$WHAT" = profile ] || [ "$WHAT" = p256 ] || [ "$WHAT" = copy1 ]; then
    # 3 warm-up runs and 5 timed ones a point: with 1 and 3, the small prefills (host-bound, right after the start)
    # moved by up to 70% between runs (the logs of p256 and copy1)
    timeout 300 $L profile --device cuda --model llama-7b --dtype bfloat16 --num-blocks 792 --transport host \
      --warmup 3 --repeats 5 \
      -o llumnix/profiles/h200-llama-7b.json && cp llumnix/profiles/h200-llama-7b.json "$OUT/"
  fi
  date -u
} 2>&1 | tee "$OUT/log-decode-grid-$WHAT.txt"
