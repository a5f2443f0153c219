"""Issue 19: the paged decode kernel's switches (address arithmetic: ``paged_attention.TABLE_PER_BLOCK``,
``OFFS32``; program order: ``HEAD_MAJOR``; tile loops bounded by the context: ``DYNAMIC_ONE_PASS``,
``DYNAMIC_SPLIT``) off, alone and together, and its constants (NAME=INT), against the copy
bandwidth, over batch x context (LLaMA-7B or SmolLM2 shape, bf16; the same cells, pools and timing as
``gpu_decode_kernel.py``, whose helpers this uses). Every switch's output must be bit-equal to the first variant's (not
the constants': another tile or warp count sums in another order). Variants since dropped, in the committed CSVs:
"stream" (K/V loads with ``cache_modifier=".cg"``; "all": the three together), no gain
(h200-decode-kernel-variants.csv); "v_early" (a tile's V loaded right after its K), "table_ahead" (the next tile's
block ids loaded a tile ahead), both slower, and "warps8" / "full_tile128" (NUM_WARPS=8, FULL_BLOCK_N=128; with the
constants of then: PARTITION 256, BLOCK_N 64; h200-decode-kernel-loads.csv). "table+offs32" in the CSVs is "address"; h200-decode-kernel-dynamic.csv's "dynamic" bounded every loop in both modes
(the partitions' loop too), and "DYNAMIC=2" / "=3" pipelined them (num_stages).

    python3 benchmarks/gpu_kernel_variants.py -o benchmarks/h200-decode-kernel-variants.csv
    python3 benchmarks/gpu_kernel_variants.py --variants address,head_major -o benchmarks/h200-decode-kernel-order.csv
    (the order and tile CSVs: run before HEAD_MAJOR and 128-token tiles were the defaults; "head_major" there had
    PARTITION 256 and tiles of 64)
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from pathlib import Path

import torch

from llumnix.bench.profiler import measure_copy_bandwidth
from llumnix.engine import paged_attention as pa

_spec = importlib.util.spec_from_file_location("gpu_decode_kernel", Path(__file__).with_name("gpu_decode_kernel.py"))
gdk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gdk)

OFF = {"TABLE_PER_BLOCK": False, "OFFS32": False, "HEAD_MAJOR": False, "DYNAMIC_ONE_PASS": False,
       "DYNAMIC_SPLIT": False}
ADDRESS = {**OFF, "TABLE_PER_BLOCK": True, "OFFS32": True}
VARIANTS = {"baseline": OFF, "table_per_block": {**OFF, "TABLE_PER_BLOCK": True}, "offs32": {**OFF, "OFFS32": True},
            "address": ADDRESS, "head_major": {**ADDRESS, "HEAD_MAJOR": True},
            "dynamic": {**ADDRESS, "HEAD_MAJOR": True, "DYNAMIC_ONE_PASS": True},
            "dynamic+split": {**ADDRESS, "HEAD_MAJOR": True, "DYNAMIC_ONE_PASS": True, "DYNAMIC_SPLIT": True}}


def variant(spec: str) -> dict:
    """A variant's module constants: names above and NAME=INT settings joined by '+' (later ones win), e.g.
    'head_major+FULL_BLOCK_N=128'. Switches keep the bits; other constants (tiles, warps) may not."""
    if spec in VARIANTS:
        return VARIANTS[spec]
    flags: dict = {}
    for part in spec.split("+"):
        if "=" in part:
            name, value = part.split("=")
            if not hasattr(pa, name):
                raise SystemExit(f"variant {spec!r}: paged_attention has no constant {name}")
            flags[name] = int(value)
        elif part in VARIANTS:
            flags |= VARIANTS[part]
        else:
            raise SystemExit(f"variant {spec!r}: {part!r} is not one of {', '.join(VARIANTS)} nor NAME=INT")
    return flags


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--contexts", default="512,2048,8192")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; each names from "
                    + ", ".join(VARIANTS) + " and NAME=INT constants joined by '+' (the first: the bit reference)")
    ap.add_argument("--shape", default="llama-7b", choices=list(gdk.SHAPES))
    ap.add_argument("--table-tokens", type=int, default=8192, help="block table width in tokens (the graphs')")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    bandwidth = measure_copy_bandwidth(args.device, nbytes=1 << 30 if cuda else 1 << 24)
    rows = []
    for batch in gdk._ints(args.batches):
        for ctx in gdk._ints(args.contexts):
            kv_bytes, layers, _ = gdk.cell_size(args.shape, batch, ctx, cuda)
            q, pools, tables, lens = gdk.make_cell(args.shape, batch, ctx, layers, args.table_tokens, dev)
            reference = None
            for name in args.variants.split(","):
                flags = variant(name)
                saved = {k: getattr(pa, k) for k in flags}
                for k, v in flags.items():
                    setattr(pa, k, v)
                try:
                    outs, per_call = gdk._time_calls(functools.partial(gdk._layers, q, pools, tables, lens), 10)
                finally:
                    for k, v in saved.items():
                        setattr(pa, k, v)
                per_call /= layers
                reference = outs[0] if reference is None else reference
                same = bool(torch.equal(outs[0], reference))
                rows.append({"device_name": torch.cuda.get_device_name(dev) if cuda else "cpu", "shape": args.shape,
                             "table_tokens": args.table_tokens,
                             "torch_version": torch.__version__, "triton_version": __import__("triton").__version__,
                             "copy_bandwidth_bytes_per_s": bandwidth, "batch": batch, "context": ctx,
                             "variant": name, "call_s": per_call, "floor_s": kv_bytes / bandwidth,
                             "call_over_floor": per_call * bandwidth / kv_bytes, "bit_equal_baseline": same})
                print(f"b{batch} ctx{ctx} {name}: {per_call * 1e6:.1f} us, {rows[-1]['call_over_floor']:.2f}x, "
                      f"bits {'=' if same else '!='}", flush=True)
            del pools
            if cuda:
                torch.cuda.empty_cache()
    gdk.write_rows(args.output, rows)
    same_bits = [r for r in rows if "=" not in r["variant"]]
    return 0 if all(r["bit_equal_baseline"] for r in same_bits) else 1


if __name__ == "__main__":
    sys.exit(main())
