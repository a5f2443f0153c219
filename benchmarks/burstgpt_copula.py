"""Issue 15, an exploration (defaults unchanged): would BurstGPT's stand-in meet the paper's INFaaS++ points if its
input and output lengths were drawn jointly? A Gaussian copula of correlation ``rho`` keeps both Table-1 marginals
(``datasets.burstgpt(..., rho)``: ``QuantileLengths.tokens_at`` the normal CDF of correlated normals) and only adds
dependence. Each calibration trace keeps its arrivals and count; its lengths are redrawn (seeded). INFaaS++ runs of the calibrated
``a10-llama-7b`` (``calibration.simulate_infaas``); the ratios to the paper's BurstGPT points are written per rho.

    python3 benchmarks/burstgpt_copula.py --rhos 0,0.5 -o a.csv; ... --rhos 0.1,0.2 -o b.csv;
    ... --rhos 0.2,0.3 --seeds 1 -o c.csv      # benchmarks/burstgpt_copula.csv: the three, seed 0 for the first two
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from llumnix.analysis.calibration import PAPER_METRICS, load_points, score, simulate_infaas, trace_file
from llumnix.metrics import request_table, summarize
from llumnix.profiles import Profile
from llumnix.workload import datasets, read_trace, write_trace
from llumnix.workload.lengths import BURSTGPT_INPUT, BURSTGPT_OUTPUT


def run(task: tuple[str, float, float, str, int]) -> dict:
    trace_path, rate, rho, out_dir, seed = task
    df = read_trace(trace_path)
    rng = np.random.default_rng(seed * 100003 + int(rate * 100))
    pairs = datasets._copula_pairs(BURSTGPT_INPUT, BURSTGPT_OUTPUT, len(df), rng, rho)  # rho 0 too: a fresh draw
    df["prompt_tokens"], df["output_tokens"] = pairs.prompt_tokens, pairs.output_tokens
    path = Path(out_dir) / f"burstgpt-{rate:g}-rho{rho:g}-s{seed}.parquet"
    write_trace(df, path)
    summary = summarize(request_table(simulate_infaas(Profile.load("a10-llama-7b"), path).requests))
    return {"rate": rate, "rho": rho, "seed": seed, **{k: summary[k] for k in PAPER_METRICS.values()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rhos", default="0,0.3,0.5,0.7")
    ap.add_argument("--seeds", default="0", help="length-draw seeds (each a run per rate and rho)")
    ap.add_argument("--traces", default=".cal/traces")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    points = load_points("experiments/calibration/fig11-infaas-paper.csv")
    points = points[points.trace == "BurstGPT"]
    rates = sorted(points.rate.unique())
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(args.jobs) as pool:
        tasks = [(str(trace_file(Path(args.traces), "BurstGPT", r, -1)), r, float(rho), tmp, int(seed))
                 for seed in args.seeds.split(",") for rho in args.rhos.split(",") for r in rates]
        sims = pd.DataFrame(list(pool.map(run, tasks)))
    long = sims.melt(id_vars=["rate", "rho", "seed"], var_name="key", value_name="sim_s")
    table = points.merge(long, on=["rate", "key"]).assign(ratio=lambda d: d.sim_s / d.value_s)
    table.to_csv(args.output, index=False)
    for (rho, seed), group in table.groupby(["rho", "seed"]):
        s = score(group)
        print(f"rho {rho:g}, seed {seed}: {s.within_1_5 * s.points:.0f} of {s.points} within 1.5x, "
              f"{s.within_2 * s.points:.0f} within 2x")
    off = table[(table.ratio > 2) | (table.ratio < 0.5)]
    print(off[["rho", "seed", "rate", "metric", "value_s", "sim_s", "ratio"]].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
