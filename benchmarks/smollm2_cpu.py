"""Decode speed of the real model (smollm2-135m, fp32) in one engine instance on this machine's CPU.

Run: .venv/bin/python benchmarks/smollm2_cpu.py [--out benchmarks/smollm2_cpu.csv]
For each batch size and torch thread count, one EngineInstance (the scheduler + paged engine that `llumnix serve` runs
in each instance actor, without Ray or HTTP) prefills ``batch`` prompts of 64 tokens together, then decodes 32 tokens
each; the row gives the median decode step and the tokens per second it makes. Every configuration runs ``--repeats``
times (one row each), interleaved, and the load average of the machine is recorded before and after each row: on a
shared machine other work slows the steps (with 2 threads by up to ~10x when another process takes a core).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics

import pandas as pd
import torch

from llumnix.core.local_scheduler import StepKind
from llumnix.core.request import Request
from llumnix.engine.executor import TorchExecutor
from llumnix.runtime.instance import EngineInstance

MODEL = "smollm2-135m"
PROMPT_TOKENS, OUTPUT_TOKENS = 64, 32


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())


def one(batch: int, threads: int, repeat: int) -> dict:
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    inst = EngineInstance(0, TorchExecutor(MODEL, num_blocks=batch * 8, block_size=16), watermark=0.0)
    for i in range(batch):
        ids = [(1000 + 37 * i + 11 * j) % 49152 for j in range(PROMPT_TOKENS)]
        inst.add_request(Request(i, 0.0, PROMPT_TOKENS, OUTPUT_TOKENS, prompt_token_ids=ids))
    inst.run_until_idle()
    decode = [s.duration_s for s in inst.steps if s.kind == StepKind.DECODE.value and s.batch_size == batch]
    prefill = sum(s.duration_s for s in inst.steps if s.kind == StepKind.PREFILL.value)
    step = statistics.median(decode)
    return {
        "model": MODEL, "dtype": "float32", "torch_threads": threads, "batch": batch, "repeat": repeat,
        "prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS,
        "decode_step_median_s": step, "decode_step_min_s": min(decode), "decode_tokens_per_s": batch / step,
        "prefill_s": prefill, "prefill_tokens_per_s": batch * PROMPT_TOKENS / prefill,
        "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0],
        "cpu": cpu_name(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/smollm2_cpu.csv")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = [one(b, t, r) for r in range(args.repeats) for t in map(int, args.threads.split(","))
            for b in map(int, args.batches.split(","))]  # fmt: skip
    df = pd.DataFrame(rows)
    df.to_csv(args.out, index=False)
    summary = df.groupby(["torch_threads", "batch"]).agg(
        step_s=("decode_step_median_s", "median"), step_min_s=("decode_step_median_s", "min"),
        step_max_s=("decode_step_median_s", "max"), tokens_per_s=("decode_tokens_per_s", "median"),
        prefill_s=("prefill_s", "median"), load_max=("loadavg_1m_after", "max"))  # fmt: skip
    print(summary.round(3).to_string())


if __name__ == "__main__":
    main()
