"""What the serving cluster shows of itself: per-instance rows (``/admin/instances``, ``/metrics``, the replay tool's
samples), every migration attempt (``/admin/migrations``), every instance's engine steps (``/admin/steps``) and block
accounting checks (tests, debugging)."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llumnix.runtime.cluster import ClusterManager


def instance_rows(manager: ClusterManager) -> list[dict[str, Any]]:
    """One row per instance: its latest load and counters."""
    rows = []
    for inst in manager.instances.values():
        ld, st = inst.load, inst.stats
        rows.append(
            {
                "instance_id": inst.instance_id,
                "alive": inst.alive,
                "running": ld.num_running if ld else 0,
                "waiting": ld.num_waiting if ld else 0,
                "free_blocks": ld.num_free_blocks if ld else 0,
                "total_blocks": ld.num_total_blocks if ld else inst.info["num_blocks"],
                "freeness": ld.freeness if ld else float("nan"),
                "draining": inst.draining or (bool(ld.draining) if ld else False),
                "migrations_in_flight": (ld.migrations_out + ld.migrations_in) if ld else 0,
                "steps": st.steps if st else 0,
                "busy_s": st.busy_s if st else 0.0,
                "finished": st.finished if st else 0,
                "preemptions": st.preemptions if st else 0,
                "head_demand_blocks": st.head_demand_blocks if st else 0,
                "watermark_blocks": st.watermark_blocks if st else inst.info["watermark_blocks"],
                "migrations_committed": st.migrations_committed if st else 0,
                "migrations_aborted": st.migrations_aborted if st else 0,
                "migration_downtime_s": st.migration_downtime_s if st else 0.0,
                "migration_bytes": st.migration_bytes if st else 0,
            }
        )
    return rows


def migration_rows(manager: ClusterManager, start: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
    """Migration attempts the cluster reported (``MigrationRecord`` fields, engine request ids and instance clocks),
    with the client request id each belongs to and ``seq``, its number among every attempt logged: from ``start`` (or
    the oldest kept: the log keeps the last 100,000), at most ``limit``."""
    log = manager.migration_log
    first_kept = manager.migrations_logged - len(log)
    first = max(start, first_kept)
    stop = manager.migrations_logged if limit is None else min(manager.migrations_logged, first + limit)
    rows = itertools.islice(log, first - first_kept, max(first, stop) - first_kept)
    return [{"seq": first + i, "client_request_id": client, **asdict(record)}
            for i, (client, record) in enumerate(rows)]


async def step_logs(manager: ClusterManager, instance_id: int | None = None, start: int = 0,
                    limit: int | None = None) -> list[dict[str, Any]]:
    """Steps of the live instances (or of ``instance_id``), one dict per step (``StepRecord`` fields and ``seq``, the
    step's number on its instance): on each instance from step ``start`` (or its oldest kept), at most ``limit``."""
    live = [inst for inst in manager.instances.values() if inst.alive
            and (instance_id is None or inst.instance_id == instance_id)]
    logs = await asyncio.gather(*(inst.actor.step_log.remote(start, limit) for inst in live), return_exceptions=True)
    return [{**asdict(step), "seq": first + i} for got in logs if not isinstance(got, BaseException)
            for first, steps in [got] for i, step in enumerate(steps)]


async def check_instances(manager: ClusterManager) -> dict[int, dict[str, Any]]:
    """Every live instance's block accounting (raises if broken)."""
    ids = [i.instance_id for i in manager.live_instances()]
    results = await asyncio.gather(*(manager.instances[i].actor.check.remote() for i in ids))
    return dict(zip(ids, results, strict=True))
