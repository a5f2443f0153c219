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
old attempt are ignored.

Auto-scaling (``autoscale``): every ``scale_interval_s`` the simulator's ``Scaler`` decides on the instances' loads and
the number still starting. A started instance is a new actor; it takes requests once its engine is up and it has
reported a load (plus ``startup_delay_s`` if set). A drained instance's llumlet reports freeness -inf, so dispatch skips
it and the pairing policy migrates its running requests away; its queued requests come back (``InstanceActor.drain``)
and are dispatched again. Once it holds nothing and no migration is in flight (``InstanceActor.retire``) its actor is
stopped and it leaves dispatch and the metrics. Every instance's launch and stop times give the cost: instance-seconds,
and their average over a window (``scaling_status``, ``/admin/scaling``).
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
from llumnix.runtime.kv_transport import TransportSpec
from llumnix.runtime.ray_instance import (
    InstanceStats,
    Report,
    RequestDone,
    RequestLost,
    RequestMoved,
    RequestStats,
    TokenBatch,
    actor_class,
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
            "dispatch_s": next((a.dispatch_s for a in self.attempts if a.dispatch_s is not None), None),
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
    draining: bool = False  # told to drain: leaves once empty
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
        if self.draining:  # draining from the moment it was told, not from its next report
            return replace(
                self.load, draining=True, freeness=-math.inf, freeness_high=-math.inf, can_migrate_in=False
            )
        return account_pending(self.load, [(b, h) for _, b, h in self.pending])


@dataclass
class InstanceSpan:
    """When an instance actor was launched and stopped (None while it lives): the cost accounting."""

    launch_s: float
    stop_s: float | None = None

    def seconds(self, now: float) -> float:
        return max(0.0, (self.stop_s if self.stop_s is not None else now) - self.launch_s)


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
                autoscale=config.scaling_config(),
            )
        )
        self.instances: dict[int, InstanceHandle] = {}  # ready instances (serving or draining) and failed ones
        self.starting: dict[int, Any] = {}  # instance id -> actor, launched but not yet taking requests
        self.retired: dict[int, InstanceHandle] = {}  # drained and stopped
        self.spans: dict[int, InstanceSpan] = {}  # every instance ever launched
        self.scale_events: deque = deque(maxlen=10_000)  # {"time_s", "instance_id", "event"}
        self._instance_ids = itertools.count()
        self._handed_back: set[int] = set()  # engine ids a drain handed back while their dispatch was in flight
        self._info: dict[str, Any] | None = None
        self._kv_store: tuple[Any, str] | None = None  # gloo / nccl: the TCPStore the instances' channels meet on
        self.started_s = time.time()
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
            "instances_started": 0,  # by the scaler, after the initial ones
            "instance_start_failures": 0,
            "instances_drained": 0,  # told to drain
            "instances_stopped": 0,  # drained, empty and stopped
            "requeued_on_drain": 0,  # queued requests a drained instance handed back
        }

    # -- lifecycle -----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        import ray

        self._check_resources(ray.cluster_resources())
        self.started_s = time.time()  # the cost window opens with the first launch
        ids = [next(self._instance_ids) for _ in range(self.config.initial_count)]
        actors = [self._new_actor(i) for i in ids]
        try:
            infos = await asyncio.wait_for(
                asyncio.gather(*(a.start.remote() for a in actors)), self.config.startup_timeout_s
            )
            reports = await asyncio.gather(*(a.poll.remote(0.0) for a in actors))
        except BaseException as e:
            for i, a in zip(ids, actors, strict=True):
                with contextlib.suppress(Exception):
                    ray.kill(a, no_restart=True)
                self._stopped(i)
            if isinstance(e, asyncio.TimeoutError):
                raise RuntimeError(
                    f"the {len(actors)} instance actors did not start within {self.config.startup_timeout_s:.0f} s "
                    "(are the CPUs / GPUs they ask for free? see `ray status`)"
                ) from None
            raise
        for i, actor, info, report in zip(ids, actors, infos, reports, strict=True):
            self._add_instance(InstanceHandle(i, actor, info), report)
        self._running = True
        for inst in self.instances.values():
            self._spawn(self._poll_loop(inst))
        if self.gs.migrates:
            self._spawn(self._pairing_loop())
        if self.gs.scaler is not None:
            self._spawn(self._scale_loop())
        log.info(
            "cluster up: %d instances, policy %s, migration %s, autoscale %s",
            len(actors), self.config.policy, self.gs.migrates, self.gs.scaler is not None,
        )

    def _new_actor(self, instance_id: int):
        import ray

        actor = (
            ray.remote(actor_class(self.config.instance))
            .options(
                num_cpus=self.config.num_cpus_per_instance,
                num_gpus=self.config.gpus_per_instance,
                max_concurrency=1000,
            )
            .remote(instance_id, self.config.instance, self._transport_spec())
        )
        self.spans[instance_id] = InstanceSpan(time.time())
        self._event(instance_id, "launch")
        return actor

    def _transport_spec(self) -> TransportSpec:
        """How the instances move migrating KV; gloo / nccl channels rendezvous on a TCPStore this process hosts."""
        if self.config.kv_transport == "object-store":
            return TransportSpec()
        if self._kv_store is None:
            import ray

            from llumnix.runtime.dist_channel import serve_store

            self._kv_store = serve_store(ray.util.get_node_ip_address())
        return TransportSpec(self.config.kv_transport, self._kv_store[1], self.config.kv_timeout_s)

    def _add_instance(self, inst: InstanceHandle, report: Report) -> None:
        """The instance takes requests from now on (it has reported a load)."""
        self._info = self._info or inst.info
        self.instances[inst.instance_id] = inst
        self._apply_report(inst, report)
        self.gs.dispatch.on_instance_added(inst.instance_id)
        self._event(inst.instance_id, "ready")

    def _event(self, instance_id: int, event: str) -> None:
        self.scale_events.append({"time_s": time.time(), "instance_id": instance_id, "event": event})

    def _stopped(self, instance_id: int) -> None:
        span = self.spans.get(instance_id)
        if span is not None and span.stop_s is None:
            span.stop_s = time.time()

    def _check_resources(self, total: dict[str, float]) -> None:
        """Fail fast (rather than wait forever for actors Ray cannot place) when the cluster is too small; with
        autoscale, for the most instances the scaler may run."""
        scaling = self.config.autoscale
        n = self.config.max_instances if scaling else self.config.instances
        what, fewer = ("--max-instances", "a lower --max-instances") if scaling else ("instances", "fewer --instances")
        for resource, each, flag in (
            ("CPU", self.config.num_cpus_per_instance, "--num-cpus-per-instance"),
            ("GPU", self.config.gpus_per_instance, "--num-gpus-per-instance"),
        ):
            need, have = n * each, total.get(resource, 0.0)
            if need > have + 1e-9:
                raise RuntimeError(
                    f"{n} {what} x {each:g} {resource} = {need:g} {resource}, but the Ray cluster has {have:g}; "
                    f"use {fewer} or a smaller {flag}"
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
            self._stopped(inst.instance_id)
        for iid, actor in list(self.starting.items()):
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
            self._stopped(iid)
        self.starting.clear()
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
        if self._info is None:
            raise NoInstanceError("no instance has started yet")
        return self._info

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
                try:
                    iid = self.gs.dispatch.choose(req, loads)
                except RuntimeError as e:  # every ready instance is draining
                    raise NoInstanceError(str(e)) from None
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
                    accepted = await inst.actor.add_request.remote(req)
                except ray.exceptions.RayActorError as e:
                    self._instance_failed(inst, f"actor died: {e}")  # a no-op for a retired instance
                    continue
                if accepted is False:  # it started draining (or retired) since this request chose it
                    if not (inst.draining or not inst.alive):
                        raise NoInstanceError(f"instance {iid} refused the request")
                    continue
                if not inst.alive:  # it died after taking the request (its failure skipped us: we were dispatching)
                    continue
                if req.request_id in self._handed_back:  # a drain took it back before this await returned
                    self._handed_back.discard(req.request_id)
                    self.counters["requeued_on_drain"] += 1
                    self.counters["redispatched"] += 1
                    cr.redispatches += 1
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
            if inst.draining and self._looks_empty(inst):
                try:
                    final = await inst.actor.retire.remote()
                except ray.exceptions.RayActorError as e:
                    self._instance_failed(inst, f"actor died: {e}")
                    return
                if final is not None:
                    self._apply_report(inst, final)
                    await self._retire(inst)
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
        self._stopped(inst.instance_id)
        self._event(inst.instance_id, "failed")
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

    # -- auto-scaling ----------------------------------------------------------------------------------------------
    async def _scale_loop(self) -> None:
        scaler = self.gs.scaler
        while self._running:
            await asyncio.sleep(scaler.config.check_interval_s)
            try:
                decision = scaler.decide(self._dispatch_loads(), len(self.starting))
                for _ in range(decision.start):
                    self._spawn(self.start_instance())
                if decision.drain is not None:
                    await self.drain(decision.drain)
            except Exception:
                log.exception("auto-scaling round failed")

    async def start_instance(self) -> dict[str, Any]:
        """Launch one more instance actor; it takes requests once its engine is up and it has reported a load."""
        import ray

        iid = next(self._instance_ids)
        actor = self._new_actor(iid)
        self.starting[iid] = actor
        log.info("starting instance %d", iid)
        try:
            info = await asyncio.wait_for(actor.start.remote(), self.config.startup_timeout_s)
            if self.config.startup_delay_s > 0:
                await asyncio.sleep(self.config.startup_delay_s)
            report = await actor.poll.remote(0.0)
        except BaseException as e:
            self.starting.pop(iid, None)
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
            self._stopped(iid)
            if isinstance(e, asyncio.CancelledError):
                raise
            self.counters["instance_start_failures"] += 1
            self._event(iid, "start_failed")
            log.warning("instance %d did not start: %r", iid, e)
            return {"started": False, "instance_id": iid, "reason": repr(e)}
        self.starting.pop(iid, None)
        if not self._running:  # the cluster is shutting down
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
            self._stopped(iid)
            return {"started": False, "instance_id": iid, "reason": "shutting down"}
        inst = InstanceHandle(iid, actor, info)
        self._add_instance(inst, report)
        self.counters["instances_started"] += 1
        self._spawn(self._poll_loop(inst))
        log.info("instance %d ready (%.1f s after launch)", iid, time.time() - self.spans[iid].launch_s)
        return {"started": True, "instance_id": iid}

    async def drain(self, instance_id: int) -> dict[str, Any]:
        """Drain an instance (the scaler's scale-down, or an operator): it takes no new request, its running ones
        migrate away (or finish there without migration), its queued ones are dispatched again; then it stops."""
        import ray

        inst = self.instances.get(instance_id)
        if inst is None or not inst.alive:
            raise KeyError(f"no live instance {instance_id}")
        if inst.draining:
            return {"draining": True, "instance_id": instance_id, "requeued": 0, "reason": "already draining"}
        others = [i for i in self.live_instances() if i is not inst and not i.draining and i.load is not None]
        if not others:
            return {"draining": False, "instance_id": instance_id, "reason": "it is the last instance taking requests"}
        inst.draining = True
        self.counters["instances_drained"] += 1
        self._event(instance_id, "drain")
        log.info("draining instance %d", instance_id)
        try:
            taken = await inst.actor.drain.remote()
        except ray.exceptions.RayActorError as e:
            self._instance_failed(inst, f"actor died: {e}")
            return {"draining": False, "instance_id": instance_id, "reason": "the instance died"}
        for engine_id in taken:
            cr = self._by_engine.get(engine_id)
            if cr is None or cr.done or cr.engine_id != engine_id:
                continue
            if cr.dispatching:  # its dispatch has not returned yet: it dispatches again when it does
                self._handed_back.add(engine_id)
                continue
            self.counters["requeued_on_drain"] += 1
            self._schedule_redispatch(cr, f"instance {instance_id} drained")
        return {"draining": True, "instance_id": instance_id, "requeued": len(taken)}

    @staticmethod
    def _looks_empty(inst: InstanceHandle) -> bool:
        ld = inst.load
        return (
            ld is not None
            and ld.num_running == 0
            and ld.num_waiting == 0
            and ld.migrations_out == 0
            and ld.migrations_in == 0
        )

    async def _retire(self, inst: InstanceHandle) -> None:
        """Stop an instance that has drained: it holds no request and no migration (its actor said so, atomically)."""
        import ray

        inst.alive = False
        self.instances.pop(inst.instance_id, None)
        self.retired[inst.instance_id] = inst
        self._stopped(inst.instance_id)
        self.counters["instances_stopped"] += 1
        self._event(inst.instance_id, "stop")
        log.info("instance %d drained and stopped", inst.instance_id)
        for cr in list(self.active.values()):  # none should be left; if one is, it is recomputed, not lost
            if cr.owner == inst.instance_id:
                log.warning("request %s still on retired instance %d: re-dispatching", cr.request_id, inst.instance_id)
                self._schedule_redispatch(cr, f"instance {inst.instance_id} retired")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(inst.actor.stop.remote(), 5.0)
        with contextlib.suppress(Exception):
            ray.kill(inst.actor, no_restart=True)

    def instance_seconds(self, now: float | None = None) -> float:
        """Seconds of instance time so far: each actor from its launch (start-up included) to its stop."""
        now = time.time() if now is None else now
        return sum(span.seconds(now) for span in self.spans.values())

    def scaling_status(self) -> dict[str, Any]:
        """Instance counts and cost: the time-weighted average number of instances over a window is the difference
        of ``instance_seconds`` between two reads over the difference of their ``time_s``."""
        now = time.time()
        live = self.live_instances()
        cfg = self.config
        return {
            "time_s": now,
            "since_s": self.started_s,
            "instance_seconds": self.instance_seconds(now),
            "avg_instances": self.instance_seconds(now) / (now - self.started_s) if now > self.started_s else None,
            "instances": len(self.starting) + len(live),
            "starting": len(self.starting),
            "serving": sum(1 for i in live if not i.draining),
            "draining": sum(1 for i in live if i.draining),
            "autoscale": None if not cfg.autoscale else {
                "scale_up": cfg.scale_up,
                "scale_down": cfg.scale_down,
                "min_instances": cfg.min_instances,
                "max_instances": cfg.max_instances,
                "scale_interval_s": cfg.scale_interval_s,
                "startup_delay_s": cfg.startup_delay_s,
            },
            "events": list(self.scale_events),
        }

    # -- introspection -------------------------------------------------------------------------------------------
    async def step_logs(self) -> list[dict[str, Any]]:
        """Every step of every live instance (``InstanceActor.step_log``), one dict per step."""
        live = [inst for inst in self.instances.values() if inst.alive]
        logs = await asyncio.gather(*(inst.actor.step_log.remote() for inst in live), return_exceptions=True)
        keys = ("start_s", "end_s", "kind", "batch_size", "prefill_tokens", "prefill_sum_sq", "context_tokens")
        return [
            {"instance_id": inst.instance_id, **dict(zip(keys, row, strict=True))}
            for inst, rows in zip(live, logs, strict=True)
            if not isinstance(rows, BaseException)
            for row in rows
        ]

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

    async def check_instances(self) -> dict[int, dict[str, Any]]:
        """Every live instance's block accounting (raises if broken)."""
        ids = [i.instance_id for i in self.live_instances()]
        results = await asyncio.gather(*(self.instances[i].actor.check.remote() for i in ids))
        return dict(zip(ids, results, strict=True))
