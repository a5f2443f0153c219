"""Replay a trace against a serving frontend (``llumnix replay``) and write the same tables as ``llumnix simulate``.

Each trace row becomes one streaming ``/v1/completions`` request sent at its arrival time (times ``time_scale``), with
a prompt of ``prompt_tokens`` random token ids (seeded), ``max_tokens = output_tokens`` and ``ignore_eos``. The client
records when it sent the request, when the first token arrived and when the last did; these client-side times are
the latencies in ``requests.parquet`` / ``summary.json``. Engine-side events the server reports with the last chunk
(preemptions, prefills, migrations; wall-clock seconds of the instance hosts) are put on the same time axis, which
assumes the client's and the instances' clocks agree (one host, or NTP). Every ``sample_interval_s`` the replay also
reads ``/admin/instances`` into ``instances.parquet`` (load per instance, and fragmentation as the simulator computes it).

The cost, ``avg_instances`` (the time-weighted average number of instances, start-up time included, as the simulator
counts it), comes from the frontend's ``/admin/scaling``, read just before the first request and after the last one:
the instance-seconds between the two reads over the time between them. Against a frontend without that endpoint it
falls back to the mean number of live instances over the load samples.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llumnix.core.records import MigrationRecord
from llumnix.core.request import Request, RequestStatus
from llumnix.metrics import (
    InstanceSample,
    instance_rows,
    instance_table,
    migration_summary,
    migration_table,
    request_table,
    summarize,
    write_outputs,
)
from llumnix.metrics.tables import records_from_rows

log = logging.getLogger(__name__)

TRACE_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")


def load_trace(path: Path) -> pd.DataFrame:
    """A trace written by ``llumnix trace`` (CSV, or Parquet by suffix); ``request_id`` and ``priority`` optional."""
    path = Path(path)
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    missing = [c for c in TRACE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: trace lacks column(s) {', '.join(missing)} (has {', '.join(map(str, df.columns))})")
    if "request_id" not in df.columns:
        df = df.assign(request_id=np.arange(len(df)))
    if "priority" not in df.columns:
        df = df.assign(priority=0)
    if (df["prompt_tokens"] < 1).any() or (df["output_tokens"] < 1).any():
        raise ValueError(f"{path}: prompt_tokens and output_tokens must be >= 1")
    return df.sort_values(["arrival_s", "request_id"], kind="stable").reset_index(drop=True)


@dataclass
class ReplayResult:
    requests: list[Request]
    samples: list[tuple]  # rows of llumnix.metrics.INSTANCE_COLUMNS
    migrations: list[MigrationRecord]
    errors: list[str]
    wall_s: float
    max_send_lag_s: float
    model: dict[str, Any] = field(default_factory=dict)
    scaling: list[dict[str, Any]] = field(default_factory=list)  # /admin/scaling before the first and after the last
    client_ids: dict[str, Request] = field(default_factory=dict)  # the server's id of each request -> the request
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # client id -> the response's llumnix block


def instance_samples(rows: list[dict]) -> list[InstanceSample]:
    """``/admin/instances`` rows as the samples ``llumnix.metrics`` tabulates (fragmentation included)."""
    return [
        InstanceSample(
            int(r["instance_id"]), bool(r["alive"]), int(r["running"]), int(r["waiting"]), int(r["free_blocks"]),
            int(r["total_blocks"]), int(r["watermark_blocks"]), int(r["head_demand_blocks"]),
            float("nan") if r["freeness"] is None else float(r["freeness"]), bool(r["draining"]),
        )
        for r in rows
    ]


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def _sample_loop(client, url: str, t0: float, interval_s: float, out: list[dict], stop: asyncio.Event,
                       admin: dict[str, str]) -> None:
    while not stop.is_set():
        try:
            resp = await client.get(f"{url}/admin/instances", timeout=10.0, headers=admin)
            resp.raise_for_status()
            rows = resp.json()
        except Exception as e:  # a missed sample is not worth failing the replay for
            log.debug("sample failed: %r", e)
        else:
            out.extend(instance_rows(time.time() - t0, instance_samples(rows)))
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except asyncio.TimeoutError:
            pass


async def _scaling_status(client, url: str, admin: dict[str, str]) -> dict[str, Any] | None:
    try:
        resp = await client.get(f"{url}/admin/scaling", timeout=10.0, headers=admin)
    except Exception as e:
        log.debug("no scaling status: %r", e)
        return None
    return resp.json() if resp.status_code == 200 else None


def cost_between(before: dict[str, Any], after: dict[str, Any]) -> tuple[float, float]:
    """(instance-seconds, time-weighted average number of instances) between two ``/admin/scaling`` reads."""
    seconds = float(after["instance_seconds"]) - float(before["instance_seconds"])
    span = float(after["time_s"]) - float(before["time_s"])
    return seconds, (seconds / span if span > 0 else float("nan"))


async def _one(client, url: str, req: Request, t0: float, send_at: float, result: ReplayResult, timeout_s: float):
    await asyncio.sleep(max(0.0, t0 + send_at - time.time()))
    sent = time.time()
    result.max_send_lag_s = max(result.max_send_lag_s, sent - (t0 + send_at))
    req.arrival_s = sent - t0
    body = {
        "prompt": req.prompt_token_ids,
        "max_tokens": req.output_tokens,
        "ignore_eos": True,
        "stream": True,
        "priority": req.priority,
    }
    extra: dict[str, Any] | None = None
    last = None
    client_id: str | None = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout_s) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                result.errors.append(f"request {req.request_id}: HTTP {resp.status_code}: {text[:300]}")
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.errors.append(f"request {req.request_id}: {chunk['error'].get('message')}")
                    return
                now = time.time() - t0
                client_id = chunk["id"]
                ids = chunk["choices"][0]["token_ids"]
                if ids and req.first_token_s is None:
                    req.first_token_s = now
                req.num_generated += len(ids)
                req.output_token_ids.extend(ids)
                last = now
                extra = chunk.get("llumnix", extra)
    except Exception as e:
        result.errors.append(f"request {req.request_id}: {e!r}")
        return
    if req.num_generated == req.output_tokens and last is not None:
        req.finish_s = last
        req.status = RequestStatus.FINISHED
    else:
        result.errors.append(f"request {req.request_id}: got {req.num_generated} of {req.output_tokens} tokens")
    if extra:
        _apply_engine_timeline(req, extra, t0, result)
    if client_id is not None:
        result.client_ids[client_id] = req
        if extra:
            result.summaries[client_id] = extra


def _apply_engine_timeline(req: Request, info: dict[str, Any], t0: float, result: ReplayResult) -> None:
    req.instances = [int(i) for i in info.get("instances", [])]
    req.preemptions_s = [t - t0 for t in info.get("preemptions_s", [])]
    req.prefill_ends_s = [t - t0 for t in info.get("prefill_ends_s", [])]
    if info.get("dispatch_s") is not None:
        req.dispatch_s = info["dispatch_s"] - t0


async def admin_pages(client, url: str, admin: dict[str, str], params: dict[str, Any] | None = None,
                      timeout_s: float = 30.0) -> list[dict[str, Any]] | None:
    """Every row of a paged admin listing (``/admin/migrations``, ``/admin/steps`` of one instance: rows numbered by
    ``seq``), page after page; None without access (no admin key, or an older frontend)."""
    rows: list[dict[str, Any]] = []
    start = 0
    while True:
        resp = await client.get(url, params={**(params or {}), "start": start}, timeout=timeout_s, headers=admin)
        if resp.status_code != 200:
            return None
        page = resp.json()
        if not page or "seq" not in page[0]:
            return rows + page
        rows += page
        start = page[-1]["seq"] + 1


async def _migrations(client, url: str, t0: float, result: ReplayResult, admin: dict[str, str]) -> None:
    """Every migration attempt from ``/admin/migrations`` (those that ended after their request too), on the
    client's time axis under the trace's request ids; without that endpoint, what the responses carried."""
    try:
        rows = await admin_pages(client, f"{url}/admin/migrations", admin)
    except Exception as e:
        log.debug("no migration log: %r", e)
        rows = None
    if rows is None:
        rows = [{"client_request_id": cid, **m} for cid, info in result.summaries.items()
                for m in info.get("migration_records", [])]
    for req in result.requests:
        req.migrations = []
    for row in rows:
        req = result.client_ids.get(row["client_request_id"])
        if req is None:
            continue  # a request of another client
        (m,) = records_from_rows(MigrationRecord, [row])
        m = replace(m, request_id=req.request_id, start_s=m.start_s - t0, end_s=m.end_s - t0)
        req.migrations.append(m)
        result.migrations.append(m)


async def replay(
    url: str,
    trace: pd.DataFrame,
    time_scale: float = 1.0,
    seed: int = 0,
    sample_interval_s: float = 1.0,
    request_timeout_s: float = 3600.0,
    progress=None,
    api_key: str | None = None,
    admin_key: str | None = None,
) -> ReplayResult:
    """``api_key`` goes to /v1/*, ``admin_key`` to /admin/* (load samples, migrations, cost)."""
    import httpx

    url = url.rstrip("/")
    if time_scale <= 0:
        raise ValueError(f"--time-scale must be > 0, got {time_scale}")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    admin = bearer(admin_key)
    async with httpx.AsyncClient(limits=limits, timeout=30.0, headers=bearer(api_key)) as client:
        resp = await client.get(f"{url}/v1/models")
        resp.raise_for_status()
        model = resp.json()["data"][0]
        vocab = int(model["vocab_size"])
        rng = np.random.default_rng(seed)
        requests = [
            Request(
                int(r.request_id), float(r.arrival_s), int(r.prompt_tokens), int(r.output_tokens), int(r.priority),
                prompt_token_ids=rng.integers(0, vocab, int(r.prompt_tokens)).tolist(),
            )
            for r in trace.itertuples(index=False)
        ]
        result = ReplayResult(requests, [], [], [], 0.0, 0.0, model)
        before = await _scaling_status(client, url, admin)
        if before is None:
            log.warning("%s/admin/* answers nothing to this client (no --admin-key, or a wrong one): no load samples, "
                        "and cost and migrations come from the responses alone", url)
        t0 = time.time() + 0.2  # a little lead so the first sends are not late
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_loop(client, url, t0, sample_interval_s, result.samples, stop, admin))

        async def tracked(req: Request):
            await _one(client, url, req, t0, req.arrival_s * time_scale, result, request_timeout_s)
            if progress is not None:
                progress(1)

        started = time.perf_counter()
        try:
            await asyncio.gather(*(tracked(r) for r in requests))
        finally:
            stop.set()
            await sampler
        result.wall_s = time.perf_counter() - started
        await _migrations(client, url, t0, result, admin)
        after = await _scaling_status(client, url, admin)
        if before is not None and after is not None:
            result.scaling = [before, after]
    return result


def write_replay_outputs(result: ReplayResult, out_dir: Path, extra: dict[str, Any]) -> dict:
    req_df = request_table(result.requests)
    inst_df = instance_table(result.samples)
    mig_df = migration_table(result.migrations)
    kv_bytes_per_block = int(result.model.get("kv_bytes_per_block") or 0)
    migrations = migration_summary(mig_df, kv_bytes_per_block)
    cost: dict[str, Any] = {}
    if len(result.scaling) == 2:
        before, after = result.scaling
        instance_seconds, avg_instances = cost_between(before, after)
        events = [e for e in after.get("events", []) if e["time_s"] >= before["time_s"]]
        rows = float(after.get("step_rows", 0)) - float(before.get("step_rows", 0))
        instances = float(after.get("step_instance_sum", 0)) - float(before.get("step_instance_sum", 0))
        cost = {
            "avg_instances_source": "frontend",
            "avg_instances_per_step": instances / rows if rows > 0 else float("nan"),
            "instance_seconds": instance_seconds,
            "instances_at_end": after.get("instances"),
            "scale_events": {k: sum(e["event"] == k for e in events) for k in ("launch", "drain", "stop", "failed")},
        }
    else:  # an older frontend: the live instances over the samples (misses instances still starting)
        avg_instances = float(inst_df.groupby("time_s")["alive"].sum().mean()) if len(inst_df) else float("nan")
        cost = {"avg_instances_source": "samples"}
    summary = summarize(
        req_df,
        inst_df,
        avg_instances=avg_instances,
        migrations=migrations,
        extra={
            **extra,
            "runtime": "ray",
            "model": result.model.get("id"),
            "errors": len(result.errors),
            "error_examples": result.errors[:5],
            "wall_s": result.wall_s,
            "max_send_lag_s": result.max_send_lag_s,
            **cost,
        },
    )
    write_outputs(out_dir, req_df, inst_df, summary, migrations=mig_df)
    return summary


def run_replay(
    url: str,
    trace_path: Path,
    out_dir: Path,
    time_scale: float = 1.0,
    seed: int = 0,
    sample_interval_s: float = 1.0,
    request_timeout_s: float = 3600.0,
    progress: bool = False,
    api_key: str | None = None,
    admin_key: str | None = None,
) -> dict:
    """The body of ``llumnix replay``."""
    from tqdm.auto import tqdm

    trace = load_trace(trace_path)
    with tqdm(total=len(trace), desc="replaying", unit="req", disable=not progress, leave=False) as bar:
        result = asyncio.run(
            replay(url, trace, time_scale, seed, sample_interval_s, request_timeout_s, progress=bar.update,
                   api_key=api_key, admin_key=admin_key)
        )
    extra = {"url": url, "trace": str(trace_path), "time_scale": time_scale, "seed": seed}
    summary = write_replay_outputs(result, Path(out_dir), extra)
    if result.errors:
        log.warning("%d of %d requests failed, e.g. %s", len(result.errors), len(trace), result.errors[0])
    return summary
