"""How strongly do BurstGPT's response lengths follow its request lengths? Measured on the only real rows we have
offline (``experiments/calibration/burstgpt-1-first400.csv``, the log's first 400 rows, README there), failed
requests (0 tokens) left out: Spearman's rank correlation and the Gaussian copula correlation it implies
(2 sin(pi rho_s / 6)), with a seeded bootstrap 95% interval, for all rows, the conversation logs and per model.
This bounds ``datasets.BURSTGPT_RHO``, the stand-in's fitted copula correlation.

    python3 benchmarks/burstgpt_dependence.py -o benchmarks/burstgpt_dependence.csv
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import pandas as pd

from llumnix.workload.datasets import BURSTGPT_REQUEST_COLUMN, BURSTGPT_RESPONSE_COLUMN

SLICE = "experiments/calibration/burstgpt-1-first400.csv"


def copula_rho(x: np.ndarray, y: np.ndarray) -> float:
    """The Gaussian copula correlation whose Spearman correlation is that of (x, y)."""
    spearman = pd.Series(x).rank().corr(pd.Series(y).rank())
    return 2 * math.sin(math.pi * spearman / 6)


def row(name: str, df: pd.DataFrame, resamples: int, seed: int) -> dict:
    x, y = df[BURSTGPT_REQUEST_COLUMN].to_numpy(), df[BURSTGPT_RESPONSE_COLUMN].to_numpy()
    rng = np.random.default_rng(seed)
    boot = [copula_rho(x[i], y[i]) for i in (rng.integers(0, len(x), len(x)) for _ in range(resamples))]
    spearman = pd.Series(x).rank().corr(pd.Series(y).rank())
    return {"rows": name, "n": len(x), "spearman": spearman, "copula_rho": copula_rho(x, y),
            "copula_rho_lo95": float(np.percentile(boot, 2.5)), "copula_rho_hi95": float(np.percentile(boot, 97.5)),
            "bootstrap_resamples": resamples, "bootstrap_seed": seed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slice", default=SLICE)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    df = pd.read_csv(args.slice)
    served = df[(df[BURSTGPT_REQUEST_COLUMN] > 0) & (df[BURSTGPT_RESPONSE_COLUMN] > 0)]
    groups = [("all served", served), ("conversation log", served[served["Log Type"] == "Conversation log"])]
    groups += [(f"model {m}", g) for m, g in served.groupby("Model")]
    table = pd.DataFrame([row(name, g, args.resamples, args.seed) for name, g in groups])
    table.to_csv(args.output, index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
