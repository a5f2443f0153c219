"""The serving cluster's control side: instance actors, the global scheduler and per-request token streams.

``ClusterManager`` lives in the frontend's process and event loop. It starts one instance actor per instance (through
an ``ActorLauncher``: Ray by default), keeps a standing ``poll()`` call on each (the instance answers as soon as its
state changed: its tokens, finished requests, ended migrations and its ``InstanceLoad``), dispatches new requests
with the system's dispatch policy over the latest loads, pairs migrations on a timer with the system's pairing policy
and tells source actors to migrate. The policies are the same ``GlobalScheduler`` the simulator runs; the rules about
an instance's load are its llumlet's (``InstanceLoad.with_pending``, ``with_draining``, ``is_idle``).

Load reports are asynchronous, so requests dispatched after an instance's last report are not in it yet;
``InstanceLoad.with_pending`` adds them (queued, as the instance will queue them) until the instance reports having
received them, so that a burst is not sent to one instance.

Fault tolerance: when an instance actor dies (or its step fails), every unfinished request it held is dispatched again
with the tokens already streamed as its outputs so far (recomputed where it lands), under a new engine request id;
late outputs of the old attempt are ignored. Auto-scaling lives in ``llumnix.runtime.autoscaler``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llumnix.core.llumlet import InstanceLoad
from llumnix.core.records import MigrationRecord
from llumnix.core.request import HIGH, NORMAL, Request
from llumnix.policies.system import GlobalScheduler
from llumnix.runtime.actors import ActorLauncher, RayLauncher
from llumnix.runtime.backends import actor_class
from llumnix.runtime.instance_actor import (
    InstanceStats,
    MigrationDone,
    Report,
    RequestDone,
    TokenBatch,
)
from llumnix.runtime.kv_transport import TransportSpec
from llumnix.runtime.serve_config import ServeConfig
from llumnix.runtime.streams import ClientRequest, LatencyStats

log = logging.getLogger(__name__)


class NoInstanceError(RuntimeError):
    """No live instance can take a request."""


class StartupError(RuntimeError):
    """The server cannot start as configured (too few CPUs / GPUs, a port taken): one line naming the flag to change.
    ``llumnix serve`` reports it as an error, without a traceback."""


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
    pending: deque = field(default_factory=deque)  # (sequence number, blocks, is high) dispatched, not yet reported
    last_report_s: float = 0.0
    failure: str | None = None

    def effective_load(self, count_pending: bool = True) -> InstanceLoad | None:
        """The last report, plus what was dispatched since (``count_pending``), draining from the moment it was told
        to."""
        if self.load is None:
            return None
        while self.pending and self.pending[0][0] <= self.num_received:
            self.pending.popleft()
        if self.draining:
            return self.load.with_draining()
        if not count_pending:
            return self.load
        return self.load.with_pending([(b, h) for _, b, h in self.pending])


@dataclass
class InstanceSpan:
    """When an instance actor was launched and stopped (None while it lives): the cost accounting."""

    launch_s: float
    stop_s: float | None = None

    def seconds(self, now: float) -> float:
        return max(0.0, (self.stop_s if self.stop_s is not None else now) - self.launch_s)


class ClusterManager:
    """Start with ``await start()`` inside the serving event loop; ``await stop()`` kills the actors.

    ``launcher`` starts the instance actors (default: Ray); ``clock`` stamps the client-side timeline (default
    ``time.time``; the lock-step harness passes its virtual clock)."""

    def __init__(self, config: ServeConfig, launcher: ActorLauncher | None = None,
                 clock: Callable[[], float] = time.time, record_decisions: bool = False) -> None:
        self.config = config
        self.launcher = launcher or RayLauncher()
        self.clock = clock
        self.gs = GlobalScheduler(config.system_config(), record_decisions=record_decisions)
        self.instances: dict[int, InstanceHandle] = {}  # ready instances (serving or draining) and failed ones
        self.starting: dict[int, Any] = {}  # instance id -> actor, launched but not yet taking requests
        self.retired: dict[int, InstanceHandle] = {}  # drained and stopped
        self.spans: dict[int, InstanceSpan] = {}  # every instance ever launched
        self.scale_events: deque = deque(maxlen=10_000)  # {"time_s", "instance_id", "event"}
        self._instance_ids = itertools.count()
        self._handed_back: dict[int, Request] = {}  # requests a drain handed back while their dispatch was in flight
        self._info: dict[str, Any] | None = None
        self._kv_store: tuple[Any, str] | None = None  # gloo / nccl: the TCPStore the instances' channels meet on
        self.started_s = self.clock()
        self.active: dict[str, ClientRequest] = {}
        self._by_engine: dict[int, ClientRequest] = {}
        self._recently_done: OrderedDict[int, ClientRequest] = OrderedDict()  # news may trail a request's end
        self.migration_log: deque[tuple[str, MigrationRecord]] = deque(maxlen=100_000)  # (client id, attempt)
        self.migrations_logged = 0  # attempts ever appended to migration_log
        self.step_rows = 0  # instance steps reported, and the serving instances at each: the artifact's cost
        self.step_instance_sum = 0
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
            "aborted": 0,  # their clients went away before they finished (freed on their instances)
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
        from llumnix.runtime.autoscaler import AutoScaler

        self.autoscaler = AutoScaler(self)

    # -- lifecycle -----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.check_resources()
        self.started_s = self.clock()  # the cost window opens with the first launch
        ids = [next(self._instance_ids) for _ in range(self.config.initial_count)]
        actors = [self.launch_actor(i) for i in ids]
        try:
            infos = await asyncio.wait_for(
                asyncio.gather(*(a.start.remote() for a in actors)), self.config.startup_timeout_s
            )
            reports = await asyncio.gather(*(a.poll.remote(0.0) for a in actors))
        except BaseException as e:
            for i, a in zip(ids, actors, strict=True):
                self.kill_actor(a)
                self.mark_stopped(i)
            if isinstance(e, asyncio.TimeoutError):
                raise RuntimeError(
                    f"the {len(actors)} instance actors did not start within {self.config.startup_timeout_s:.0f} s "
                    "(are the CPUs / GPUs they ask for free? see `ray status`)"
                ) from None
            raise
        for i, actor, info, report in zip(ids, actors, infos, reports, strict=True):
            self.add_instance(InstanceHandle(i, actor, info), report)
        self._running = True
        for inst in self.instances.values():
            self.spawn(self._poll_loop(inst))
        if self.gs.migrates:
            self.spawn(self._pairing_loop())
        if self.gs.scaler is not None:
            self.spawn(self.autoscaler.run())
        log.info(
            "cluster up: %d instances, policy %s, migration %s, autoscale %s",
            len(actors), self.config.policy, self.gs.migrates, self.gs.scaler is not None,
        )

    @property
    def running(self) -> bool:
        return self._running

    def next_instance_id(self) -> int:
        return next(self._instance_ids)

    def launch_actor(self, instance_id: int) -> Any:
        actor = self.launcher.launch(
            actor_class(self.config.instance), instance_id, self.config.instance, self._transport_spec(),
            num_cpus=self.config.num_cpus_per_instance, num_gpus=self.config.gpus_per_instance,
        )
        self.spans[instance_id] = InstanceSpan(self.clock())
        self.event(instance_id, "launch")
        return actor

    def kill_actor(self, actor: Any) -> None:
        with contextlib.suppress(Exception):
            self.launcher.kill(actor)

    def _transport_spec(self) -> TransportSpec:
        """How the instances move migrating KV; gloo / nccl channels rendezvous on a TCPStore this process hosts."""
        if self.config.kv_transport == "object-store":
            return TransportSpec(chunk_blocks=self.config.kv_chunk_blocks, paced=self.config.kv_paced)
        if self._kv_store is None:
            from llumnix.runtime.dist_channel import serve_store

            self._kv_store = serve_store(self.launcher.node_address())
        address = self._kv_store[1]
        listen = address.rpartition(":")[0] if address.startswith("127.") else None  # one host: loopback throughout
        return TransportSpec(self.config.kv_transport, address, self.config.kv_timeout_s, listen,
                             self.config.kv_chunk_blocks, self.config.kv_paced)

    def add_instance(self, inst: InstanceHandle, report: Report) -> None:
        """The instance takes requests from now on (it has reported a load)."""
        self._info = self._info or inst.info
        self.instances[inst.instance_id] = inst
        self._apply_report(inst, report)
        self.gs.dispatch.on_instance_added(inst.instance_id)
        self.event(inst.instance_id, "ready")

    def event(self, instance_id: int, event: str) -> None:
        self.scale_events.append({"time_s": self.clock(), "instance_id": instance_id, "event": event})

    def mark_stopped(self, instance_id: int) -> None:
        span = self.spans.get(instance_id)
        if span is not None and span.stop_s is None:
            span.stop_s = self.clock()

    def check_resources(self) -> None:
        """Raise ``StartupError`` if the Ray cluster has too few CPUs / GPUs for the instances (before any starts)."""
        self._check_resources(self.launcher.resources())

    def _check_resources(self, total: dict[str, float]) -> None:
        """Fail fast (rather than wait forever for actors the cluster cannot place) when the cluster is too small;
        with autoscale, for the most instances the scaler may run."""
        scaling = self.config.autoscale
        n = self.config.max_instances if scaling else self.config.instances
        what, fewer = ("--max-instances", "a lower --max-instances") if scaling else ("--instances", "fewer --instances")
        for resource, each, flag in (
            ("CPU", self.config.num_cpus_per_instance, "--num-cpus-per-instance"),
            ("GPU", self.config.gpus_per_instance, "--num-gpus-per-instance"),
        ):
            need, have = n * each, total.get(resource, 0.0)
            if need > have + 1e-9:
                raise StartupError(
                    f"{n} {what} x {each:g} {resource} ({flag}) = {need:g} {resource}, but the Ray cluster has "
                    f"{have:g}: use {fewer} or a smaller {flag}, or join a larger cluster (--address)"
                )

    async def stop(self) -> None:
        self._running = False
        for task in list(self._tasks):
            task.cancel()
        for inst in self.instances.values():
            if inst.alive:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(inst.actor.stop.remote(), 5.0)
            self.kill_actor(inst.actor)
            inst.alive = False
            self.mark_stopped(inst.instance_id)
        for iid, actor in list(self.starting.items()):
            self.kill_actor(actor)
            self.mark_stopped(iid)
        self.starting.clear()
        for cr in self.active.values():
            if not cr.done:
                cr.error = "server shutting down"
                cr.notify()

    def spawn(self, coro) -> asyncio.Task:
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

    def loads(self) -> list[InstanceLoad]:
        """Every live instance's effective load: what the policies decide on."""
        loads = []
        fresh = self.config.instance.load_reports == "fresh"
        for inst in self.live_instances():
            load = inst.effective_load(count_pending=fresh)
            if load is not None:
                loads.append(load)
        return loads

    # -- requests ------------------------------------------------------------------------------------------------
    async def submit(self, prompt_ids: list[int], max_tokens: int, priority: int = NORMAL,
                     stop_token_ids: frozenset[int] = frozenset()) -> ClientRequest:
        """Dispatch a new request; its tokens then arrive in ``ClientRequest.tokens`` (up to ``max_tokens``, or up to
        and including the first of ``stop_token_ids``). Raises NoInstanceError."""
        if priority not in (NORMAL, HIGH):
            raise ValueError(f"priority must be {NORMAL} or {HIGH}")
        cr = ClientRequest(f"cmpl-{next(self._client_ids)}", list(prompt_ids), max_tokens, priority, self.clock(),
                           frozenset(stop_token_ids))
        self.counters["requests"] += 1
        self.active[cr.request_id] = cr
        try:
            await self._dispatch(cr)
        except Exception:
            self.active.pop(cr.request_id, None)
            raise
        return cr

    def _engine_request(self, cr: ClientRequest) -> Request:
        """A new engine request continuing ``cr``: its prompt, and the tokens streamed so far as its outputs (an
        instance recomputes them in its prefill). It keeps the client's arrival time, so it queues as it would have."""
        req = Request(next(self._engine_ids), cr.arrival_s, len(cr.prompt_ids), cr.max_tokens, cr.priority,
                      prompt_token_ids=list(cr.prompt_ids), stop_token_ids=cr.stop_token_ids)
        req.output_token_ids = list(cr.tokens)
        req.num_generated = len(cr.tokens)
        return req

    async def _dispatch(self, cr: ClientRequest, req: Request | None = None) -> None:
        """Place ``req`` (default: a new engine request for ``cr``) where the dispatch policy says."""
        cr.dispatching = True
        try:
            while True:
                if cr.abandoned:
                    return
                t0 = time.perf_counter()
                loads = self.loads()
                if not loads:
                    raise NoInstanceError("no live instance can take the request")
                req = req or self._engine_request(cr)
                try:
                    iid = self.gs.choose_instance(req, loads, self.clock())
                except RuntimeError as e:  # every ready instance is draining
                    raise NoInstanceError(str(e)) from None
                t_choice = time.perf_counter() - t0
                inst = self.instances[iid]
                inst.sent += 1
                usage = inst.load.pending_usage(req.seq_len) if inst.load is not None else 0.0
                inst.pending.append((inst.sent, usage, req.is_high))
                if cr.engine_id != req.request_id:
                    self._by_engine.pop(cr.engine_id, None)
                cr.new_attempt(req.request_id, iid)
                self._by_engine[req.request_id] = cr
                try:
                    accepted = await inst.actor.add_request.remote(req)
                except self.launcher.actor_died as e:
                    self._instance_failed(inst, f"actor died: {e}")  # a no-op for a retired instance
                    req = None
                    continue
                if accepted is False:  # it started draining (or retired) since this request chose it
                    if not (inst.draining or not inst.alive):
                        raise NoInstanceError(f"instance {iid} refused the request")
                    continue
                if not inst.alive:  # it died after taking the request (its failure skipped us: we were dispatching)
                    req = None
                    continue
                if cr.abandoned:  # its client went away while this dispatch was in flight
                    self._abort_engine_request(iid, req.request_id)
                    return
                handed_back = self._handed_back.pop(req.request_id, None)
                if handed_back is not None:  # a drain took it back before this await returned
                    self.counters["requeued_on_drain"] += 1
                    self.counters["redispatched"] += 1
                    cr.redispatches += 1
                    req = handed_back
                    continue
                self.decision_latency.observe(t_choice)
                self.dispatch_latency.observe(time.perf_counter() - t0)
                return
        finally:
            cr.dispatching = False

    def schedule_redispatch(self, cr: ClientRequest, reason: str, req: Request | None = None) -> None:
        """Dispatch ``cr`` again (at most once at a time): ``req`` as it is (a drained instance handed it back), or a
        new engine request recomputing its prompt and the tokens streamed (its instance is gone)."""
        if cr.done or cr.dispatching:
            return
        cr.dispatching = True  # until the new attempt is placed: later failure news must not dispatch it twice
        self.spawn(self._redispatch(cr, reason, req))

    async def _redispatch(self, cr: ClientRequest, reason: str, req: Request | None) -> None:
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
                await self._dispatch(cr, req)
            except Exception as e:
                self._fail(cr, f"could not re-dispatch after {reason}: {e}")
        finally:
            cr.dispatching = False

    def hand_back(self, requests: list[Request], reason: str) -> int:
        """Dispatch again the queued requests a drained instance handed back; return how many."""
        n = 0
        for req in requests:
            cr = self._by_engine.get(req.request_id)
            if cr is None or cr.done or cr.engine_id != req.request_id:
                continue
            n += 1
            if cr.dispatching:  # its dispatch has not returned yet: it dispatches again when it does
                self._handed_back[req.request_id] = req
                continue
            self.counters["requeued_on_drain"] += 1
            self.schedule_redispatch(cr, reason, req)
        return n

    def _complete(self, cr: ClientRequest) -> None:
        cr.finish_s = self.clock()
        self._retire_request(cr)
        self.counters["finished"] += 1

    def finish_early(self, cr: ClientRequest, num_tokens: int) -> None:
        """The client is done with ``cr`` after ``num_tokens`` tokens (a stop string matched): keep those, and unless
        it has finished anyway, complete it now and tell the instance holding it to stop generating. A request frozen
        in a migration then is not there to stop: it is stopped on its destination once the migration commits
        (``_migration_ended``)."""
        if cr.error is not None:
            return
        cr.cut(num_tokens)
        if cr.finish_s is None:
            cr.cut_short = True
            self._complete(cr)
            self._abort_engine_request(cr.owner, cr.engine_id)

    def abort(self, cr: ClientRequest, reason: str = "client disconnected") -> bool:
        """The client went away: fail ``cr`` (counted as aborted) and have the instance holding it drop it and free its
        blocks. A request frozen in a migration then is dropped where the migration leaves it, once it ends
        (``_migration_ended``); one whose dispatch is in flight, where that dispatch lands (``_dispatch``). False if it
        had ended already."""
        if cr.done:
            return False
        cr.abandoned = True
        cr.error = reason
        self._retire_request(cr)
        self.counters["aborted"] += 1
        self._abort_engine_request(cr.owner, cr.engine_id)
        log.debug("%s aborted after %d tokens: %s", cr.request_id, len(cr.tokens), reason)
        return True

    def _abort_engine_request(self, instance_id: int | None, engine_id: int) -> None:
        inst = self.instances.get(instance_id) if instance_id is not None else None
        if inst is not None and inst.alive:
            self.spawn(_quietly(inst.actor.abort.remote(engine_id)))

    def _fail(self, cr: ClientRequest, reason: str) -> None:
        cr.error = reason
        self._retire_request(cr)
        self.counters["failed"] += 1

    def _retire_request(self, cr: ClientRequest) -> None:
        engine = self._by_engine.pop(cr.engine_id, None)
        if engine is not None:
            self._recently_done[cr.engine_id] = cr
            if len(self._recently_done) > 10_000:
                self._recently_done.popitem(last=False)
        self.active.pop(cr.request_id, None)
        cr.notify()

    # -- reports -------------------------------------------------------------------------------------------------
    async def _poll_loop(self, inst: InstanceHandle) -> None:
        while self._running and inst.alive:
            try:
                report = await inst.actor.poll.remote(self.config.poll_timeout_s)
            except self.launcher.actor_died as e:
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
            if inst.draining and report.idle and await self.autoscaler.retire(inst):
                return

    def _apply_report(self, inst: InstanceHandle, report: Report) -> None:
        inst.load = report.load
        inst.stats = report.stats
        inst.num_received = report.num_received
        inst.last_report_s = self.clock()
        # Engine timelines first: a request's last tokens complete it, and they come in the same report.
        for event in report.events:
            if isinstance(event, RequestDone):
                cr = self._by_engine.get(event.request_id)
                if cr is not None:
                    cr.attempts.append(event.stats)
        for event in report.events:
            if isinstance(event, TokenBatch):
                self.step_rows += 1
                self.step_instance_sum += sum(1 for i in self.instances.values() if i.alive)
                self._on_tokens(inst.instance_id, event.tokens)
            elif isinstance(event, MigrationDone):
                self._migration_ended(event.record)

    def _migration_ended(self, record: MigrationRecord) -> None:
        """A migration attempt ended; an abort may come after its request finished (that is why it aborted)."""
        cr = self._by_engine.get(record.request_id) or self._recently_done.get(record.request_id)
        if cr is None:
            return
        self.migration_log.append((cr.request_id, record))
        self.migrations_logged += 1
        if not cr.done:
            cr.migration_ended(record)
            self._check_owner(cr)
        elif cr.cut_short or cr.abandoned:  # its client let go while it was frozen: stop it where the migration left it
            self._abort_engine_request(record.dst if record.committed else record.src, record.request_id)

    def _on_tokens(self, instance_id: int, tokens: list[tuple[int, int, int]]) -> None:
        now = self.clock()
        for engine_id, position, token in tokens:
            cr = self._by_engine.get(engine_id)
            if cr is None or cr.done:
                continue  # a superseded attempt, or already complete
            if cr.add_token(instance_id, position, token, now):
                self._complete(cr)
            else:
                self._check_owner(cr)

    def _check_owner(self, cr: ClientRequest) -> None:
        """News that a request moved to an instance may arrive after that instance's failure was handled."""
        owner = self.instances.get(cr.owner) if cr.owner is not None else None
        if owner is not None and not owner.alive:
            self.schedule_redispatch(cr, f"instance {cr.owner} failed")

    def _instance_failed(self, inst: InstanceHandle, reason: str) -> None:
        if not inst.alive:
            return
        inst.alive = False
        inst.failure = reason
        self.mark_stopped(inst.instance_id)
        self.event(inst.instance_id, "failed")
        self.counters["instance_failures"] += 1
        log.warning("instance %d failed (%s): re-dispatching its requests", inst.instance_id, reason)
        for cr in list(self.active.values()):
            if cr.owner == inst.instance_id:
                self.schedule_redispatch(cr, f"instance {inst.instance_id} failed")
        for other in self.live_instances():
            self.spawn(_quietly(other.actor.peer_died.remote(inst.instance_id)))
        self.kill_actor(inst.actor)

    # -- migration -----------------------------------------------------------------------------------------------
    async def _pairing_loop(self) -> None:
        while self._running:
            now = self.clock()
            for src, dst in self.gs.pairs(self.loads(), now):
                self.spawn(self.migrate_between(src, dst, paired_s=now))
            await asyncio.sleep(self.config.pairing_interval_s)

    async def migrate_between(self, src_id: int, dst_id: int, engine_request_id: int | None = None,
                              paired_s: float | None = None) -> dict[str, Any]:
        """Tell ``src_id`` to migrate a request (the given one, or its llumlet's choice) to ``dst_id`` (``paired_s``:
        when the pairing chose the two; None: asked for now, by an operator)."""
        src, dst = self.instances[src_id], self.instances[dst_id]
        if not (src.alive and dst.alive) or src_id == dst_id:
            return {"started": False, "reason": "source and destination must be two live instances"}
        self.counters["migrations_requested"] += 1
        try:
            result = await src.actor.migrate_out.remote(next(self._migration_ids), dst_id, dst.actor, engine_request_id)
        except self.launcher.actor_died as e:
            self._instance_failed(src, f"actor died: {e}")
            return {"started": False, "reason": "source died"}
        if result["started"]:
            self.counters["migrations_started"] += 1
            self.gs.migration_started(src_id, dst_id, paired_s if paired_s is not None else self.clock())
            # Until their next reports, do not pair these two again.
            if src.load is not None:
                src.load = src.load.with_migration_out()
            if dst.load is not None:
                dst.load = dst.load.with_migration_in()
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

    # -- auto-scaling and introspection (the autoscaler and ``llumnix.runtime.introspection`` do the work) ----------
    async def start_instance(self, placement_timeout_s: float | None = None) -> dict[str, Any]:
        return await self.autoscaler.start_instance(placement_timeout_s)

    async def drain(self, instance_id: int) -> dict[str, Any]:
        return await self.autoscaler.drain(instance_id)

    def scaling_status(self) -> dict[str, Any]:
        return self.autoscaler.status()

    def instance_rows(self) -> list[dict[str, Any]]:
        from llumnix.runtime.introspection import instance_rows

        return instance_rows(self)

    async def step_logs(self, instance_id: int | None = None, start: int = 0,
                        limit: int | None = None) -> list[dict[str, Any]]:
        from llumnix.runtime.introspection import step_logs

        return await step_logs(self, instance_id, start, limit)

    def migration_rows(self, start: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        from llumnix.runtime.introspection import migration_rows

        return migration_rows(self, start, limit)

    async def check_instances(self) -> dict[int, dict[str, Any]]:
        from llumnix.runtime.introspection import check_instances

        return await check_instances(self)


async def _quietly(ref) -> None:
    with contextlib.suppress(Exception):
        await ref
