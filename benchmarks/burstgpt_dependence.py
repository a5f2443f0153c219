"""How strongly do BurstGPT's response lengths follow its request lengths? Measured on the only real rows we have
offline (``experiments/calibration/burstgpt-1-first400.csv``, the log's first 400 rows, README there), failed
requests (0 tokens) left out: Spearman's rank correlation and the Gaussian copula correlation it implies
(``datasets.copula_rho``: 2 sin(pi rho_s / 6)), with a seeded bootstrap 95% interval (``copula_rho_interval``), for
all rows, the conversation logs and per model. This bounds ``datasets.BURSTGPT_RHO``, the stand-in's fitted copula
correlation (tests/test_workload.py checks that it lies within the interval).

    python3 benchmarks/burstgpt_dependence.py -o benchmarks/burstgpt_dependence.csv
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd

from llumnix.workload.datasets import burstgpt_served, copula_rho, copula_rho_interval

SLICE = "experiments/calibration/burstgpt-1-first400.csv"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slice", default=SLICE)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    df = pd.read_csv(args.slice)
    groups = [("all served", df), ("conversation log", df[df["Log Type"] == "Conversation log"])]
    groups += [(f"model {m}", g) for m, g in df.groupby("Model")]
    rows = []
    for name, group in groups:
        pairs = burstgpt_served(group)
        lo, hi = copula_rho_interval(pairs, np.random.default_rng(args.seed), args.resamples)
        spearman = pd.Series(pairs.prompt_tokens).rank().corr(pd.Series(pairs.output_tokens).rank())
        rows.append({"rows": name, "n": len(pairs), "spearman": spearman, "copula_rho": copula_rho(pairs),
                     "copula_rho_lo95": lo, "copula_rho_hi95": hi, "bootstrap_resamples": args.resamples,
                     "bootstrap_seed": args.seed})
    table = pd.DataFrame(rows)
    table.to_csv(args.output, index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
