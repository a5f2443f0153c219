#!/usr/bin/env bash
# Issue 19, item 2 in the serving cluster: benchmarks/serve_migration.py on two GPUs (`llumnix serve`'s two instance
# actors under Ray, one per GPU, LLaMA-7B's shape in bf16, KV over NCCL, 8 background requests decoding): the
# source's decode steps during a migration's non-final stages against before, the downtime, per prompt length.
# Usage: bash benchmarks/gpu_serve_migration.sh RUN -> benchmarks/<gpu>x2-serve-migration-nccl-RUN.csv (with its raw
# logs, -steps.csv and -migrations.csv, and the destination's side, -destination.csv, since they are written), and
# the log under $OUT (more files than the device returns a call: tar them there). Runs 1 and 2 first run the
# serving test over NCCL (tests/test_dist_transport.py: migrations both ways, a broken channel, tokens equal to an
# unmigrated run's, no leaked block).
#   1  2026-11-29, the serving path as it was: block ids sent to the GPU from pageable memory (the event loop waited
#      for the decode step in flight at every chunk read or written), the destination's receive behind its step
#   2  block ids through pinned memory, the receive on the channel's own stream (no better: reverted, the change is
#      in benchmarks/logs/h200x2-serve-migration-2.txt's header)
#   3  2026-11-29 (night): the migration's KV reads, sends, receives and writes on a CUDA stream of their own
#      (kv_transport.TorchDistTransport.kv_stream), each stage ordered after the steps before it, not behind the step
#      in flight on either side (its trace: trace-3, gpu_serve_migration.sh trace at that commit)
#   4  and block ids sent from pinned memory (the host no longer waits), NCCL's and the KV stream's kernels at high
#      priority (a running step no longer holds them back); its trace: trace-4
#   5  and the engine's tokens read back through pinned memory (not tolist's pageable copy, during which other threads'
#      CUDA calls waited for the step); its trace: trace-5
#   6  (2026-11-30, 2f71ff2) and the final stage's copy carrying the COMMIT (86e2620: one Ray round trip less; on the 2-core
#      VM the downtime's median 8.0 -> 4.1-6.0 ms, benchmarks/logs/vm-serve-downtime-cpu.txt); then trace
#   7  (2026-11-30, f6f2d2c) unpaced with the NCCL waits' backed-off checks (reverted since); in pollab below
#   8  (not run yet) the server as it is since 8f06b02: back to back (kv_paced off: it measured no gain in the
#      step-to-step interval), block ids pinned on the KV stream only
#   paced  as 6, with --kv-paced: a non-final stage sends at most one chunk (16 blocks) per source step, as the
#      engine bench paces its bulk stage (serving, back to back, the source's step was +8..+17% in runs 3-5)
#   pollab  (2026-11-30) paced, three ways, one after another: "poll0" the NCCL waits' completion checks 20 us
#      apart throughout (as in 6 and paced), "backoff" the checks backing off (dist_channel._POLL_BACKOFF: a few
#      wake-ups per millisecond of a bulk chunk's wait instead of fifty), "switch" that and the interpreter's thread
#      switch interval at 0.5 ms (a probe: the step thread waits less for the event loop's turn); then run 7, unpaced
#      with the backoff -> ...-nccl-paced-{poll0,backoff,switch}.csv, ...-nccl-7.csv. Ran at f6f2d2c: no gain
#      beyond the noise in serving, and the Fig 10 bench's way back (a synchronous sender: its next step waits for
#      the chunk's completion to be seen) slowed +2.7..+10.6% (gpu_fig10_nccl.sh rerun): the backoff was reverted
#   p2p4   paced twice at 4ba9887 (the backoff on), as is and with NCCL_MAX_P2P_NCHANNELS=4 (an NCCL send kernel that waits on the
#      GPU for the destination's receive holds an SM per channel meanwhile, at high priority, beside the source's
#      step: fewer channels, fewer SMs held) -> ...-nccl-paced-{again,p2p4}.csv
#   chunks  (not run yet) back to back with 64 blocks per send and with each stage in one send: fewer host calls
#      per stage (each chunk costs the source's event loop 0.3-1.1 ms beside its steps; over NVLink the copy takes a
#      small share of the source's HBM) -> ...-nccl-chunks-{64,0}.csv
#   probe  the serving path as in 1, 512 and 2048 tokens twice each, under probes (benchmarks/probes/
#      sitecustomize.py): the interpreter's thread switch interval at 0.5 ms instead of 5 ms; an NCCL transfer's
#      completion checked every 1 ms instead of 20 us; both -> ...-probe-{default,switch,poll,both}.csv
#   gloo   the paper's transport (torch.distributed gloo: through host memory) between the same two GPUs, 600 output
#      tokens (a bulk stage through the host takes longer), 2 migrations a length -> ...-serve-migration-gloo.csv
#   trace  512 and 2048 tokens once each with the migration path's calls timed (the probe's LLUMNIX_PROBE_TRACE) ->
#      ...-serve-migration-trace.csv and -trace.tgz (one CSV per process: call, start, end, thread)
# (1, 2, probe and trace ran an earlier serve_migration.py: a 160-token warm-up, mean intervals; the probe "both"
# failed there, its warm-up's second migration not started by its last token: the warm-up is longer since; gloo ran
# before the median step durations were written.)
# Ray and the server's other needs travel as wheels in .whl2/ (how to make them: benchmarks/gpu_serve_nccl.sh);
# carry .whl and .whl2.
set -u
RUN=${1:?usage: gpu_serve_migration.sh RUN}
WHAT=serve
. benchmarks/gpu_env.sh
{
  date -u
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
  python3 -c "import torch, ray, httpx, pandas; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', \
torch.cuda.nccl.version(), 'ray', ray.__version__, 'gpus', torch.cuda.device_count())"
  if [ "$RUN" = gloo ]; then
    timeout 400 python3 benchmarks/serve_migration.py --device cuda --model llama-7b --dtype bfloat16 \
      --kv-transport gloo --lengths 512,2048,7168 --repeats 2 --background 8 --output-tokens 600 \
      -o "benchmarks/${G}x2-serve-migration-gloo.csv" && cp benchmarks/${G}x2-serve-migration-gloo*.csv "$OUT/"
  elif [ "$RUN" = trace ]; then
    mkdir -p /tmp/trace
    LLUMNIX_PROBE_TRACE=/tmp/trace PYTHONPATH="benchmarks/probes:$PYTHONPATH" timeout 150 python3 \
      benchmarks/serve_migration.py --device cuda --model llama-7b --dtype bfloat16 --kv-transport nccl \
      --lengths 512,2048 --repeats 1 --background 8 -o "$OUT/${G}x2-serve-migration-trace.csv"
    tar czf "$OUT/${G}x2-serve-migration-trace.tgz" -C /tmp/trace .
  elif [ "$RUN" = pollab ]; then
    for p in poll0:0: backoff:: switch::0.0005; do
      IFS=: read -r name backoff sw <<< "$p"
      LLUMNIX_PROBE_POLL_BACKOFF=$backoff LLUMNIX_PROBE_SWITCH_S=$sw PYTHONPATH="benchmarks/probes:$PYTHONPATH" \
        timeout 200 python3 benchmarks/serve_migration.py --device cuda --model llama-7b --dtype bfloat16 \
        --kv-transport nccl --kv-paced --lengths 512,2048,7680 --repeats 3 --background 8 \
        -o "$OUT/${G}x2-serve-migration-nccl-paced-$name.csv"
    done
    timeout 200 python3 benchmarks/serve_migration.py --device cuda --model llama-7b --dtype bfloat16 \
      --kv-transport nccl --lengths 512,2048,7680 --repeats 3 --background 8 -o "$OUT/${G}x2-serve-migration-nccl-7.csv"
  elif [ "$RUN" = chunks ]; then
    for c in 64 0; do
      timeout 200 python3 benchmarks/serve_migration.py --device cuda --model llama-7b --dtype bfloat16 \
        --kv-transport nccl --kv-chunk-blocks $c --lengths 512,2048,7680 --repeats 3 --background 8 \
        -o "$OUT/${G}x2-serve-migration-nccl-chunks-$c.csv"
    done
  elif [ "$RUN" = p2p4 ]; then
    for p in again: p2p4:4; do
      IFS=: read -r name ch <<< "$p"
      env ${ch:+NCCL_MAX_P2P_NCHANNELS=$ch} timeout 200 python3 benchmarks/serve_migration.py --device cuda \
        --model llama-7b --dtype bfloat16 --kv-transport nccl --kv-paced --lengths 512,2048,7680 --repeats 3 \
        --background 8 -o "$OUT/${G}x2-serve-migration-nccl-paced-$name.csv"
    done
  elif [ "$RUN" = probe ]; then
    for p in default:: switch:0.0005: poll::0.001 both:0.0005:0.001; do
      IFS=: read -r name sw poll <<< "$p"
      LLUMNIX_PROBE_SWITCH_S=$sw LLUMNIX_PROBE_POLL_S=$poll PYTHONPATH="benchmarks/probes:$PYTHONPATH" timeout 150 \
        python3 benchmarks/serve_migration.py --device cuda --model llama-7b --dtype bfloat16 --kv-transport nccl \
        --lengths 512,2048 --repeats 2 --background 8 -o "benchmarks/${G}x2-serve-migration-probe-$name.csv" \
        && cp "benchmarks/${G}x2-serve-migration-probe-$name.csv" "$OUT/"  # not the raw logs: $OUT returns 8 files at most
    done
  elif [ "$RUN" = paced ]; then
    timeout 420 python3 benchmarks/serve_migration.py --device cuda --model llama-7b --dtype bfloat16 \
      --kv-transport nccl --kv-paced --lengths 512,2048,7680 --repeats 3 --background 8 \
      -o "benchmarks/${G}x2-serve-migration-nccl-paced.csv" && cp benchmarks/${G}x2-serve-migration-nccl-paced*.csv "$OUT/"
  else
    timeout 300 python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_dist_transport.py -k nccl --durations=3
    timeout 420 python3 benchmarks/serve_migration.py --device cuda --model llama-7b --dtype bfloat16 \
      --kv-transport nccl --lengths 512,2048,7680 --repeats 3 --background 8 \
      -o "benchmarks/${G}x2-serve-migration-nccl-$RUN.csv" && cp benchmarks/${G}x2-serve-migration-nccl-$RUN*.csv "$OUT/"
  fi
  date -u
} 2>&1 | tee "$OUT/log-serve-migration-$RUN.txt"
