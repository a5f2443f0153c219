"""1,000 concurrent requests through the HTTP frontend: all complete, none lost; dispatch overhead per request.

Run: .venv/bin/python benchmarks/load_1000.py [--requests 1000] [--instances 4] [--out benchmarks/load_1000.csv]

A local Ray (``--num-cpus``) runs ``--instances`` profile-backend instances (steps sleep for the A10 profile's times,
so the cluster itself is cheap and the frontend, the dispatch path and the client are what is loaded); the frontend
runs in this process on a free port. All requests are sent at once, each on its own connection, streaming, with short
prompts and outputs (``llumnix.bench.load``). Checked: every request answered with exactly ``--max-tokens`` tokens,
the frontend counted every one as finished and holds none afterwards, every instance is empty with all KV blocks free.
Measured: dispatch overhead per request (the dispatch policy's choice over the latest load reports + the instance
actor's acknowledgement, from the frontend's own counters), time to first token and end-to-end latency at the client.
Appends one row per repeat to the CSV, with the machine it ran on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path

import pandas as pd

from llumnix.bench.load import load_test
from llumnix.machine import machine_description


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="concurrent requests")
    parser.add_argument("--instances", type=int, default=4, help="profile-backend instances")
    parser.add_argument("--profile", default="a10-llama-7b", help="step-time profile of the instances")
    parser.add_argument("--speed", type=float, default=1.0, help="steps run this many times faster than profiled")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt length of every request")
    parser.add_argument("--max-tokens", type=int, default=8, help="output length of every request")
    parser.add_argument("--no-stream", action="store_true", help="plain JSON responses instead of SSE streams")
    parser.add_argument("--repeats", type=int, default=1, help="runs, each on a fresh frontend and instances")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray")
    parser.add_argument("--out", default="benchmarks/load_1000.csv", help="CSV to append to")
    args = parser.parse_args()

    import ray

    from llumnix.runtime.frontend import init_ray

    init_ray(None, num_cpus=args.num_cpus, log_to_driver=False)
    rows = []
    try:
        for repeat in range(args.repeats):
            row = load_test(args.requests, args.instances, args.profile, args.speed, args.prompt_tokens,
                            args.max_tokens, stream=not args.no_stream, seed=repeat)
            row.update(repeat=repeat, machine=machine_description(), python=platform.python_version(),
                       ray=ray.__version__, commit=_git_commit(),
                       date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"))
            rows.append(row)
            print(json.dumps(row))
    finally:
        ray.shutdown()
    out = Path(args.out)
    df = pd.DataFrame(rows)
    if out.exists():
        df = pd.concat([pd.read_csv(out), df], ignore_index=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    cols = ["requests", "completed", "lost", "errors", "dispatch_mean_ms", "dispatch_p99_ms", "ttft_p99_ms", "wall_s",
            "ok"]
    print(pd.DataFrame(rows)[cols].to_string(index=False))
    if not all(r["ok"] for r in rows):
        raise SystemExit("some requests failed or were lost: see the CSV's error_examples")


if __name__ == "__main__":
    main()
