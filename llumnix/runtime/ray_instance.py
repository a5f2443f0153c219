"""One serving instance as a Ray actor: the same LocalScheduler / Llumlet / Migration objects as the simulator, around
an executor, stepped by an asyncio loop.

Threads: the actor's event loop owns every scheduler object; only ``executor.execute`` runs in a worker thread, so
calls (new requests, load polls, the destination side of a migration) are served while a step computes. An
``asyncio.Lock`` marks step boundaries: a step holds it from ``schedule()`` to ``on_step_done()``, and a migration takes
it only to begin or end a stage (the state machine touches the running set then), so the source keeps stepping while a
stage's blocks travel.

The instance never waits on the global scheduler: it queues its outputs and load, and the frontend's standing
``poll()`` call returns them as soon as a step ends (a push over a long poll).

Migration, source side (``_drive``): the source runs the ``Migration`` state machine with a ``RemoteDestination`` in
place of the destination's Llumlet. Before each stage it asks the destination actor to PRE-ALLOC exactly the blocks the
stage will take (``stage_blocks_needed``, under the step lock so no step changes the answer) and hands the reply to the
proxy, which the state machine then consults synchronously. Blocks travel through a ``KVTransport``; COMMIT and ABORT
are actor calls. Destination side: ``mig_pre_alloc``, ``mig_write`` (object store) or ``kv_accept`` / ``kv_recv``
(a torch.distributed channel: gloo or NCCL), ``mig_commit``, ``mig_abort``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from llumnix.core.llumlet import InstanceLoad, Llumlet, LlumletConfig
from llumnix.core.local_scheduler import LocalScheduler, SchedulerConfig, StepKind, StepPlan
from llumnix.core.migration import Migration, MigrationConfig, MigrationPhase, Stage
from llumnix.core.request import Request, RequestStatus
from llumnix.engine.executor import Executor
from llumnix.runtime.instance import EngineInstance
from llumnix.runtime.kv_transport import TorchDistTransport, TransportSpec, make_transport, unpack
from llumnix.runtime.serve_config import InstanceSpec

log = logging.getLogger(__name__)

PROFILE_VOCAB_SIZE = 32_000  # the profile executor's synthetic tokens (llumnix.engine.executor.synthetic_token)


# -- what an instance reports ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenBatch:
    """One step's tokens: (engine request id, output index, token id)."""

    tokens: list[tuple[int, int, int]]


@dataclass(frozen=True)
class RequestStats:
    """The engine-side timeline of a finished request (wall-clock seconds, ``time.time()``)."""

    preemptions_s: list[float]
    prefill_ends_s: list[float]
    migrations: list[tuple[float, float, int, int, float, int, bool]]
    instances: list[int]
    dispatch_s: float | None = None  # when the first instance queued it


@dataclass(frozen=True)
class RequestDone:
    request_id: int
    stats: RequestStats


@dataclass(frozen=True)
class RequestMoved:
    """A migration committed: the destination holds the request now."""

    request_id: int
    dst: int
    downtime_s: float


@dataclass(frozen=True)
class RequestLost:
    """The source released the request but the destination never adopted it (it died): the frontend recomputes it."""

    request_id: int
    reason: str


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


def request_stats(req: Request) -> RequestStats:
    return RequestStats(
        list(req.preemptions_s), list(req.prefill_ends_s), list(req.migrations), list(req.instances), req.dispatch_s
    )


# -- executors ------------------------------------------------------------------------------------------------------
def build_executor(spec: InstanceSpec) -> tuple[Executor, dict[str, Any]]:
    """The executor of ``spec`` and what the frontend must know about it (vocabulary, context length, KV size)."""
    if spec.backend == "torch":
        import torch

        from llumnix.engine.executor import TorchExecutor

        torch.set_num_threads(spec.torch_threads)
        ex = TorchExecutor(spec.model, spec.num_blocks or 256, spec.block_size, spec.device, spec.dtype, spec.seed,
                           invariant_batch=spec.invariant_batch)
        cfg = ex.runner.config
        info = {
            "vocab_size": cfg.vocab_size,
            "max_position": cfg.max_position,
            "kv_bytes_per_block": ex.runner.kv_cache.bytes_per_block,
            "model": spec.model,
        }
        return ex, info
    from llumnix.engine.executor import ProfileExecutor
    from llumnix.profiles import Profile

    profile = Profile.load(spec.profile)
    update = {}
    if spec.num_blocks is not None:
        update["total_blocks"] = spec.num_blocks
    if spec.block_size != profile.block_size:
        update["block_size"] = spec.block_size
    if update:
        profile = profile.model_copy(update=update)
    info = {
        "vocab_size": PROFILE_VOCAB_SIZE,
        "max_position": profile.total_blocks * profile.block_size,
        "kv_bytes_per_block": profile.kv_bytes_per_token * profile.block_size,
        "model": f"profile:{profile.name}",
    }
    return ProfileExecutor(profile, speed=spec.speed), info


# -- the destination, as the source's Migration sees it -------------------------------------------------------------
class RemoteDestination:
    """Stands in for the destination's ``Llumlet`` inside the source's ``Migration``.

    The state machine calls ``pre_alloc`` synchronously; the source has already asked the real destination for exactly
    that many blocks and ``offer``ed the reply. ABORT (``blocks.free``) and COMMIT (``scheduler.adopt``) are recorded
    here and sent by the source once the state machine call returns.
    """

    def __init__(self, instance_id: int) -> None:
        self.instance_id = instance_id
        self.migrations_in = 0  # the state machine's bookkeeping; the real destination counts its own
        self.blocks = SimpleNamespace(free=self._free)
        self.scheduler = SimpleNamespace(adopt=self._adopt)
        self.adopted: Request | None = None
        self.freed = False
        self._offer: tuple[int, list[int] | None] | None = None

    def offer(self, num_blocks: int, block_ids: list[int] | None) -> None:
        self._offer = (num_blocks, block_ids)

    def pre_alloc(self, owner: object, num_blocks: int) -> list[int] | None:
        offer, self._offer = self._offer, None
        if offer is None:
            log.error("migration %s: pre-alloc of %d blocks without a reply from the destination", owner, num_blocks)
            return None
        asked, ids = offer
        if asked != num_blocks:
            # Only if Migration._begin_stage and stage_blocks_needed disagree (a change in the core): abort, loudly.
            log.error("migration %s: the stage takes %d blocks but %d were pre-allocated", owner, num_blocks, asked)
            return None
        return ids

    def _free(self, owner: object) -> int:
        self.freed = True
        return 0

    def _adopt(self, req: Request, owner: object) -> None:
        self.adopted = req


def stage_blocks_needed(mig: Migration, first: bool) -> int | None:
    """How many blocks the next stage of ``mig`` will pre-allocate, or None when the request has left the source's
    running / frozen sets (the stage will abort without asking)."""
    req, sched = mig.request, mig.src.scheduler
    if not (req.request_id in sched.frozen or any(r is req for r in sched.running)):
        return None
    copied = mig.copied_blocks + (0 if first else len(mig.stages[-1].src_blocks))
    upto, _ = mig.next_stage_extent(copied)
    return upto - copied


@dataclass
class _IncomingMigration:
    src: int
    owner: object
    started_s: float = field(default_factory=time.time)


# -- the actor ------------------------------------------------------------------------------------------------------
class InstanceActor:
    """Create with ``ray.remote(InstanceActor).options(...).remote(instance_id, spec)``, then ``await start()``."""

    def __init__(self, instance_id: int, spec: InstanceSpec, transport: TransportSpec | str = "object-store") -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.instance_id = instance_id
        self.spec = spec
        self.engine, self.info = self._build_engine()
        self.mig_config = MigrationConfig(last_stage_max_blocks=spec.last_stage_blocks, max_stages=spec.max_stages)
        self.transport = make_transport(transport, instance_id, _node_address())
        self.clock = time.time
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"instance{instance_id}-step")
        self._outbox: list[Any] = []
        self._num_received = 0
        self._steps = 0
        self._busy_s = 0.0
        # Per step: (start, end) on the perf counter from scheduling to the emitted tokens, kind, batch size, prefill
        # tokens and their sum of squares, decode context tokens: the in-situ profile (llumnix.bench.insitu).
        self._step_log: list[tuple[float, float, str, int, int, int, int]] = []
        self._finished = 0
        self._mig_committed = 0
        self._mig_aborted = 0
        self._mig_downtime_s = 0.0
        self._mig_bytes = 0
        self._incoming: dict[int, _IncomingMigration] = {}
        self._drives = 0  # source-side migrations whose driver has not finished (commit news included)
        self._tasks: set[asyncio.Task] = set()
        self._failed: str | None = None
        self._stopping = False
        self._loop_task: asyncio.Task | None = None

    def _build_engine(self) -> tuple[EngineInstance, dict[str, Any]]:
        """The engine this actor steps and what the frontend must know about it (see ``build_executor``)."""
        spec = self.spec
        executor, info = build_executor(spec)
        sched_cfg = SchedulerConfig(
            max_num_seqs=spec.max_num_seqs,
            max_batched_tokens=spec.max_batched_tokens,
            enable_priorities=spec.priorities,
        )
        ll_cfg = LlumletConfig(enable_priorities=spec.priorities)
        engine = EngineInstance(self.instance_id, executor, sched_cfg, ll_cfg, watermark=spec.watermark, clock=time.time)
        return engine, info

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

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _emit(self, event: Any) -> None:
        self._outbox.append(event)
        self._has_output.set()

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
                    await asyncio.wait_for(self._work.wait(), 0.05)

    async def _step_once(self) -> bool:
        """One engine step (the step lock is held); False when there was nothing to run."""
        started = time.perf_counter()
        plan = self.scheduler.schedule(self.clock())
        if plan is None:
            return False
        if plan.requests:
            t0 = time.perf_counter()
            tokens = await asyncio.get_running_loop().run_in_executor(self._pool, self.executor.execute, plan)
            self._busy_s += time.perf_counter() - t0
            self._after_step(plan, tokens)
            self._log_step(plan, started)
        return True  # (with no requests: every request of a decode step was preempted, so schedule again)

    def _log_step(self, plan: StepPlan, started: float) -> None:
        prefill = plan.kind is StepKind.PREFILL
        self._step_log.append((
            started, time.perf_counter(), plan.kind.value, len(plan.requests),
            sum(plan.prefill_tokens) if prefill else 0, sum(n * n for n in plan.prefill_tokens) if prefill else 0,
            0 if prefill else int(plan.context_tokens),
        ))  # fmt: skip

    async def step_log(self) -> list[tuple[float, float, str, int, int, int, int]]:
        """Every step this instance ran so far (see ``_step_log``)."""
        return list(self._step_log)

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
            return False
        self.engine.add_request(req)
        self._work.set()
        return True

    # -- auto-scaling: drain, then retire ------------------------------------------------------------------------
    async def drain(self) -> list[int]:
        """Start draining (the simulator's scale-down): the llumlet reports freeness -inf from now on, so no request is
        dispatched or migrated here and the pairing policy moves the running ones away; the waiting requests are
        handed back (their engine request ids) for the frontend to dispatch elsewhere. Running requests that are not
        migrated (no migration, high priority) finish here."""
        async with self._lock:  # between steps, as the simulator does it
            self.llumlet.draining = True
            taken = self.scheduler.take_waiting()  # queued requests hold no blocks (preemption frees them)
        self._work.set()
        return [r.request_id for r in taken]

    def _idle(self) -> bool:
        s, ll = self.scheduler, self.llumlet
        return not (
            s.running or s.waiting or s.frozen or self._incoming or self._drives
            or ll.migrations_out or ll.migrations_in or ll.migrating
        )

    async def retire(self) -> Report | None:
        """If this draining instance holds nothing (no request, no migration in either direction), stop taking work
        for good and return the last report (the events not yet polled); else None. Atomic on the actor's loop."""
        if not (self.llumlet.draining and self._idle()) or self._failed:
            return None
        self._stopping = True
        self._work.set()
        events, self._outbox = self._outbox, []
        return Report(self.instance_id, self.llumlet.load(), self._num_received, events, self._stats(), self._failed)

    async def poll(self, timeout_s: float) -> Report:
        """Wait until a step produced output (or ``timeout_s``), then return the events since the last poll and the
        load now. One poller at a time (the frontend)."""
        if not self._outbox and not self._failed:
            self._has_output.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._has_output.wait(), timeout_s)
        events, self._outbox = self._outbox, []
        return Report(self.instance_id, self.llumlet.load(), self._num_received, events, self._stats(), self._failed)

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
            "incoming_migrations": len(self._incoming),
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
        if ll.migrations_out >= ll.config.max_migrations_out:
            return {"started": False, "reason": "a migration out of this instance is in flight"}
        if request_id is None:
            req = ll.pick_migration_candidate()
        else:
            req = next((r for r in self.scheduler.running if r.request_id == request_id), None)
            high_pinned = req is not None and req.is_high and ll.config.enable_priorities  # never migrated
            if req is not None and (req.num_generated < 1 or req.request_id in ll.migrating or high_pinned):
                req = None
        if req is None:
            return {"started": False, "reason": "no running request to migrate"}
        ll.migrations_out += 1  # claim the slot now; the Migration takes it over when it starts
        self._drives += 1
        self._spawn(self._drive(migration_id, req, dst_id, dst_actor))
        return {"started": True, "reason": "", "request_id": req.request_id}

    async def _stage_boundary(self, mig: Migration, proxy: RemoteDestination, dst: Any, first: bool) -> Stage | None:
        """Begin the next stage (or commit). Call with the step lock held."""
        if not first and mig.stages[-1].final:
            return mig.end_stage(self.clock())
        need = stage_blocks_needed(mig, first)
        if need is not None:
            ids = await dst.mig_pre_alloc.remote(mig.migration_id, mig.owner_key, self.instance_id, need)
            proxy.offer(need, ids)
        if first:
            self.llumlet.migrations_out -= 1  # hand the claimed slot to Migration.start
            return mig.start(self.clock())
        return mig.end_stage(self.clock())

    async def _drive(self, migration_id: int, req: Request, dst_id: int, dst: Any) -> None:
        try:
            await self._drive_once(migration_id, req, dst_id, dst)
        finally:
            self._drives -= 1

    async def _drive_once(self, migration_id: int, req: Request, dst_id: int, dst: Any) -> None:
        proxy = RemoteDestination(dst_id)
        mig = Migration(migration_id, req, self.llumlet, proxy, self.mig_config)
        started = False
        moved = 0
        try:
            async with self._lock:
                stage = await self._stage_boundary(mig, proxy, dst, first=True)
                started = True
            while stage is not None:
                if stage.src_blocks:
                    data = self.executor.read_blocks(stage.src_blocks)
                    moved += await self.transport.send(dst, dst_id, migration_id, stage.dst_blocks, data)
                async with self._lock:
                    stage = await self._stage_boundary(mig, proxy, dst, first=False)
        except Exception as e:  # the destination died or the transfer failed: the request stays here
            log.warning("instance %d: migration %d to %d failed: %r", self.instance_id, migration_id, dst_id, e)
            if not started:
                self.llumlet.migrations_out -= 1
                with contextlib.suppress(Exception):
                    await dst.mig_abort.remote(migration_id)
                return
            async with self._lock:
                mig.abort(self.clock(), f"transfer failed: {e!r}")
        if mig.phase is MigrationPhase.COMMITTED:
            try:
                adopted = await dst.mig_commit.remote(migration_id, req)
            except Exception as e:
                adopted, err = False, repr(e)
            else:
                err = "destination refused the commit"
            if adopted:
                self._mig_committed += 1
                self._mig_downtime_s += mig.downtime_s
                self._mig_bytes += moved
                self._emit(RequestMoved(req.request_id, dst_id, mig.downtime_s))
            else:
                self._emit(RequestLost(req.request_id, f"migration {migration_id} to {dst_id} lost it: {err}"))
        elif mig.phase is MigrationPhase.ABORTED:
            self._mig_aborted += 1
            log.info("instance %d: migration %d aborted: %s", self.instance_id, migration_id, mig.abort_reason)
            with contextlib.suppress(Exception):  # free the destination's pre-allocation (idempotent there)
                await dst.mig_abort.remote(migration_id)
        self._work.set()  # an unfrozen request, or freed blocks

    # -- migration: destination side -----------------------------------------------------------------------------
    async def mig_pre_alloc(self, migration_id: int, owner: Any, src_id: int, num_blocks: int) -> list[int] | None:
        """PRE-ALLOC: reserve ``num_blocks`` for the next stage (ACK with their ids) or None (ABORT: no memory)."""
        if self._failed or self._stopping:
            return None
        if migration_id not in self._incoming:
            self._incoming[migration_id] = _IncomingMigration(src_id, owner)
            self.llumlet.migrations_in += 1
        return self.llumlet.pre_alloc(owner, num_blocks)

    async def mig_write(self, migration_id: int, dst_blocks: list[int], payload: Any) -> None:
        if migration_id not in self._incoming:
            raise RuntimeError(f"instance {self.instance_id}: no migration {migration_id} in flight")
        self.executor.write_blocks(dst_blocks, unpack(payload))

    async def kv_accept(self, src_id: int, key: str) -> None:
        """Join the torch.distributed KV channel ``key`` that ``src_id`` is opening to this instance."""
        await self._dist_transport().accept(src_id, key)

    async def kv_recv(self, src_id: int, key: str, migration_id: int, dst_blocks: list[int], shape: tuple[int, ...],
                      dtype: str) -> None:
        """Receive a stage's blocks from ``src_id`` over channel ``key`` and write them; the data is drained even
        when the migration was aborted meanwhile (its blocks may belong to another request by then: not written)."""
        data = await self._dist_transport().receive(src_id, key, shape, dtype)
        if migration_id not in self._incoming:
            raise RuntimeError(f"instance {self.instance_id}: no migration {migration_id} in flight")
        self.executor.write_blocks(dst_blocks, data)

    def _dist_transport(self) -> TorchDistTransport:
        if not isinstance(self.transport, TorchDistTransport):
            raise RuntimeError(f"instance {self.instance_id} moves KV over the {self.transport.name} transport; all "
                               "instances of a cluster must use the same one")
        return self.transport

    async def mig_commit(self, migration_id: int, req: Request) -> bool:
        """COMMIT: adopt the request whose KV now fills the pre-allocated blocks."""
        inc = self._incoming.pop(migration_id, None)
        if inc is None or self._failed:
            return False
        self.llumlet.migrations_in -= 1
        self.scheduler.adopt(req, inc.owner)
        self._work.set()
        return True

    async def mig_abort(self, migration_id: int) -> None:
        inc = self._incoming.pop(migration_id, None)
        if inc is not None:
            self.llumlet.migrations_in -= 1
            self.engine.blocks.free(inc.owner)
            self._work.set()

    async def peer_died(self, instance_id: int) -> int:
        """Free what incoming migrations from a dead source hold; return how many were dropped."""
        self.transport.forget(instance_id)
        dead = [mid for mid, inc in self._incoming.items() if inc.src == instance_id]
        for mid in dead:
            await self.mig_abort(mid)
        return len(dead)


def _node_address() -> str | None:
    """This node's address, for gloo to listen on (None outside Ray: the host name's)."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return None


def actor_class(spec: InstanceSpec) -> type[InstanceActor]:
    """The actor class of ``spec.backend``: vLLM engines have their own (``llumnix.runtime.vllm_actor``)."""
    if spec.backend == "vllm":
        from llumnix.runtime.vllm_actor import VllmInstanceActor
        from llumnix.runtime.vllm_model import require_vllm

        require_vllm()  # here rather than in every actor: one clear error
        return VllmInstanceActor
    return InstanceActor


__all__ = [
    "InstanceActor",
    "InstanceStats",
    "RemoteDestination",
    "Report",
    "RequestDone",
    "RequestLost",
    "RequestMoved",
    "RequestStats",
    "RequestStatus",
    "TokenBatch",
    "actor_class",
    "build_executor",
    "stage_blocks_needed",
]
