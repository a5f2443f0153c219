"""Simulator speed: virtual seconds simulated per wall second, vs instances and requests.

Run: .venv/bin/python benchmarks/sim_speed.py [--out benchmarks/sim_speed.csv]
The issue's target: a 16-instance run of 10,000 L-L requests at 3 req/s simulates >= 100x faster than real time.
"""

from __future__ import annotations

import argparse
import platform
import time

import pandas as pd

from llumnix.policies.system import SystemConfig
from llumnix.profiles import Profile
from llumnix.sim import SimConfig, Simulator
from llumnix.sim.run import requests_from_trace
from llumnix.workload import make_trace


def one(policy: str, instances: int, n: int, rate: float, workload: str = "L-L") -> dict:
    profile = Profile.load("a10-llama-7b")
    reqs = requests_from_trace(make_trace(workload, rate * instances / 16, n, seed=0))
    t0 = time.perf_counter()
    res = Simulator(reqs, profile, SimConfig(num_instances=instances, system=SystemConfig(policy=policy))).run()
    wall = time.perf_counter() - t0
    return {
        "policy": policy, "instances": instances, "requests": n, "rate": rate * instances / 16, "workload": workload,
        "virtual_s": res.end_s, "wall_s": wall, "speedup": res.end_s / wall, "migrations": len(res.migrations),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()} python {platform.python_version()}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/sim_speed.csv")
    ap.add_argument("--quick", action="store_true", help="Only the headline configuration.")
    args = ap.parse_args()
    rows = [one(p, 16, 10_000, 3.0) for p in ("infaas++", "llumnix")]
    if not args.quick:
        rows += [one("llumnix", n, 10_000 * n // 16, 3.0) for n in (4, 32)]
        rows += [one("llumnix", 16, n, 3.0) for n in (2_500, 5_000)]
    df = pd.DataFrame(rows)
    df.to_csv(args.out, index=False)
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
