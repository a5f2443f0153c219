"""Issue 19: the split-KV paged decode kernel alone (llumnix/engine/paged_attention.py), against the device's copy
bandwidth, over model shapes x batch x context x kernel constants (PARTITION/TILE/WARPS/PROGRAMS_PER_SM): which
constants reach the bandwidth floor, and how far one partition per sequence (8192/64/4/1: the kernel before split-KV,
one program per sequence and KV head walking the whole context) is from it.

Each timed call is one layer's decode attention, bf16, block size 16, block tables as wide as the engine's CUDA
graphs make them (8192 tokens: partitions past a sequence's length are skipped), blocks in shuffled order. Calls go
through a CUDA graph over several layers' own K/V pools (at least 1 GiB in all, past the L2 cache), so launch costs
and cache hits stay out. A config whose output differs from the first config's by more than bf16 rounding is flagged.

    python3 benchmarks/gpu_decode_kernel.py -o benchmarks/h200-decode-kernel.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import functools
import math
import platform
import sys
import time

import torch

from llumnix.bench.profiler import KernelConfig, _kernel_constants, measure_copy_bandwidth
from llumnix.engine import paged_attention

SHAPES = {"llama-7b": (32, 32, 128), "smollm2-135m": (9, 3, 64)}  # query heads, KV heads, head dim
BLOCK = 16


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _layers(q, pools, tables, lens) -> list[torch.Tensor]:
    """One decode attention call per layer's K/V pools."""
    return [paged_attention.paged_decode_attention(q, k, v, tables, lens, BLOCK) for k, v in pools]


def _time_calls(calls, repeats: int) -> tuple[list[torch.Tensor], float]:
    """The outputs of one run of ``calls``, and the seconds per run: replays of a CUDA graph of it, timed by events
    (on CPU, under TRITON_INTERPRET=1, a smoke test: wall time of plain runs)."""
    outs = calls()  # compiles
    if not outs[0].is_cuda:
        t0 = time.perf_counter()
        for _ in range(repeats):
            calls()
        return outs, (time.perf_counter() - t0) / repeats
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        calls()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        calls()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return outs, start.elapsed_time(end) / 1e3 / repeats


def cell_size(shape: str, batch: int, ctx: int, cuda: bool) -> tuple[int, int, int]:
    """A cell's KV bytes one call must read (K and V, bf16), the layers timed in one graph (enough pools to pass 1 GiB,
    past the L2 cache; one on CPU), and the bytes of all their pools."""
    _, kv_heads, head_dim = SHAPES[shape]
    kv_bytes = batch * ctx * kv_heads * head_dim * 2 * 2
    layers = max(1, min(32, math.ceil((1 << 30) / kv_bytes))) if cuda else 1
    return kv_bytes, layers, layers * 2 * batch * -(-ctx // BLOCK) * BLOCK * kv_heads * head_dim * 2


def make_cell(shape: str, batch: int, ctx: int, layers: int, table_tokens: int, dev: torch.device):
    """q, ``layers`` (K, V) pools with each sequence's blocks in shuffled order, block tables ``table_tokens`` wide,
    lengths: one decode attention call per layer of ``batch`` sequences of ``ctx`` tokens (seeded by the cell)."""
    heads, kv_heads, head_dim = SHAPES[shape]
    slots = batch * -(-ctx // BLOCK) * BLOCK
    gen = torch.Generator(device=dev).manual_seed(batch * 100003 + ctx)
    pools = [(torch.randn(slots, kv_heads, head_dim, device=dev, dtype=torch.bfloat16, generator=gen),
              torch.randn(slots, kv_heads, head_dim, device=dev, dtype=torch.bfloat16, generator=gen))
             for _ in range(layers)]
    width = max(-(-table_tokens // BLOCK), -(-ctx // BLOCK))
    order = torch.randperm(slots // BLOCK, generator=torch.Generator().manual_seed(ctx)).int()
    tables = torch.zeros(batch, width, dtype=torch.int32)
    tables[:, : -(-ctx // BLOCK)] = order.view(batch, -1)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(batch, heads, head_dim, device=dev, dtype=torch.bfloat16, generator=gen)
    return q, pools, tables.to(dev), lens


def write_rows(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama-7b,smollm2-135m")
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--contexts", default="512,2048,8192")
    ap.add_argument("--configs", default="512/32/4/4,512/32/4/2,512/64/8/4,256/32/4/4,1024/32/4/4,8192/64/4/1",
                    help="PARTITION/TILE/WARPS/PROGRAMS_PER_SM entries; the first: the reference of the output check")
    ap.add_argument("--table-tokens", type=int, default=8192, help="block table width in tokens (the graphs')")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--max-gib", type=float, default=48.0, help="skip cells whose K/V pools would exceed this")
    ap.add_argument("--device", default="cuda", help="cuda; or cpu with TRITON_INTERPRET=1 (a smoke test)")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    configs = [KernelConfig.parse(c) for c in args.configs.split(",")]
    bandwidth = measure_copy_bandwidth(args.device, nbytes=1 << 30 if cuda else 1 << 24)
    if cuda:
        torch.cuda.empty_cache()
    common = {"device_name": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch_version": torch.__version__,
              "cuda_version": torch.version.cuda, "triton_version": __import__("triton").__version__,
              "host": platform.node(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
              "copy_bandwidth_bytes_per_s": bandwidth, "dtype": "bfloat16", "block_size": BLOCK,
              "table_tokens": args.table_tokens, "command": " ".join(["python3", *sys.argv])}
    rows = []
    t_start = time.time()
    for shape in args.shapes.split(","):
        heads, kv_heads, head_dim = SHAPES[shape]
        for batch in _ints(args.batches):
            for ctx in _ints(args.contexts):
                kv_bytes, layers, pool_bytes = cell_size(shape, batch, ctx, cuda)
                if pool_bytes > args.max_gib * 2**30:
                    print(f"skip {shape} batch {batch} x {ctx}: pools over {args.max_gib} GiB", flush=True)
                    continue
                q, pools, tables, lens = make_cell(shape, batch, ctx, layers, args.table_tokens, dev)
                reference = None
                for config in configs:
                    with _kernel_constants(config) as constants:
                        outs, per_call = _time_calls(functools.partial(_layers, q, pools, tables, lens), args.repeats)
                        per_call /= layers
                    if reference is None:
                        reference = outs[0].float()
                    diff = (outs[0].float() - reference).abs().max().item()
                    row = {**common, "shape": shape, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                           "batch": batch, "context": ctx, **constants,
                           "layers_in_graph": layers, "call_s": per_call, "kv_bytes": kv_bytes,
                           "floor_s": kv_bytes / bandwidth, "call_over_floor": per_call * bandwidth / kv_bytes,
                           "max_diff_vs_first_config": diff, "output_ok": diff <= 2e-2}
                    rows.append(row)
                    name = "/".join(map(str, constants.values()))
                    print(f"{shape} b{batch} ctx{ctx} {name}: {per_call * 1e6:.1f} us, "
                          f"{row['call_over_floor']:.2f}x floor, diff {diff:.1e}", flush=True)
                del pools, outs, reference
                if cuda:
                    torch.cuda.empty_cache()
    write_rows(args.output, rows)
    print(f"wrote {len(rows)} rows to {args.output} in {time.time() - t_start:.0f} s", flush=True)
    return 0 if all(r["output_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
