"""One real run of the real-cluster experiment (``llumnix real-cluster``): a trace served on a fresh cluster
(:class:`llumnix.runtime.supervisor.ServeProcess`), replayed with ``llumnix replay``'s client, and written as the
simulator's tables plus what only a real run measures: every engine step (``steps.parquet``, for the in-situ profile),
the CPU time by role, the dispatch latency from /metrics and the per-request legs around the engines."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shlex
from pathlib import Path

import httpx
import numpy as np
from tqdm.auto import tqdm

from llumnix.bench.insitu import request_legs, steps_table
from llumnix.machine import machine_description
from llumnix.runtime.cpuload import QuietConfig, Sampler, other_cpu_seconds, run_undisturbed
from llumnix.runtime.frontend import metric_samples
from llumnix.runtime.replay import load_trace, replay, write_replay_outputs
from llumnix.runtime.supervisor import (
    RealClusterConfig,
    ServeProcess,
    engine_version,
    machine_cpu_seconds,
    process_cpu_seconds,
)

log = logging.getLogger(__name__)


def all_steps(url: str, admin_headers: dict[str, str], instance_ids: list[int]) -> list[dict]:
    """Every step the instances kept (``GET /admin/steps``, page after page per instance)."""
    from llumnix.runtime.replay import admin_pages

    async def fetch() -> list[dict]:
        async with httpx.AsyncClient() as client:
            pages = [await admin_pages(client, f"{url}/admin/steps", admin_headers, {"instance_id": i}, 60.0)
                     for i in instance_ids]
        if any(p is None for p in pages):
            raise RuntimeError(f"{url}/admin/steps refused the admin key")
        return [row for p in pages for row in p]

    return asyncio.run(fetch())


def run_real_cluster(
    trace_path: Path,
    out_dir: Path,
    config: RealClusterConfig,
    time_scale: float = 1.0,
    sample_interval_s: float = 1.0,
    request_timeout_s: float = 3600.0,
    progress: bool = False,
    quiet: QuietConfig | None = None,
    sampler: Sampler = other_cpu_seconds,
) -> dict:
    """Serve ``trace_path`` on a fresh real cluster; write the simulator's tables to ``out_dir``; return the summary.

    ``out_dir/serve.log`` keeps the server's output. Per-instance counters read at the end (steps, busy seconds) go
    into the summary, so a run tells how long its engine steps really took. Before the cluster starts, the run waits
    for other processes to quieten (``quiet``, :func:`llumnix.runtime.cpuload.wait_for_quiet`); a run during which
    they took more than ``quiet.max_other_cores`` is marked ``disturbed`` in the summary (and re-run up to
    ``quiet.retry_disturbed`` times, the last kept). ``sampler``: the other processes' cumulative CPU seconds.
    """
    out_dir = Path(out_dir)
    trace = load_trace(trace_path)
    quiet = quiet or QuietConfig()

    def once():
        result, extra, step_log = _serve_and_replay(trace_path, trace, out_dir, config, time_scale,
                                                    sample_interval_s, request_timeout_s, progress)  # fmt: skip
        return (result, extra, step_log), extra["cpu_other_s"], result.wall_s

    (result, extra, step_log), columns = run_undisturbed(once, quiet, sampler)
    # other processes' cores before the run and during it; disturbed: more than the bound during it
    extra.update(columns)
    out_dir.mkdir(parents=True, exist_ok=True)
    step_log.to_parquet(out_dir / "steps.parquet", index=False)  # before summary.json, whose presence means complete
    summary = write_replay_outputs(result, out_dir, extra)
    if result.errors:
        log.warning("%d of %d requests failed, e.g. %s", len(result.errors), len(trace), result.errors[0])
    return summary


def _serve_and_replay(trace_path, trace, out_dir, config, time_scale, sample_interval_s, request_timeout_s, progress):
    """One attempt: a fresh cluster serves the trace; returns the replay's result, the summary's extra columns and
    the engine steps."""
    with ServeProcess(config, out_dir / "serve.log") as server:
        client_cpu0, machine_cpu0 = process_cpu_seconds(), machine_cpu_seconds()
        with tqdm(total=len(trace), desc="replaying", unit="req", disable=not progress, leave=False) as bar:
            result = asyncio.run(
                replay(server.url, trace, time_scale, config.seed, sample_interval_s, request_timeout_s,
                       progress=bar.update, admin_key=server.admin_key)
            )  # fmt: skip
        rows = httpx.get(f"{server.url}/admin/instances", timeout=10.0, headers=server.admin_headers).json()
        step_log = steps_table(all_steps(server.url, server.admin_headers, [r["instance_id"] for r in rows]))
        dispatch = _dispatch_seconds(httpx.get(f"{server.url}/metrics", timeout=10.0).text)
        cpu = server.cpu_seconds_since_healthy()
        machine_cpu = machine_cpu_seconds() - machine_cpu0
    cpu["client"] = process_cpu_seconds() - client_cpu0
    engine_prefill = _engine_prefill_latencies(result.requests)
    steps = sum(r["steps"] for r in rows)
    busy_s = sum(r["busy_s"] for r in rows)
    extra = {
        "policy": config.policy,
        "migration_enabled": config.migration and config.policy == "llumnix",
        "instances": config.instances,
        "backend": config.backend,
        "engine": engine_version(config),
        "model": config.model,
        "device": config.device,
        "num_blocks": config.num_blocks,
        "torch_threads": config.torch_threads,
        "seed": config.seed,
        "trace": str(trace_path),
        "time_scale": time_scale,
        "machine": machine_description(),
        "serve_command": shlex.join(["llumnix", *config.serve_args(server.port)]),
        "startup_s": server.startup_s,
        "engine_steps": steps,
        "engine_busy_s": busy_s,
        "engine_step_mean_s": busy_s / steps if steps else math.nan,
        "engine_busy_fraction": busy_s / (result.wall_s * len(rows)) if result.wall_s > 0 and rows else math.nan,
        "dispatch_mean_s": dispatch,
        # arrival (sent) to the end of the first prefill on the instance: the prefill latency without the trip back
        "engine_prefill_mean_s": float(np.mean(engine_prefill)) if engine_prefill else math.nan,
        "engine_prefill_p99_s": float(np.percentile(engine_prefill, 99)) if engine_prefill else math.nan,
        # CPU seconds used during the replay, by role; cpu_cores_used: their sum over the replay's wall time
        **{f"cpu_{role}_s": v for role, v in cpu.items()},
        "cpu_cores_used": sum(cpu.values()) / result.wall_s if result.wall_s > 0 else math.nan,
        # CPU the rest of the machine used meanwhile (other jobs compete with the cluster for the same cores)
        "cpu_other_s": max(0.0, machine_cpu - sum(cpu.values())),
        "cpu_count": os.cpu_count(),
    }
    # arrival -> dispatch and prefill end -> the client's first token: what the simulator's twin adds to its steps
    extra.update(request_legs(result.requests))
    return result, extra, step_log


def _engine_prefill_latencies(requests) -> list[float]:
    """Per request: from its sending to the end of its first prefill on an instance (the instance's clock)."""
    return [r.prefill_ends_s[0] - r.arrival_s for r in requests if r.prefill_ends_s]


def _dispatch_seconds(metrics_text: str) -> float:
    """Mean of ``llumnix_dispatch_seconds`` (policy choice + the instance's acknowledgement) from /metrics."""
    count = sum(metric_samples(metrics_text, "llumnix_dispatch_seconds_count"))
    return sum(metric_samples(metrics_text, "llumnix_dispatch_seconds_sum")) / count if count else math.nan


__all__ = ["run_real_cluster"]
