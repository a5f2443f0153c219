"""The serving cluster's control side: instance actors, the global scheduler and per-request token streams.

``ClusterManager`` lives in the frontend's process and event loop. It starts one ``InstanceActor`` per instance, keeps a
standing ``poll()`` call on each (the instance answers when a step ends: its tokens, finished requests, migrations and
its ``InstanceLoad``), dispatches new requests with the system's dispatch policy over the latest loads, pairs
migrations on a timer with the system's pairing policy and tells source actors to migrate. The policies are the same
``GlobalScheduler`` the simulator runs.

Load reports are asynchronous, so requests dispatched after an instance's last report are not in it yet;
``account_pending`` adds them (as queued demand) until the instance reports having received them, so that a burst is
not sent to one instance.

Fault tolerance: when an instance actor dies (or its step fails), every unfinished request it held is dispatched again
with the tokens already streamed appended to its prompt (recompute), under a new engine request id; late outputs of the
old attempt are ignored. Auto-scaling is not implemented in this runtime yet (the simulator has it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from llumnix.core.block_manager import blocks_for
from llumnix.core.llumlet import InstanceLoad
from llumnix.core.request import HIGH, NORMAL, Request
from llumnix.policies.system import GlobalScheduler, SystemConfig
from llumnix.runtime.ray_instance import (
    InstanceActor,
    InstanceStats,
    Report,
    RequestDone,
    RequestLost,
    RequestMoved,
    RequestStats,
    TokenBatch,
)
from llumnix.runtime.serve_config import ServeConfig

log = logging.getLogger(__name__)


class NoInstanceError(RuntimeError):
    """No live instance can take a request."""


def account_pending(load: InstanceLoad, pending: list[tuple[int, bool]]) -> InstanceLoad:
    """``load`` as it will be once the instance has queued the requests dispatched after it reported.

    ``pending``: (prompt blocks, is high priority) per request. Queued requests count as demand on the instance's free
    blocks (its llumlet's default: every waiting request counts), and a queue adds one to the freeness denominator.
    """
    if not pending:
        return load
    n = len(pending)
    demand = sum(b for b, _ in pending)
    high = sum(1 for _, h in pending if h)
    if not (math.isfinite(load.freeness) and math.isfinite(load.freeness_high)):
        return replace(load, num_waiting=load.num_waiting + n, num_high=load.num_high + high)
    before = max(1, load.num_running + (1 if load.num_waiting else 0))
    after = max(1, load.num_running + 1)
    return replace(
        load,
        num_waiting=load.num_waiting + n,
        num_high=load.num_high + high,
        freeness=(load.freeness * before - demand) / after,
        freeness_high=(load.freeness_high * before - demand) / after,
    )


@dataclass
class LatencyStats:
    """Count, sum and a window of recent samples (for quantiles) of one latency, in seconds."""

    count: int = 0
    total_s: float = 0.0
    recent: deque = field(default_factory=lambda: deque(maxlen=10_000))

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.total_s += seconds
        self.recent.append(seconds)

    @property
    def mean_s(self) -> float:
        return self.total_s / self.count if self.count else float("nan")

    def quantile(self, q: float) -> float:
        if not self.recent:
            return float("nan")
        ordered = sorted(self.recent)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class ClientRequest:
    """A client's completion request as the frontend tracks it, across migrations and re-dispatches."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    priority: int
    arrival_s: float
    tokens: list[int] = field(default_factory=list)
    first_token_s: float | None = None
    finish_s: float | None = None
    error: str | None = None
    engine_id: int = -1  # the engine request id of the current attempt
    offset: int = 0  # tokens streamed before the current attempt started (its outputs are numbered from here)
    owner: int | None = None
    instances: list[int] = field(default_factory=list)
    migrations: int = 0
    migration_downtime_s: float = 0.0
    redispatches: int = 0
    attempts: list[RequestStats] = field(default_factory=list)
    dispatching: bool = False
    _max_pos: int = -1  # the highest output position seen: whoever sent it holds the request
    _out_of_order: dict[int, int] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return self.finish_s is not None or self.error is not None

    async def wait_for_change(self, seen_tokens: int) -> None:
        """Return once more than ``seen_tokens`` tokens exist or the request is done."""
        while len(self.tokens) <= seen_tokens and not self.done:
            self._changed.clear()
            await self._changed.wait()

    def summary(self) -> dict[str, Any]:
        """The ``llumnix`` extension block of a completion response (engine timelines in wall-clock seconds)."""
        return {
            "instances": list(self.instances),
            "migrations": self.migrations,
            "migration_downtime_s": self.migration_downtime_s,
            "redispatches": self.redispatches,
            "preemptions": sum(len(a.preemptions_s) for a in self.attempts),
            "preemptions_s": [t for a in self.attempts for t in a.preemptions_s],
            # (start_s, end_s, src, dst, downtime_s, stages, committed) of every migration attempt, aborted ones too
            "migration_records": [list(m) for a in self.attempts for m in a.migrations],
            "prefill_ends_s": [t for a in self.attempts for t in a.prefill_ends_s],
            "arrival_s": self.arrival_s,
            "first_token_s": self.first_token_s,
            "finish_s": self.finish_s,
        }


@dataclass
class InstanceHandle:
    instance_id: int
    actor: Any
    info: dict[str, Any]
    alive: bool = True
    load: InstanceLoad | None = None
    stats: InstanceStats | None = None
    num_received: int = 0
    sent: int = 0
    pending: deque = field(default_factory=deque)  # (sequence number, prompt blocks, is high) not yet reported
    last_report_s: float = 0.0
    failure: str | None = None

    def effective_load(self) -> InstanceLoad | None:
        if self.load is None:
            return None
        while self.pending and self.pending[0][0] <= self.num_received:
            self.pending.popleft()
        return account_pending(self.load, [(b, h) for _, b, h in self.pending])


class ClusterManager:
    """Start with ``await start()`` inside the serving event loop; ``await stop()`` kills the actors."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.gs = GlobalScheduler(
            SystemConfig(
                policy=config.policy,
                migration=config.migration,
                migration_threshold=config.migration_threshold,
                pairing_interval_s=config.pairing_interval_s,
                priorities=config.instance.priorities,
            )
        )
        self.instances: dict[int, InstanceHandle] = {}
        self.active: dict[str, ClientRequest] = {}
        self._by_engine: dict[int, ClientRequest] = {}
        self._client_ids = itertools.count()
        self._engine_ids = itertools.count()
        self._migration_ids = itertools.count()
        self._tasks: set[asyncio.Task] = set()
        self._running = False
        self.dispatch_latency = LatencyStats()  # policy decision + the instance's acknowledgement
        self.decision_latency = LatencyStats()  # the dispatch policy's choice alone
        self.counters = {
            "requests": 0,
            "finished": 0,
            "failed": 0,
            "redispatched": 0,
            "instance_failures": 0,
            "migrations_requested": 0,
            "migrations_started": 0,
        }

    # -- lifecycle -----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        import ray

        spec = self.config.instance
        self._check_resources(ray.cluster_resources())
        actor_cls = ray.remote(InstanceActor)
        actors = [
            actor_cls.options(
                num_cpus=self.config.num_cpus_per_instance,
                num_gpus=self.config.gpus_per_instance,
                max_concurrency=1000,
            ).remote(i, spec)
            for i in range(self.config.instances)
        ]
        try:
            infos = await asyncio.wait_for(
                asyncio.gather(*(a.start.remote() for a in actors)), self.config.startup_timeout_s
            )
            reports = await asyncio.gather(*(a.poll.remote(0.0) for a in actors))
        except BaseException as e:
            for a in actors:
                with contextlib.suppress(Exception):
                    ray.kill(a, no_restart=True)
            if isinstance(e, asyncio.TimeoutError):
                raise RuntimeError(
                    f"the {len(actors)} instance actors did not start within {self.config.startup_timeout_s:.0f} s "
                    "(are the CPUs / GPUs they ask for free? see `ray status`)"
                ) from None
            raise
        for i, (actor, info, report) in enumerate(zip(actors, infos, reports, strict=True)):
            inst = InstanceHandle(i, actor, info)
            self.instances[i] = inst
            self._apply_report(inst, report)
            self.gs.dispatch.on_instance_added(i)
        self._running = True
        for inst in self.instances.values():
            self._spawn(self._poll_loop(inst))
        if self.gs.migrates:
            self._spawn(self._pairing_loop())
        log.info("cluster up: %d instances, policy %s, migration %s", len(actors), self.config.policy, self.gs.migrates)

    def _check_resources(self, total: dict[str, float]) -> None:
        """Fail fast (rather than wait forever for actors Ray cannot place) when the cluster is too small."""
        n = self.config.instances
        for resource, each, flag in (
            ("CPU", self.config.num_cpus_per_instance, "--num-cpus-per-instance"),
            ("GPU", self.config.gpus_per_instance, "--num-gpus-per-instance"),
        ):
            need, have = n * each, total.get(resource, 0.0)
            if need > have + 1e-9:
                raise RuntimeError(
                    f"{n} instances x {each:g} {resource} = {need:g} {resource}, but the Ray cluster has {have:g}; "
                    f"use fewer --instances or a smaller {flag}"
                )

    async def stop(self) -> None:
        import ray

        self._running = False
        for task in list(self._tasks):
            task.cancel()
        for inst in self.instances.values():
            if inst.alive:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(inst.actor.stop.remote(), 5.0)
            with contextlib.suppress(Exception):
                ray.kill(inst.actor, no_restart=True)
            inst.alive = False
        for cr in self.active.values():
            if not cr.done:
                cr.error = "server shutting down"
                cr._changed.set()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- facts for request validation ----------------------------------------------------------------------------
    @property
    def any_info(self) -> dict[str, Any]:
        return next(iter(self.instances.values())).info

    @property
    def vocab_size(self) -> int:
        return int(self.any_info["vocab_size"])

    @property
    def max_context_tokens(self) -> int:
        """Most prompt + output tokens one request may need: the smaller of the model's positions and the KV pool."""
        info = self.any_info
        kv = (info["num_blocks"] - info["watermark_blocks"]) * info["block_size"]
        return int(min(info["max_position"], kv))

    def live_instances(self) -> list[InstanceHandle]:
        return [i for i in self.instances.values() if i.alive]

    # -- requests ------------------------------------------------------------------------------------------------
    async def submit(self, prompt_ids: list[int], max_tokens: int, priority: int = NORMAL) -> ClientRequest:
        """Dispatch a new request; its tokens then arrive in ``ClientRequest.tokens``. Raises NoInstanceError."""
        if priority not in (NORMAL, HIGH):
            raise ValueError(f"priority must be {NORMAL} or {HIGH}")
        cr = ClientRequest(f"cmpl-{next(self._client_ids)}", list(prompt_ids), max_tokens, priority, time.time())
        self.counters["requests"] += 1
        self.active[cr.request_id] = cr
        try:
            await self._dispatch(cr)
        except Exception:
            self.active.pop(cr.request_id, None)
            raise
        return cr

    def _dispatch_loads(self) -> list[InstanceLoad]:
        loads = []
        for inst in self.live_instances():
            load = inst.effective_load()
            if load is not None:
                loads.append(load)
        return loads

    async def _dispatch(self, cr: ClientRequest) -> None:
        import ray

        cr.dispatching = True
        try:
            while True:
                t0 = time.perf_counter()
                loads = self._dispatch_loads()
                if not loads:
                    raise NoInstanceError("no live instance can take the request")
                ids = cr.prompt_ids + cr.tokens
                req = Request(
                    next(self._engine_ids), time.time(), len(ids), cr.max_tokens - len(cr.tokens), cr.priority,
                    prompt_token_ids=ids,
                )
                iid = self.gs.dispatch.choose(req, loads)
                t_choice = time.perf_counter() - t0
                inst = self.instances[iid]
                inst.sent += 1
                inst.pending.append((inst.sent, blocks_for(len(ids), inst.info["block_size"]), req.is_high))
                self._by_engine.pop(cr.engine_id, None)
                cr.engine_id, cr.offset, cr.owner = req.request_id, len(cr.tokens), iid
                cr._out_of_order.clear()
                cr._max_pos = len(cr.tokens) - 1
                cr.instances.append(iid)
                self._by_engine[req.request_id] = cr
                try:
                    await inst.actor.add_request.remote(req)
                except ray.exceptions.RayActorError as e:
                    self._instance_failed(inst, f"actor died: {e}")
                    continue
                if not inst.alive:  # it died after taking the request (its failure skipped us: we were dispatching)
                    continue
                self.decision_latency.observe(t_choice)
                self.dispatch_latency.observe(time.perf_counter() - t0)
                return
        finally:
            cr.dispatching = False

    def _schedule_redispatch(self, cr: ClientRequest, reason: str) -> None:
        """Dispatch ``cr`` again (at most once at a time), recomputing from its prompt and the tokens streamed."""
        if cr.done or cr.dispatching:
            return
        cr.dispatching = True  # until the new attempt is placed: later failure news must not dispatch it twice
        self._spawn(self._redispatch(cr, reason))

    async def _redispatch(self, cr: ClientRequest, reason: str) -> None:
        try:
            if cr.done:
                return
            cr.redispatches += 1
            self.counters["redispatched"] += 1
            log.info("re-dispatching %s after %d tokens (%s)", cr.request_id, len(cr.tokens), reason)
            if len(cr.tokens) >= cr.max_tokens:
                self._complete(cr)
                return
            try:
                await self._dispatch(cr)
            except Exception as e:
                self._fail(cr, f"could not re-dispatch after {reason}: {e}")
        finally:
            cr.dispatching = False

    def _complete(self, cr: ClientRequest) -> None:
        cr.finish_s = time.time()
        self._by_engine.pop(cr.engine_id, None)
        self.active.pop(cr.request_id, None)
        self.counters["finished"] += 1
        cr._changed.set()

    def _fail(self, cr: ClientRequest, reason: str) -> None:
        cr.error = reason
        self._by_engine.pop(cr.engine_id, None)
        self.active.pop(cr.request_id, None)
        self.counters["failed"] += 1
        cr._changed.set()

    # -- reports -------------------------------------------------------------------------------------------------
    async def _poll_loop(self, inst: InstanceHandle) -> None:
        import ray

        while self._running and inst.alive:
            try:
                report = await inst.actor.poll.remote(self.config.poll_timeout_s)
            except ray.exceptions.RayActorError as e:
                self._instance_failed(inst, f"actor died: {e}")
                return
            except Exception:
                log.exception("instance %d: poll failed", inst.instance_id)
                await asyncio.sleep(0.1)
                continue
            self._apply_report(inst, report)
            if report.failed:
                self._instance_failed(inst, report.failed)
                return

    def _apply_report(self, inst: InstanceHandle, report: Report) -> None:
        inst.load = report.load
        inst.stats = report.stats
        inst.num_received = report.num_received
        inst.last_report_s = time.time()
        # Engine timelines first: a request's last tokens complete it, and they come in the same report.
        for event in report.events:
            if isinstance(event, RequestDone):
                cr = self._by_engine.get(event.request_id)
                if cr is not None:
                    cr.attempts.append(event.stats)
        for event in report.events:
            if isinstance(event, TokenBatch):
                self._on_tokens(inst.instance_id, event.tokens)
            elif isinstance(event, RequestMoved):
                cr = self._by_engine.get(event.request_id)
                if cr is not None:
                    cr.owner = event.dst
                    cr.migrations += 1
                    cr.migration_downtime_s += event.downtime_s
                    cr.instances.append(event.dst)
                    self._check_owner(cr)
            elif isinstance(event, RequestLost):
                cr = self._by_engine.get(event.request_id)
                if cr is not None:
                    self._schedule_redispatch(cr, event.reason)

    def _on_tokens(self, instance_id: int, tokens: list[tuple[int, int, int]]) -> None:
        now = time.time()
        for engine_id, index, token in tokens:
            cr = self._by_engine.get(engine_id)
            if cr is None or cr.done:
                continue  # a superseded attempt, or already complete
            pos = cr.offset + index
            if pos < len(cr.tokens):
                continue
            # A migrated request's last tokens on the source and first on the destination come through two streams.
            cr._out_of_order[pos] = token
            if pos > cr._max_pos:
                cr._max_pos, cr.owner = pos, instance_id
            while len(cr.tokens) in cr._out_of_order:
                cr.tokens.append(cr._out_of_order.pop(len(cr.tokens)))
            if cr.first_token_s is None and cr.tokens:
                cr.first_token_s = now
            if len(cr.tokens) >= cr.max_tokens:
                del cr.tokens[cr.max_tokens :]
                self._complete(cr)
            else:
                cr._changed.set()
                self._check_owner(cr)

    def _check_owner(self, cr: ClientRequest) -> None:
        """News that a request moved to an instance may arrive after that instance's failure was handled."""
        owner = self.instances.get(cr.owner) if cr.owner is not None else None
        if owner is not None and not owner.alive:
            self._schedule_redispatch(cr, f"instance {cr.owner} failed")

    def _instance_failed(self, inst: InstanceHandle, reason: str) -> None:
        import ray

        if not inst.alive:
            return
        inst.alive = False
        inst.failure = reason
        self.counters["instance_failures"] += 1
        log.warning("instance %d failed (%s): re-dispatching its requests", inst.instance_id, reason)
        for cr in list(self.active.values()):
            if cr.owner == inst.instance_id:
                self._schedule_redispatch(cr, f"instance {inst.instance_id} failed")
        for other in self.live_instances():
            self._spawn(self._quietly(other.actor.peer_died.remote(inst.instance_id)))
        with contextlib.suppress(Exception):
            ray.kill(inst.actor, no_restart=True)

    @staticmethod
    async def _quietly(ref) -> None:
        with contextlib.suppress(Exception):
            await ref

    # -- migration -----------------------------------------------------------------------------------------------
    async def _pairing_loop(self) -> None:
        while self._running:
            await asyncio.sleep(self.config.pairing_interval_s)
            loads = self._dispatch_loads()
            for src, dst in self.gs.pairing.pairs(loads):
                self._spawn(self.migrate_between(src, dst))

    async def migrate_between(self, src_id: int, dst_id: int, engine_request_id: int | None = None) -> dict[str, Any]:
        """Tell ``src_id`` to migrate a request (the given one, or its llumlet's choice) to ``dst_id``."""
        import ray

        src, dst = self.instances[src_id], self.instances[dst_id]
        if not (src.alive and dst.alive) or src_id == dst_id:
            return {"started": False, "reason": "source and destination must be two live instances"}
        # Until their next reports, do not pair these two again.
        if src.load is not None:
            src.load = replace(src.load, can_migrate_out=False, migrations_out=src.load.migrations_out + 1)
        if dst.load is not None:
            dst.load = replace(dst.load, can_migrate_in=False, migrations_in=dst.load.migrations_in + 1)
        self.counters["migrations_requested"] += 1
        try:
            result = await src.actor.migrate_out.remote(next(self._migration_ids), dst_id, dst.actor, engine_request_id)
        except ray.exceptions.RayActorError as e:
            self._instance_failed(src, f"actor died: {e}")
            return {"started": False, "reason": "source died"}
        if result["started"]:
            self.counters["migrations_started"] += 1
        return {**result, "src": src_id, "dst": dst_id}

    async def migrate_request(self, request_id: str, dst_id: int | None = None) -> dict[str, Any]:
        """Migrate a client's request now (operators and tests): to ``dst_id`` or the freest other live instance."""
        cr = self.active.get(request_id)
        if cr is None or cr.done or cr.owner is None:
            raise KeyError(f"no running request {request_id!r}")
        if dst_id is None:
            others = [i for i in self.live_instances() if i.instance_id != cr.owner and i.load is not None]
            if not others:
                return {"started": False, "reason": "no other live instance"}
            dst_id = max(others, key=lambda i: (i.effective_load().freeness, -i.instance_id)).instance_id
        if dst_id not in self.instances:
            raise KeyError(f"no instance {dst_id}")
        return await self.migrate_between(cr.owner, dst_id, cr.engine_id)

    # -- introspection -------------------------------------------------------------------------------------------
    def instance_rows(self) -> list[dict[str, Any]]:
        """One row per instance: its latest load and counters (for /metrics and the replay tool's samples)."""
        rows = []
        for inst in self.instances.values():
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
                    "draining": bool(ld.draining) if ld else False,
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

    async def check_instances(self) -> dict[int, dict[str, Any]]:
        """Every live instance's block accounting (raises if broken)."""
        ids = [i.instance_id for i in self.live_instances()]
        results = await asyncio.gather(*(self.instances[i].actor.check.remote() for i in ids))
        return dict(zip(ids, results, strict=True))
