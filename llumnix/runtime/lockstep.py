"""The real serving runtime in lock-step with virtual time: the conformance check of "one scheduling path".

``run_lockstep`` serves a trace with the classes ``llumnix serve`` runs (``ClusterManager``, ``AutoScaler``,
``InstanceActor`` around an ``EngineInstance`` and its ``Llumlet``, the ``Migration`` driver and the object-store KV
transport) with two substitutions that take time and processes out of the picture, nothing else:

- the instance actors are objects of this process (``LocalLauncher``: calls are tasks, arguments copied as Ray
  copies them), stepping a ``ProfileExecutor`` whose steps and migration stages take the profile's time;
- the event loop runs on a virtual clock (``VirtualTimeLoop``): whenever nothing is ready it jumps to the next
  timer, so a step of 40 ms or a 10 s auto-scaling interval costs no wall time, and every event happens at the
  virtual time the profile gives it.

With the simulator run on the same trace, profile and system, every decision must then be the same, at the same
virtual time: dispatch, pairing, scaling (``GlobalScheduler.decisions``), preemptions, migrations (source,
destination, request, stages, commit or abort and why) and instance lifetimes. ``decision_tables`` puts both runs'
decisions in the same tables; ``tests/test_conformance.py`` compares them. A rule changed in the runtime only (or in
the simulator only) shows as the first row where they differ.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from llumnix.core.records import MigrationRecord
from llumnix.core.request import Request
from llumnix.policies.system import Decision


class _Timer(asyncio.TimerHandle):
    """A timer ordered by (time, creation): timers due at the same time run in the order they were set, as the
    simulator's event heap orders events of equal time by when they were pushed."""

    __slots__ = ("_seq",)

    def __lt__(self, other: _Timer) -> bool:
        return (self._when, self._seq) < (other._when, other._seq)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on a virtual clock that starts at 0. When no callback is ready it moves the clock to the next
    timer, exactly (timers run at their own time, never early), and runs every timer due then in the order they were
    set. Tasks of this process only: it performs no I/O (a thread's result or a socket would never arrive)."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0
        self._timer_seq = itertools.count()

    def time(self) -> float:
        return self._now

    def call_at(self, when, callback, *args, context=None):
        self._check_closed()
        timer = _Timer(when, callback, args, self, context)
        timer._seq = next(self._timer_seq)
        heapq.heappush(self._scheduled, timer)
        timer._scheduled = True
        return timer

    def _run_once(self) -> None:
        scheduled = self._scheduled
        while scheduled and scheduled[0]._cancelled:
            self._timer_cancelled_count -= 1
            heapq.heappop(scheduled)._scheduled = False
        if not self._ready:
            if self._stopping:
                return
            if not scheduled:
                raise RuntimeError("virtual time stands still: every task waits for something no timer will bring")
            self._now = max(self._now, scheduled[0]._when)
        while scheduled and scheduled[0]._when <= self._now:
            handle = heapq.heappop(scheduled)
            handle._scheduled = False
            self._ready.append(handle)
        for _ in range(len(self._ready)):
            handle = self._ready.popleft()
            if not handle._cancelled:
                handle._run()


def run_virtual(coro):
    """Run ``coro`` to completion on a fresh ``VirtualTimeLoop``."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


@dataclass
class LockstepResult:
    requests: list[Request]  # the trace's requests with the timeline the real runtime gave them
    decisions: list[Decision]
    migrations: list[MigrationRecord]
    instance_spans: list[tuple[int, float, float | None]]  # (instance id, launch_s, stop_s)
    end_s: float
    counters: dict[str, int] = field(default_factory=dict)


def serve_config_for(profile, system, num_instances: int, migration=None, profile_path: str | None = None,
                     load_reports: str = "per-step", preemption: str = "no_free_block"):
    """The ``ServeConfig`` of a cluster of profile-backed instances that runs ``system`` (a ``SystemConfig``) as the
    simulator does with ``profile`` (saved at ``profile_path``, or packaged under its name)."""
    from llumnix.core.migration import MigrationConfig
    from llumnix.runtime.serve_config import InstanceSpec, ServeConfig

    migration = migration or MigrationConfig()
    scaling = system.autoscale
    instance = InstanceSpec(
        backend="profile", profile=profile_path or profile.name, block_size=profile.block_size, num_blocks=profile.total_blocks,
        watermark=profile.watermark, max_num_seqs=profile.max_num_seqs, max_batched_tokens=profile.max_batched_tokens,
        priorities=system.priorities, local_priority=system.local_priority, candidate=system.candidate,
        load_reports=load_reports, preemption=preemption,
        last_stage_blocks=migration.last_stage_max_blocks,
        max_stages=migration.max_stages,
    )
    values = dict(
        instances=num_instances, policy=system.policy, migration=system.migration,
        migration_threshold=system.migration_threshold, pairing_interval_s=system.pairing_interval_s,
        migration_cooldown_s=system.migration_cooldown_s, poll_timeout_s=3600.0, instance=instance,
    )
    if scaling is not None:
        values.update(
            autoscale=True, scale_up=scaling.scale_up, scale_down=scaling.scale_down,
            min_instances=scaling.min_instances, max_instances=scaling.max_instances,
            scale_interval_s=scaling.check_interval_s, startup_delay_s=scaling.startup_delay_s,
            scale_first_check_s=scaling.first_check_s, scale_down_queued=scaling.scale_down_queued,
            requeue_on_drain=scaling.requeue_on_drain, scaling_rule=scaling.rule, initial_instances=num_instances,
        )
    return ServeConfig(**values)


async def _serve(trace: pd.DataFrame, config) -> LockstepResult:
    from llumnix.runtime.actors import LocalLauncher
    from llumnix.runtime.cluster import ClusterManager

    loop = asyncio.get_running_loop()
    launcher = LocalLauncher(clock=loop.time, idle_wait_s=None)
    manager = ClusterManager(config, launcher, clock=loop.time, record_decisions=True)
    await manager.start()
    rows = list(trace.sort_values(["arrival_s", "request_id"], kind="stable").itertuples(index=False))
    clients: dict[int, Any] = {}

    async def client(row) -> None:
        at = loop.create_future()
        loop.call_at(float(row.arrival_s), at.set_result, None)  # exactly at its arrival, as the simulator
        await at
        cr = await manager.submit([0] * int(row.prompt_tokens), int(row.output_tokens), int(row.priority))
        clients[int(row.request_id)] = cr
        while not cr.done:
            await cr.wait_for_change(len(cr.tokens))

    await asyncio.gather(*(client(r) for r in rows))
    end = loop.time()
    await manager.stop()
    trace_id = {cr.engine_id: rid for rid, cr in clients.items()}
    by_client = {cr.request_id: rid for rid, cr in clients.items()}
    migrations = [_renamed(m, by_client[client]) for client, m in manager.migration_log]
    requests = []
    for row in rows:
        rid = int(row.request_id)
        cr = clients[rid]
        if cr.error is not None:
            raise RuntimeError(f"request {rid} failed in the real runtime: {cr.error}")
        stats = cr.attempts[-1]
        req = Request(rid, float(row.arrival_s), int(row.prompt_tokens), int(row.output_tokens), int(row.priority))
        req.num_generated, req.first_token_s, req.finish_s = len(cr.tokens), cr.first_token_s, cr.finish_s
        req.dispatch_s, req.instances = stats.dispatch_s, list(stats.instances)
        req.preemptions_s, req.prefill_ends_s = list(stats.preemptions_s), list(stats.prefill_ends_s)
        req.migrations = [m for m in migrations if m.request_id == rid]
        requests.append(req)
    decisions = [Decision(d.time_s, d.kind, d.instance, d.dst, trace_id.get(d.request_id, d.request_id))
                 for d in manager.gs.decisions]
    migrations.sort(key=lambda m: (m.start_s, m.src, m.request_id))
    spans = sorted((iid, s.launch_s, s.stop_s) for iid, s in manager.spans.items())
    return LockstepResult(requests, decisions, migrations, spans, end, dict(manager.counters))


def _renamed(m: MigrationRecord, request_id: int) -> MigrationRecord:
    return MigrationRecord(**{**asdict(m), "request_id": request_id})


def run_lockstep(trace: pd.DataFrame, profile, system, num_instances: int, migration=None,
                 load_reports: str = "per-step", preemption: str = "no_free_block") -> LockstepResult:
    """Serve ``trace`` (a ``llumnix trace`` table) with the real runtime's classes on a virtual clock."""
    with tempfile.TemporaryDirectory(prefix="llumnix-lockstep-") as tmp:
        path = profile.save(Path(tmp) / f"{profile.name}.json")
        config = serve_config_for(profile, system, num_instances, migration, str(path), load_reports, preemption)
        return run_virtual(_serve(trace, config))


# -- the decisions of a run, as tables -------------------------------------------------------------------------------
DECISION_TABLES = ("decisions", "requests", "migrations", "instances")


def decision_tables(decisions: Iterable[Decision], requests: Iterable[Request],
                    migrations: Iterable[MigrationRecord],
                    instance_spans: Iterable[tuple[int, float, float | None]]) -> dict[str, pd.DataFrame]:
    """Every decision of a run, in tables that two runtimes fill alike: the global scheduler's (in order), each
    request's placements and preemptions, every migration attempt (without its id, which each runtime numbers its
    own way), every instance's lifetime."""
    mig_cols = [f.name for f in fields(MigrationRecord) if f.name != "migration_id"]
    return {
        "decisions": pd.DataFrame([asdict(d) for d in decisions], columns=[f.name for f in fields(Decision)]),
        "requests": pd.DataFrame(
            [(r.request_id, r.dispatch_s, ">".join(map(str, r.instances)), tuple(r.preemptions_s),
              tuple(r.prefill_ends_s), r.first_token_s, r.finish_s) for r in sorted(requests, key=lambda r: r.request_id)],
            columns=["request_id", "dispatch_s", "instances", "preemptions_s", "prefill_ends_s", "first_token_s",
                     "finish_s"],
        ),
        "migrations": pd.DataFrame(
            [{c: getattr(m, c) for c in mig_cols} for m in sorted(migrations, key=lambda m: (m.start_s, m.src))],
            columns=mig_cols,
        ),
        "instances": pd.DataFrame(sorted(instance_spans), columns=["instance_id", "launch_s", "stop_s"]),
    }


def first_difference(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame], names=("simulator", "runtime"),
                     rel_tol: float = 1e-9) -> str | None:
    """The first row where two runs' decision tables differ (times compared to ``rel_tol``), or None if alike."""
    for table in DECISION_TABLES:
        x, y = a[table].reset_index(drop=True), b[table].reset_index(drop=True)
        for i in range(max(len(x), len(y))):
            if i >= len(x) or i >= len(y):
                extra = names[1] if i >= len(x) else names[0]
                row = (y if i >= len(x) else x).iloc[i].to_dict()
                return f"{table}: only the {extra} has row {i}: {row}"
            rx, ry = x.iloc[i].to_dict(), y.iloc[i].to_dict()
            if not all(_same(rx[c], ry[c], rel_tol) for c in rx):
                return f"{table} row {i} differs:\n  {names[0]}: {rx}\n  {names[1]}: {ry}"
    return None


def _same(a: Any, b: Any, rel_tol: float) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y, rel_tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None or pd.isna(a) or pd.isna(b):
            return (a is None or pd.isna(a)) and (b is None or pd.isna(b))
        return abs(a - b) <= rel_tol * max(1.0, abs(a), abs(b))
    return a == b


__all__ = [
    "DECISION_TABLES",
    "LockstepResult",
    "VirtualTimeLoop",
    "decision_tables",
    "first_difference",
    "run_lockstep",
    "run_virtual",
    "serve_config_for",
]
