"""One serving instance as a Ray actor: the same LocalScheduler / Llumlet / Migration objects as the simulator, around
an executor, stepped by an asyncio loop.

Threads: the actor's event loop owns every scheduler object; only ``executor.execute`` runs in a worker thread (a
profile executor's step is an asyncio sleep instead), so calls (new requests, load polls, the destination side of a
migration) are served while a step computes. An ``asyncio.Lock`` marks step boundaries: a step holds it from
``schedule()`` to ``on_step_done()``, and a migration takes it only to begin a stage (the state machine reads the
request's blocks and may freeze it then), so the source keeps stepping while a stage's blocks travel.

The instance never waits on the global scheduler: it queues its outputs, and the frontend's standing ``poll()`` call
returns them with its current load as soon as anything changed (a step began or ended, a request arrived, a
migration moved on): a push over a long poll, so the global scheduler's view lags the instance by one call.

Migration, source side (``_drive``): the llumlet's ``Migration`` says what it needs next and the actor carries it out
on the destination actor: PRE-ALLOC (``mig_pre_alloc``, under the step lock), the stage's copy (a ``KVTransfer`` from
``llumnix.runtime.kv_transport``), COMMIT (``mig_commit``) or ABORT (``mig_abort``). A failed call or copy aborts: the
request resumes on the source. Destination side: ``mig_reserve`` (the pairing's slot), ``mig_pre_alloc``,
``mig_write`` (object store) or ``kv_accept`` / ``kv_recv`` (a torch.distributed channel: gloo or NCCL),
``mig_commit``, ``mig_abort``: each one call of the destination's ``Llumlet``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from llumnix.core.llumlet import InstanceLoad, Llumlet, LlumletConfig, reported_load
from llumnix.core.local_scheduler import LocalScheduler, SchedulerConfig, StepPlan
from llumnix.core.migration import Migration, MigrationConfig
from llumnix.core.migration_protocol import (
    Abort,
    Action,
    Committed,
    Copied,
    Copy,
    Failed,
    PreAlloc,
    PreAllocated,
    Refused,
)
from llumnix.core.records import MigrationRecord, StepRecord
from llumnix.core.request import Request
from llumnix.engine.executor import Executor
from llumnix.engine.kv_transfer import KVTransfer
from llumnix.runtime.instance import EngineInstance
from llumnix.runtime.kv_transport import TorchDistTransport, TransportSpec, make_transport, unpack
from llumnix.runtime.serve_config import InstanceSpec

log = logging.getLogger(__name__)


# -- what an instance reports ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenBatch:
    """One step's tokens: (engine request id, output index, token id)."""

    tokens: list[tuple[int, int, int]]


@dataclass(frozen=True)
class RequestStats:
    """The engine-side timeline of a finished request on the instance that finished it (its ``clock``, seconds)."""

    preemptions_s: list[float]
    prefill_ends_s: list[float]
    instances: list[int]
    dispatch_s: float | None = None  # when the first instance queued it


@dataclass(frozen=True)
class RequestDone:
    request_id: int
    stats: RequestStats


@dataclass(frozen=True)
class MigrationDone:
    """A migration out of this instance ended: committed (the destination holds the request now) or aborted (it
    runs here still)."""

    record: MigrationRecord


@dataclass(frozen=True)
class InstanceStats:
    steps: int
    busy_s: float
    finished: int
    preemptions: int
    head_demand_blocks: int
    watermark_blocks: int
    migrations_committed: int
    migrations_aborted: int
    migration_downtime_s: float
    migration_bytes: int


@dataclass(frozen=True)
class Report:
    """What one ``poll()`` returns: events since the last poll, the current load, and counters."""

    instance_id: int
    load: InstanceLoad
    num_received: int  # add_request calls received so far (the frontend's in-flight dispatch accounting)
    events: list[Any]
    stats: InstanceStats
    failed: str | None = None
    idle: bool = False  # it holds nothing now (its reported load may be older: per-step reports)


def request_stats(req: Request) -> RequestStats:
    return RequestStats(list(req.preemptions_s), list(req.prefill_ends_s), list(req.instances), req.dispatch_s)


# -- the actor ------------------------------------------------------------------------------------------------------
class InstanceActor:
    """Create with ``ray.remote(InstanceActor).options(...).remote(instance_id, spec)``, then ``await start()``.

    ``clock`` (default ``time.time``) stamps the engine's timeline; ``idle_wait_s`` bounds how long an idle step loop
    sleeps before it looks for work again (None: until told there is some; the lock-step harness of
    ``llumnix.runtime.lockstep`` runs so, where a missed wake-up must show rather than be hidden)."""

    # vLLM cannot freeze a request while its engine steps: its actor holds the step lock through the stop-and-copy.
    lock_through_stop_and_copy = False

    def __init__(self, instance_id: int, spec: InstanceSpec, transport: TransportSpec | str = "object-store",
                 clock: Callable[[], float] | None = None, idle_wait_s: float | None = 0.05) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.instance_id = instance_id
        self.spec = spec
        self.clock = clock or time.time
        self.idle_wait_s = idle_wait_s
        self.engine, self.info = self._build_engine()
        self.mig_config = self._migration_config()
        self._peers: dict[int, Any] = {}  # instance id -> actor handle of the destinations this instance sent to
        self.transport = self._build_transport(transport)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"instance{instance_id}-step")
        self._outbox: list[Any] = []
        self._num_received = 0
        self._steps = 0
        self._busy_s = 0.0
        # The last steps (the in-situ profile, llumnix.bench.insitu); _steps_logged counts every one ever logged.
        self._step_log: deque[StepRecord] = deque(maxlen=spec.step_log_size)
        self._steps_logged = 0
        self._finished = 0
        self._mig_committed = 0
        self._mig_aborted = 0
        self._mig_downtime_s = 0.0
        self._mig_bytes = 0
        self._drives: dict[int, Migration] = {}  # source-side migrations whose driver has not finished
        self._carried: dict[int, Any] = {}  # migration id -> the destination's answer to a COMMIT its final copy carried
        self._report: InstanceLoad | None = None  # per-step reports: the load its last step reported
        self._step_report: InstanceLoad | None = None  # the load when the step in flight was scheduled
        self._tasks: set[asyncio.Task] = set()
        self._failed: str | None = None
        self._stopping = False
        self._loop_task: asyncio.Task | None = None

    def _build_engine(self) -> tuple[EngineInstance, dict[str, Any]]:
        """The engine this actor steps and what the frontend must know about it (see ``build_executor``)."""
        from llumnix.runtime.backends import build_executor

        spec = self.spec
        executor, info = build_executor(spec)
        sched_cfg = SchedulerConfig(
            max_num_seqs=spec.max_num_seqs,
            max_batched_tokens=spec.max_batched_tokens,
            enable_priorities=spec.priorities,
            local_priority=spec.local_priority,
            preemption=spec.preemption,
        )
        ll_cfg = LlumletConfig(enable_priorities=spec.priorities, candidate=spec.candidate)
        engine = EngineInstance(self.instance_id, executor, sched_cfg, ll_cfg, watermark=spec.watermark,
                                clock=self.clock)
        return engine, info

    def _migration_config(self) -> MigrationConfig:
        return MigrationConfig(last_stage_max_blocks=self.spec.last_stage_blocks, max_stages=self.spec.max_stages)

    def _build_transport(self, transport: TransportSpec | str) -> KVTransfer:
        listen = transport.listen_host if isinstance(transport, TransportSpec) else None
        return make_transport(transport, self.instance_id, self.engine.executor, self._peers, listen or _node_address())

    # -- plumbing ------------------------------------------------------------------------------------------------
    @property
    def llumlet(self) -> Llumlet:
        return self.engine.llumlet

    @property
    def scheduler(self) -> LocalScheduler:
        return self.engine.scheduler

    @property
    def executor(self) -> Executor:
        return self.engine.executor

    async def start(self) -> dict[str, Any]:
        """Start the step loop; return what the frontend needs to know about this instance."""
        if self._loop_task is None:
            self._lock = asyncio.Lock()
            self._work = asyncio.Event()
            self._has_output = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._step_loop())
        blocks = self.engine.blocks
        return {
            **self.info,
            "instance_id": self.instance_id,
            "num_blocks": blocks.num_blocks,
            "block_size": blocks.block_size,
            "watermark_blocks": blocks.watermark_blocks,
            "backend": self.spec.backend,
        }

    async def stop(self) -> None:
        self._stopping = True
        self._work.set()
        if self._loop_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._loop_task, 5.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.transport.close()

    def terminate(self) -> None:
        """Stop at once, whatever is in flight (a killed actor): the step loop and every task of this actor."""
        self._stopping = True
        for task in [self._loop_task, *self._tasks]:
            if task is not None:
                task.cancel()
        self.transport.close()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _emit(self, event: Any) -> None:
        self._outbox.append(event)
        self._has_output.set()

    def _changed(self, work: bool = False) -> None:
        """The load changed (the next poll reports it at once); ``work``: the step loop may have something to run."""
        self._has_output.set()
        if work:
            self._work.set()

    # -- the step loop -------------------------------------------------------------------------------------------
    async def _step_loop(self) -> None:
        while not self._stopping:
            self._work.clear()
            try:
                async with self._lock:
                    ran = await self._step_once()
            except Exception as e:  # a bug or a device error: report it, so the frontend fails the instance over
                log.exception("instance %d: step failed", self.instance_id)
                self._failed = f"step failed: {e!r}"
                self._has_output.set()
                return
            if ran:
                await asyncio.sleep(0)  # let polls and migration stages in between steps
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._work.wait(), self.idle_wait_s)

    async def _step_once(self) -> bool:
        """One engine step (the step lock is held); False when there was nothing to run."""
        start = self.clock()
        plan = self.scheduler.schedule(start)
        if plan is None:
            return False
        self._changed()  # admissions and preemptions change the load
        if plan.requests:
            self._step_report = self.llumlet.load()
            t0 = time.perf_counter()
            tokens = await self._execute(plan)
            self._busy_s += time.perf_counter() - t0
            self._report = self._step_report
            self._after_step(plan, tokens)
            self._step_log.append(plan.record(self.instance_id, start, self.clock(), bool(self.llumlet.migrating)))
            self._steps_logged += 1
            self.transport.stepped()
        return True  # (with no requests: every request of a decode step was preempted, so schedule again)

    async def _execute(self, plan: StepPlan) -> list[int]:
        run = getattr(self.executor, "execute_async", None)
        if run is not None:
            return await run(plan)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.executor.execute, plan)

    async def step_log(self, start: int = 0, limit: int | None = None) -> tuple[int, list[StepRecord]]:
        """Steps ``start``, ``start + 1``, ... (numbered from this instance's first step; at most ``limit``) of those
        still kept (the last ``step_log_size``): (the number of the first one returned, the steps)."""
        first_kept = self._steps_logged - len(self._step_log)
        first = max(start, first_kept)
        stop = self._steps_logged if limit is None else min(self._steps_logged, first + limit)
        return first, list(itertools.islice(self._step_log, first - first_kept, max(first, stop) - first_kept))

    def _after_step(self, plan: StepPlan, tokens: list[int]) -> None:
        finished = self.scheduler.on_step_done(plan, self.clock(), tokens)
        self._report_step(
            [(r.request_id, r.num_generated - 1, t) for r, t in zip(plan.requests, tokens, strict=True)], finished
        )

    def _report_step(self, tokens: list[tuple[int, int, int]], finished: list[Request]) -> None:
        """Queue one step's tokens (engine request id, output index, token) and finished requests for the poller."""
        self._steps += 1
        self._emit(TokenBatch(tokens))
        for req in finished:
            self._finished += 1
            self._emit(RequestDone(req.request_id, request_stats(req)))

    # -- requests and reports ------------------------------------------------------------------------------------
    async def add_request(self, req: Request) -> bool:
        """Queue ``req``; False when this instance takes no new requests (draining or stopping): dispatch elsewhere."""
        self._num_received += 1
        if self._failed:
            raise RuntimeError(f"instance {self.instance_id} takes no requests: {self._failed}")
        if self._stopping or self.llumlet.draining:
            self._changed()
            return False
        self.engine.add_request(req)
        self._changed(work=True)
        return True

    async def abort(self, request_id: int) -> bool:
        """Finish a waiting or running request now (its client is done with it, e.g. a stop string matched); False if
        it is not here or frozen in a migration (the frontend stops it on the destination once that commits)."""
        async with self._lock:  # between steps
            req = self.scheduler.abort(request_id, self.clock())
        if req is None:
            return False
        self._finished += 1
        self._emit(RequestDone(req.request_id, request_stats(req)))
        self._changed(work=True)
        return True

    # -- auto-scaling: drain, then retire ------------------------------------------------------------------------
    async def drain(self, requeue: bool = False) -> list[Request]:
        """Start draining (the scale-down): the llumlet reports freeness -inf from now on, so no request is
        dispatched or migrated here and the pairing policy moves the running ones away (running requests that are
        not migrated, without migration or of high priority, finish here). Its queued requests are served here too
        (the artifact's drain), or with ``requeue`` handed back, as they are (a preempted one keeps its outputs so
        far), for the frontend to dispatch elsewhere. No step boundary needed: a step in flight holds no waiting
        request."""
        self.llumlet.draining = True
        taken = self.scheduler.take_waiting() if requeue else []  # queued requests hold no blocks
        self._changed(work=True)
        return taken

    async def undrain(self) -> None:
        """Take requests again (a scale-up cancelled the drain)."""
        self.llumlet.draining = False
        self._changed(work=True)

    def _idle(self) -> bool:
        return self.llumlet.is_idle() and not self._drives

    async def retire(self) -> Report | None:
        """If this draining instance holds nothing (no request, no migration in either direction), stop taking work
        for good and return the last report (the events not yet polled); else None. Atomic on the actor's loop."""
        if not (self.llumlet.draining and self._idle()) or self._failed:
            return None
        self._stopping = True
        self._work.set()
        events, self._outbox = self._outbox, []
        return Report(self.instance_id, self._load(), self._num_received, events, self._stats(), self._failed,
                      self._idle())

    def _load(self) -> InstanceLoad:
        """The load this instance reports: now, or (per-step reports, the artifact's) as of its last step."""
        if self.spec.load_reports == "fresh":
            return self.llumlet.load()
        return reported_load(self.llumlet, self._report)

    async def poll(self, timeout_s: float) -> Report:
        """Wait until something changed (or ``timeout_s``), then return the events since the last poll and the load
        now. One poller at a time (the frontend)."""
        if not self._has_output.is_set() and not self._failed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._has_output.wait(), timeout_s)
        self._has_output.clear()
        events, self._outbox = self._outbox, []
        return Report(self.instance_id, self._load(), self._num_received, events, self._stats(), self._failed,
                      self._idle())

    def _stats(self) -> InstanceStats:
        blocks = self.engine.blocks
        return InstanceStats(
            steps=self._steps,
            busy_s=self._busy_s,
            finished=self._finished,
            preemptions=self.scheduler.num_preemptions,
            head_demand_blocks=self.scheduler.head_demand_blocks(),
            watermark_blocks=blocks.watermark_blocks,
            migrations_committed=self._mig_committed,
            migrations_aborted=self._mig_aborted,
            migration_downtime_s=self._mig_downtime_s,
            migration_bytes=self._mig_bytes,
        )

    async def check(self) -> dict[str, Any]:
        """Block accounting and queue sizes (raises if the accounting is broken): for tests and debugging."""
        self.engine.blocks.check()
        return {
            "free_blocks": self.engine.blocks.num_free_blocks,
            "num_blocks": self.engine.blocks.num_blocks,
            "running": [r.request_id for r in self.scheduler.running],
            "waiting": [r.request_id for r in self.scheduler.waiting],
            "frozen": list(self.scheduler.frozen),
            "incoming_migrations": self.llumlet.migrations_in,
            "migrations_out": self.llumlet.migrations_out,
            "migrations_in": self.llumlet.migrations_in,
        }

    # -- migration: source side ----------------------------------------------------------------------------------
    async def migrate_out(
        self, migration_id: int, dst_id: int, dst_actor: Any, request_id: int | None = None
    ) -> dict[str, Any]:
        """Start migrating ``request_id`` (default: the llumlet's LCFS candidate) to ``dst_actor``. Returns at once:
        ``started`` says whether a migration began (it then runs alongside the step loop), ``reason`` why not."""
        ll = self.llumlet
        if self._failed or self._stopping:
            return {"started": False, "reason": "source instance failed or stopping"}
        if not ll.can_start_migration_out():
            return {"started": False, "reason": "a migration out of this instance is in flight"}
        if request_id is None:
            req = ll.pick_migration_candidate()
        else:
            req = ll.running_request(request_id)
            req = req if req is not None and ll.can_migrate(req) else None
        if req is None:
            return {"started": False, "reason": "no running request to migrate"}
        mig = Migration(migration_id, req, ll, dst_id, self.mig_config)  # claims the slot and the request
        self._peers[dst_id] = dst_actor
        self._drives[migration_id] = mig
        self._changed()
        self._spawn(self._drive(mig, dst_actor))
        return {"started": True, "reason": "", "request_id": req.request_id}

    async def _drive(self, mig: Migration, dst: Any) -> None:
        """Carry out ``mig``'s actions until it has ended; every failure of the destination aborts it."""
        try:
            if await _call(dst.mig_reserve, mig.migration_id, self.instance_id) is not True:
                action = await self._answer(mig, mig.abort(self.clock(), "destination takes no migration now"), dst)
            else:
                async with self._lock:  # a stage begins at a step boundary
                    action = await self._answer(mig, mig.start(self.clock()), dst)
                    if self.lock_through_stop_and_copy and isinstance(action, Copy) and action.final:
                        action = await self._answer(mig, mig.on_result(await self._copy(mig, action), self.clock()), dst)
            while action is not None:  # a Copy: its blocks travel while the source keeps stepping
                result = await self._copy(mig, action)
                if action.final or not isinstance(result, Copied):
                    action = await self._answer(mig, mig.on_result(result, self.clock()), dst)
                    continue
                async with self._lock:  # the next stage begins at a step boundary and may freeze the request
                    action = await self._answer(mig, mig.on_result(result, self.clock()), dst)
                    if self.lock_through_stop_and_copy and isinstance(action, Copy) and action.final:
                        action = await self._answer(mig, mig.on_result(await self._copy(mig, action), self.clock()), dst)
        except Exception as e:  # a bug: the request must not stay frozen here
            log.exception("instance %d: migration %d failed", self.instance_id, mig.migration_id)
            abort = mig.abort(self.clock(), f"driver failed: {e!r}")
            if abort is not None:
                await _call(dst.mig_abort, abort.migration_id)
        finally:
            self._drives.pop(mig.migration_id, None)
            self._carried.pop(mig.migration_id, None)
            self._migration_ended(mig)

    async def _answer(self, mig: Migration, action: Action | None, dst: Any) -> Action | None:
        """Carry out the actions the destination answers (PRE-ALLOC, COMMIT, ABORT); return the next ``Copy`` or None
        once the migration has ended."""
        while action is not None and not isinstance(action, Copy):
            if isinstance(action, Abort):
                await _call(dst.mig_abort, action.migration_id)
                return None
            if isinstance(action, PreAlloc):
                result = await _call(dst.mig_pre_alloc, action.migration_id, action.num_blocks)
            else:  # COMMIT: answered already if the final copy carried it
                result = self._carried.pop(action.migration_id, None)
                if result is None:
                    result = await _call(dst.mig_commit, action.migration_id, action.request)
            action = mig.on_result(result, self.clock())
        return action

    async def _copy(self, mig: Migration, copy: Copy) -> Copied | Failed:
        """Carry out a stage's copy. The final one carries the COMMIT that follows it where the transport can (one
        call to the destination fewer in the stop-and-copy; ``RayTransport``): the destination adopts the request
        once the blocks are written, and its answer waits in ``_carried`` for the protocol's COMMIT."""
        carry = copy.final and self.transport.carries_commit
        try:
            pending = self.transport.start(copy, commit=mig.request) if carry else self.transport.start(copy)
            copied = Copied(await pending.wait())
            if carry and pending.commit is not None:
                self._carried[mig.migration_id] = pending.commit
            return copied
        except Exception as e:
            log.warning("instance %d: migration %d: copy to %d failed: %r", self.instance_id, copy.migration_id,
                        copy.dst, e)
            return Failed(repr(e))

    def _migration_ended(self, mig: Migration) -> None:
        record = mig.record()
        if record.committed:
            self._mig_committed += 1
            self._mig_downtime_s += record.downtime_s
            self._mig_bytes += mig.num_bytes
        else:
            self._mig_aborted += 1
            log.debug("instance %d: migration %d aborted: %s", self.instance_id, mig.migration_id, record.abort_reason)
        self._emit(MigrationDone(record))
        self._changed(work=True)  # an unfrozen request, or freed blocks

    # -- migration: destination side -----------------------------------------------------------------------------
    async def mig_reserve(self, migration_id: int, src_id: int) -> bool:
        """A source was paired with this instance: hold a migration slot for it (False: take none now)."""
        if self._failed or self._stopping:
            return False
        ok = self.llumlet.reserve_in(migration_id, src_id)
        self._changed()
        return ok

    async def mig_pre_alloc(self, migration_id: int, num_blocks: int) -> PreAllocated | Refused:
        """PRE-ALLOC: reserve ``num_blocks`` for the next stage (ACK with their ids) or refuse (ABORT)."""
        if self._failed or self._stopping:
            return Refused("destination failed or stopping")
        result = self.llumlet.pre_alloc(migration_id, num_blocks)
        self._changed()
        return result

    def _check_incoming(self, migration_id: int) -> None:
        if migration_id not in self.llumlet.incoming:
            raise RuntimeError(f"instance {self.instance_id}: no migration {migration_id} in flight")

    async def mig_write(self, migration_id: int, dst_blocks: list[int], payload: Any,
                        commit: Request | None = None) -> Committed | Failed | None:
        """Write a stage's blocks; with ``commit`` (the final stage's request) adopt it then: COMMIT's answer."""
        self._check_incoming(migration_id)
        self.executor.write_blocks(dst_blocks, unpack(payload))
        return await self.mig_commit(migration_id, commit) if commit is not None else None

    async def kv_accept(self, src_id: int, key: str) -> None:
        """Join the torch.distributed KV channel ``key`` that ``src_id`` is opening to this instance."""
        await self._dist_transport().accept(src_id, key)

    async def kv_recv(self, src_id: int, key: str, migration_id: int, dst_blocks: list[int], shape: tuple[int, ...],
                      dtype: str, commit: Request | None = None) -> Committed | Failed | None:
        """Receive a stage's blocks from ``src_id`` over channel ``key`` and write them; the data is drained even
        when the migration was aborted meanwhile (its blocks may belong to another request by then: not written)."""
        transport = self._dist_transport()
        data = await transport.receive(src_id, key, shape, dtype)
        self._check_incoming(migration_id)
        transport.write(dst_blocks, data)
        return await self.mig_commit(migration_id, commit) if commit is not None else None

    def _dist_transport(self) -> TorchDistTransport:
        if not isinstance(self.transport, TorchDistTransport):
            raise RuntimeError(f"instance {self.instance_id} moves KV over the {self.transport.name} transport; all "
                               "instances of a cluster must use the same one")
        return self.transport

    async def mig_commit(self, migration_id: int, req: Request) -> Committed | Failed:
        """COMMIT: adopt the request whose KV now fills the pre-allocated blocks."""
        if self._failed:
            return Failed(f"destination failed: {self._failed}")
        result = self.llumlet.commit_in(migration_id, req)
        self._changed(work=True)
        return result

    async def mig_abort(self, migration_id: int) -> None:
        if self.llumlet.abort_in(migration_id):
            self._changed(work=True)

    async def peer_died(self, instance_id: int) -> int:
        """Free what incoming migrations from a dead source hold; return how many were dropped."""
        self.transport.forget(instance_id)
        dropped = self.llumlet.drop_incoming_from(instance_id)
        if dropped:
            self._changed(work=True)
        return dropped


async def _call(method: Any, *args: Any) -> Any:
    """An actor call whose failure (the actor died, the call raised) is an answer, not an exception: False / Failed."""
    try:
        return await method.remote(*args)
    except Exception as e:
        return Failed(f"{getattr(method, '_method_name', 'call')} failed: {e!r}")


def _node_address() -> str | None:
    """This node's address, for gloo to listen on (None outside Ray: the host name's)."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return None


__all__ = [
    "InstanceActor",
    "InstanceStats",
    "MigrationDone",
    "Report",
    "RequestDone",
    "RequestStats",
    "TokenBatch",
]
