"""Issue 19: where a CUDA-graph decode step's wall time goes besides its kernels: filling the step's inputs (host
lists -> device buffers), the graph's replay (wall, synchronised; and on the GPU alone, back-to-back replays timed
by events), and the greedy sampling's copy back; on CUDA also the kernels of replayed graphs as the profiler sees them
(their summed time against the replay's span: the gaps between kernels; the kinds' times: against the eager step's
in ``llumnix bench step-breakdown``). LLaMA-7B (``--model``) bf16, the engine's runner as ``llumnix bench decode-floor``
drives it (``runner.decode``), one row per batch x context cell.

    python3 benchmarks/gpu_step_host.py --cells 1x512,32x2048,128x512,256x512 -o benchmarks/h200-step-host.csv
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import importlib.util
import platform
import sys
from pathlib import Path

import torch

from llumnix.bench.profiler import _median_time_s, _synchronizer, _tables, blocks_for
from llumnix.engine.runner import ModelRunner, SeqInput

_spec = importlib.util.spec_from_file_location("gpu_decode_kernel", Path(__file__).with_name("gpu_decode_kernel.py"))
gdk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gdk)


def _sample(tokens: torch.Tensor) -> list[int]:
    """What ``runner.decode`` does with a replay's tokens (the argmax is taken inside the graph)."""
    return tokens.tolist()


def _host_profile(step, steps: int, title: str) -> None:
    """``steps`` calls of ``step`` under cProfile: the top functions by own time, printed."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    print(f"-- host profile, {title}, {steps} steps (cumulative over them):", flush=True)
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def _traced_replays(static, sync, n: int) -> dict:
    """Kernels of ``n`` replays under torch.profiler: per replay, their count, summed time and span (first start to
    last end), and the summed time by kind (``profiler.kernel_kind``)."""
    from torch.profiler import ProfilerActivity, profile

    from llumnix.bench.profiler import kernel_kind

    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            static.run()
        sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in e.name]
    if not kernels:
        return {"graph_kernels": 0}
    span = max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
    by_kind: dict[str, float] = {}
    for e in kernels:
        kind = kernel_kind(e.name)
        by_kind[kind] = by_kind.get(kind, 0.0) + e.time_range.elapsed_us() / 1e6 / n
    return {"graph_kernels": len(kernels) / n, "graph_kernel_total_s": sum(by_kind.values()),
            "graph_span_s": span / 1e6 / n, **{f"graph_{k}_s": v for k, v in sorted(by_kind.items())}}


def _timeline(step, sync, n: int) -> dict:
    """``n`` calls of ``step`` under torch.profiler (CPU and CUDA): per call, the host's time from the call's start to
    its first GPU work (kernel or copy) starting, the GPU's busy time and span, and from the last GPU work's end to the
    call's return; medians. The profiler adds host time of its own: compare cells, not absolute values."""
    import statistics

    from torch.profiler import ProfilerActivity, profile, record_function

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            with record_function("decode_call"):
                step()
            sync()
    events = prof.events()
    calls = sorted((e.time_range.start, e.time_range.end) for e in events if e.name == "decode_call")
    gpu = sorted((e.time_range.start, e.time_range.end) for e in events
                 if e.device_type == torch.autograd.DeviceType.CUDA)
    rows = []
    for start, end in calls:
        mine = [(a, b) for a, b in gpu if start <= a <= end]
        if mine:
            rows.append((mine[0][0] - start, sum(b - a for a, b in mine), max(b for _, b in mine) - mine[0][0],
                         end - max(b for _, b in mine), end - start))
    if not rows:
        return {}
    med = [statistics.median(col) / 1e6 for col in zip(*rows, strict=True)]
    return dict(zip(("tl_host_before_gpu_s", "tl_gpu_busy_s", "tl_gpu_span_s", "tl_host_after_gpu_s", "tl_call_s"),
                    med, strict=True))


def _decomposed(runner, static, seqs, lens, sync, repeats: int) -> dict:
    """A decode call's parts chained in one timed call, each chain one part fewer (medians, synchronised): which part
    costs more together than alone. ``dc_call``: runner.decode; ``dc_chain``: fill, replay, tokens to the host;
    ``dc_fill_synced``: the same with a synchronisation after the fill; ``dc_no_copy``: the host buffers filled but not
    sent; ``dc_replay_tokens``: replay and tokens only; ``dc_replay``: the replay alone."""
    n = len(seqs)

    def chain(fill: bool = True, copy: bool = True, synced: bool = False) -> list[int]:
        if fill:
            if copy:
                static.fill(seqs, lens)
            else:
                static._host_longs[0, :n] = [s.token_ids[0] for s in seqs]
            if synced:
                sync()
        static.run()
        return static.tokens[:n].tolist()

    parts = {"dc_call": functools.partial(runner.decode, seqs), "dc_chain": chain,
             "dc_fill_synced": functools.partial(chain, synced=True), "dc_no_copy": functools.partial(chain, copy=False),
             "dc_replay_tokens": functools.partial(chain, fill=False), "dc_replay": static.run}
    out = {}
    for _ in range(2):  # twice, interleaved: drift shows as a difference between the rounds
        for name, f in parts.items():
            out.setdefault(name + "_s", []).append(_median_time_s(f, sync, 3, repeats))
    return {k: min(v) for k, v in out.items()} | {"dc_rounds_spread": max(max(v) / min(v) for v in out.values())}


@torch.inference_mode()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="1x512,32x2048,128x512,256x512", help="BATCHxCONTEXT entries")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--cprofile", type=int, default=0, metavar="STEPS",
                    help="also run STEPS decode steps of each cell under cProfile and print where the host's time goes")
    ap.add_argument("--decompose", action="store_true", help="also time a decode call's parts chained, one fewer each")
    ap.add_argument("--timeline", type=int, default=0, metavar="STEPS",
                    help="also profile STEPS decode calls of each cell: host time before and after the GPU's work")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    cells = [tuple(int(x) for x in c.split("x")) for c in args.cells.split(",")]
    dev = torch.device(args.device)
    bs = 16
    runner = ModelRunner(args.model, max(b * blocks_for(n, bs) for b, n in cells), bs, device=dev,
                         dtype=torch.bfloat16)
    sync = _synchronizer(dev)
    rows = []
    for batch, ctx in cells:
        seqs = [SeqInput([7], ctx - 1, t) for t in _tables([ctx] * batch, bs)]
        lens = [ctx] * batch
        full = _median_time_s(functools.partial(runner.decode, seqs), sync, 3, args.repeats)
        static = runner._static_decode(seqs, lens, None)
        fill = _median_time_s(functools.partial(static.fill, seqs, lens), sync, 3, args.repeats)
        replay = _median_time_s(static.run, sync, 3, args.repeats)
        static.run()
        sample = _median_time_s(functools.partial(_sample, static.tokens[:batch]), sync, 3, args.repeats)
        gpu = None
        if dev.type == "cuda":  # back to back: the GPU's time per replay with no host in between
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.repeats):
                static.run()
            end.record()
            torch.cuda.synchronize()
            gpu = start.elapsed_time(end) / 1e3 / args.repeats
        traced = _traced_replays(static, sync, 3) if dev.type == "cuda" else {}
        if args.decompose:
            traced |= _decomposed(runner, static, seqs, lens, sync, args.repeats)
        if args.timeline:
            traced |= _timeline(functools.partial(runner.decode, seqs), sync, args.timeline)
        if args.cprofile:
            _host_profile(functools.partial(runner.decode, seqs), args.cprofile, f"batch {batch} x {ctx}")
        rows.append({"device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                     "torch_version": torch.__version__, "host": platform.node(),
                     "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"), "model": args.model,
                     "batch": batch, "context": ctx, "cuda_graphs": runner.cuda_graphs, "decode_step_s": full, "fill_s": fill, "replay_wall_s": replay,
                     "replay_gpu_back_to_back_s": gpu, "sample_s": sample, **traced})
        print(rows[-1], flush=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))  # the kinds seen may differ by cell
    gdk.write_rows(args.output, [{k: r.get(k) for k in fields} for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
