"""The real Ray cluster, measured: dispatch overhead per request, and live-migration downtime vs sequence length.

Run: .venv/bin/python benchmarks/ray_cluster.py [--instances 2,4] [--requests 200] [--out-dir benchmarks]
Writes ray_dispatch.csv and ray_migration.csv.

- dispatch: a cluster of profile-backend instances (steps only sleep, ``--speed`` times faster than the A10 profile)
  takes ``--requests`` requests over HTTP at ``--rate`` req/s; the frontend's own counters give the dispatch latency
  (policy choice over the latest load reports, plus the instance actor's acknowledgement) and the choice alone.
- migration: two tiny-LLaMA instances on CPU; a request with a prompt of L tokens is migrated by ``/admin/migrate``
  after its 4th token; the client-visible stream is checked against an unmigrated run, and the downtime (the
  stop-and-copy stage on the source's clock) and stages are read from the response.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time

import httpx
import numpy as np
import pandas as pd

from llumnix.runtime.frontend import BackgroundServer
from llumnix.runtime.serve_config import build_serve_config


async def _send(url: str, n: int, rate: float, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    t0 = time.perf_counter()
    ttft: list[float] = []

    async def one(i: int, client: httpx.AsyncClient) -> None:
        await asyncio.sleep(max(0.0, t0 + arrivals[i] - time.perf_counter()))
        start = time.perf_counter()
        body = {"prompt": rng.integers(0, 1000, 64).tolist(), "max_tokens": 16, "stream": True}
        first = None
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                if first is None and line.startswith("data: {"):
                    first = time.perf_counter() - start
        ttft.append(first)

    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(one(i, client) for i in range(n)))
    return ttft


def dispatch_rows(instance_counts: list[int], n: int, rate: float, speed: float) -> list[dict]:
    rows = []
    for count in instance_counts:
        config = build_serve_config(
            {},
            {"instances": count, "port": 0, "backend": "profile", "speed": speed, "num_cpus_per_instance": 0,
             "policy": "llumnix"},
        )
        with BackgroundServer(config) as srv:
            ttft = asyncio.run(_send(srv.url, n, rate, seed=count))
            m = srv.manager
            d, c = m.dispatch_latency, m.decision_latency
            rows.append(
                {
                    "bench": "dispatch", "instances": count, "requests": n, "rate": rate,
                    "dispatch_mean_ms": d.mean_s * 1e3, "dispatch_p50_ms": d.quantile(0.5) * 1e3,
                    "dispatch_p99_ms": d.quantile(0.99) * 1e3, "decision_mean_ms": c.mean_s * 1e3,
                    "decision_p99_ms": c.quantile(0.99) * 1e3,
                    "ttft_mean_ms": float(np.mean(ttft)) * 1e3, "ttft_p99_ms": float(np.percentile(ttft, 99)) * 1e3,
                }
            )
            print(json.dumps(rows[-1]))
    return rows


def migration_rows(lengths: list[int], num_blocks: int) -> list[dict]:
    rows = []
    config = build_serve_config({}, {"instances": 2, "port": 0, "num_blocks": num_blocks, "num_cpus_per_instance": 0})
    with BackgroundServer(config) as srv:
        for length in lengths:
            prompt = [(13 * i + 1) % 1024 for i in range(length)]
            body = {"prompt": prompt, "max_tokens": 64}
            reference = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=300).json()
            tokens, final, started = [], {}, None
            with httpx.stream("POST", f"{srv.url}/v1/completions", json={**body, "stream": True}, timeout=300) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    tokens += chunk["choices"][0]["token_ids"]
                    final = chunk.get("llumnix", final)
                    if len(tokens) == 4:
                        started = httpx.post(f"{srv.url}/admin/migrate", json={"request_id": chunk["id"]},
                                              headers=srv.admin_headers).json()
            records = [m for m in final.get("migration_records", []) if m[6]]
            ref_ttft = reference["llumnix"]["first_token_s"] - reference["llumnix"]["arrival_s"]
            rows.append(
                {
                    "bench": "migration", "seq_len": length, "started": bool(started and started["started"]),
                    "committed": len(records), "tokens_match": tokens == reference["choices"][0]["token_ids"],
                    "downtime_ms": records[0][4] * 1e3 if records else float("nan"),
                    "migration_ms": (records[0][1] - records[0][0]) * 1e3 if records else float("nan"),
                    "stages": records[0][5] if records else 0,
                    "recompute_ttft_ms": ref_ttft * 1e3,
                }
            )
            print(json.dumps(rows[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", default="2,4", help="instance counts of the dispatch benchmark")
    parser.add_argument("--requests", type=int, default=200, help="requests per dispatch run")
    parser.add_argument("--rate", type=float, default=50.0, help="arrival rate of the dispatch runs, req/s")
    parser.add_argument("--speed", type=float, default=10.0, help="profile speed-up of the dispatch runs")
    parser.add_argument("--lengths", default="256,512,1024,2048", help="prompt lengths of the migration runs")
    parser.add_argument("--num-blocks", type=int, default=160, help="KV blocks per instance of the migration runs")
    parser.add_argument("--out-dir", default="benchmarks", help="where ray_dispatch.csv and ray_migration.csv go")
    args = parser.parse_args()

    import ray

    from llumnix.runtime.frontend import init_ray

    init_ray(None, num_cpus=2, log_to_driver=False)
    machine = f"{platform.machine()} {os.cpu_count()} cpus, client + frontend + actors on one host"
    try:
        dispatch = pd.DataFrame(dispatch_rows([int(x) for x in args.instances.split(",")], args.requests, args.rate,
                                              args.speed)).assign(machine=machine)
        migration = pd.DataFrame(migration_rows([int(x) for x in args.lengths.split(",")], args.num_blocks)).assign(
            machine=machine
        )
    finally:
        ray.shutdown()
    dispatch.drop(columns="bench").to_csv(f"{args.out_dir}/ray_dispatch.csv", index=False)
    migration.drop(columns="bench").to_csv(f"{args.out_dir}/ray_migration.csv", index=False)
    print(dispatch.to_string(index=False))
    print(migration.to_string(index=False))

if __name__ == "__main__":
    main()
