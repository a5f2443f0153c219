"""The llumlet: an instance's agent. Every rule about an instance's load and its part in migrations lives here, so
that the simulator and the real runtimes (Ray actors over our engine or vLLM) apply the same ones:

- load: virtual usage and freeness (``InstanceLoad``, computed from ``LoadInputs`` by ``freeness``), and the same
  load with requests dispatched but not yet reported (``InstanceLoad.with_pending``);
- source side of a migration: which request may move (``can_migrate``, ``pick_migration_candidate``), whether it is
  still movable (``is_migratable``), how many migrations may run at once;
- destination side: reserving a slot, PRE-ALLOC (``pre_alloc`` answers with the result the source's ``Migration``
  consumes), COMMIT (``commit_in``) and ABORT (``abort_in``);
- ``is_idle``: nothing queued, running, frozen or migrating (a draining instance may stop then).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from llumnix.core.local_scheduler import LocalScheduler
from llumnix.core.migration_protocol import Committed, Failed, PreAllocated, Refused
from llumnix.core.request import Request, RequestStatus

QUEUED_DEMAND_MODES = ("all", "head")
LOAD_REPORTS = ("per-step", "fresh")


CANDIDATE_RULES = ("lcfs", "artifact", "fewest-blocks")


@dataclass(frozen=True)
class LlumletConfig:
    """How an instance computes its load and picks what to migrate.

    ``queued_demand``: "all" counts the blocks of every waiting request (the authors' artifact, as fractional blocks:
    tokens / block size), "head" only the head-of-line one (Algorithm 1 of the paper). ``high_priority_kv_tokens``:
    with priorities on, an instance holding high-priority requests keeps this many tokens of KV usable for them and
    looks full beyond it to normal requests, so its batch stays small (artifact: ``total - 1600 // 16`` blocks held
    back, osdi24ae ``vllm/instance_info.py:96-97``). ``candidate``: "lcfs" migrates the last-arrived running
    normal-priority request that already has output (the paper); "artifact" reproduces the artifact's loop, which
    checks that such a request exists but migrates the last running request, whatever its priority or output
    (osdi24ae ``vllm/core/scheduler.py:158-174``); "fewest-blocks" (this project's, not the paper's: system
    ``llumnix-sized``) keeps lcfs's eligibility but migrates the one holding the fewest KV blocks, the cheapest to
    copy (ties: the last-arrived). ``max_migrations``: migrations an instance takes part in at once,
    as source or destination (artifact: one, osdi24ae ``llm_engine_manager.py:460-479``).
    """

    queued_demand: str = field(
        default="all",
        metadata={
            "help": "Virtual usage of queued requests: all of them (artifact) or the head of line only (Algorithm 1).",
            "choices": QUEUED_DEMAND_MODES,
        },
    )
    enable_priorities: bool = field(
        default=False, metadata={"help": "High-priority requests get headroom and never migrate."}
    )
    high_priority_kv_tokens: int = field(
        default=1_600,
        metadata={"help": "KV tokens an instance serving high priority keeps usable (the rest is reserved headroom)."},
    )
    candidate: str = field(
        default="lcfs",
        metadata={"help": "Which running request a source migrates: the last-arrived normal one with output (lcfs), "
                          "the artifact's last running one, or of lcfs's the one with the fewest KV blocks.",
                  "choices": CANDIDATE_RULES},
    )
    max_migrations: int = field(
        default=1, metadata={"help": "Migrations one instance takes part in at a time, as source or destination."}
    )

    def __post_init__(self) -> None:
        if self.queued_demand not in QUEUED_DEMAND_MODES:
            raise ValueError(f"queued_demand must be one of {QUEUED_DEMAND_MODES}, got {self.queued_demand!r}")
        if self.high_priority_kv_tokens < 1:
            raise ValueError(f"high_priority_kv_tokens must be >= 1, got {self.high_priority_kv_tokens}")
        if self.candidate not in CANDIDATE_RULES:
            raise ValueError(f"candidate must be one of {CANDIDATE_RULES}, got {self.candidate!r}")
        if self.max_migrations < 0:
            raise ValueError(f"max_migrations must be >= 0, got {self.max_migrations}")


@dataclass(frozen=True)
class LoadInputs:
    """What freeness is computed from (blocks and request counts of one instance at one moment)."""

    free_blocks: int
    watermark_blocks: int
    queued_blocks: float  # virtual usage of the waiting requests (all of them, or the head of line: ``queued_demand``)
    head_blocks: float  # the head-of-line waiting request's demand in the same unit (0 when nothing waits)
    num_running: int  # running and frozen (mid-migration) requests
    num_waiting: int
    num_high: int  # high-priority requests held (waiting, running or frozen)
    reserve_blocks: int  # with priorities on: blocks held back from one priority class (see ``freeness``)
    num_preempted_waiting: int = 0  # waiting requests that were preempted and wait to be recomputed
    block_size: int = 16
    queued_demand: str = "all"
    draining: bool = False
    priorities: bool = False  # the local queue puts high priority first (``local_priority: strict``)
    head_high: bool = False  # the head-of-line waiting request is high priority


@dataclass(frozen=True)
class Freeness:
    """An instance's freeness (blocks per request; +inf when it holds no request, -inf while draining).

    ``migration`` (pairing): (free - watermark - queued - reserve if it holds high priority) / (running + 1 if
    anything waits), osdi24ae ``vllm/instance_info.py:118-135``. ``dispatch`` (a normal request): the same room over
    (running + waiting), ``:139-158``; ``dispatch_high`` (a high-priority request): the reserve is held back on the
    instances *without* high priority instead, so high-priority requests gather where high priority already runs.
    """

    migration: float
    dispatch: float
    dispatch_high: float


def freeness(x: LoadInputs) -> Freeness:
    if x.draining:  # the paper's fake request of infinite usage
        return Freeness(-math.inf, -math.inf, -math.inf)
    room = x.free_blocks - x.watermark_blocks - x.queued_blocks
    holds_high = x.num_high > 0
    mine, theirs = (x.reserve_blocks, 0) if holds_high else (0, x.reserve_blocks)
    n_mig = x.num_running + (1 if x.num_waiting else 0)
    n_disp = x.num_running + x.num_waiting
    if n_disp == 0:
        return Freeness(math.inf, math.inf, math.inf)
    return Freeness((room - mine) / n_mig, (room - mine) / n_disp, (room - theirs) / n_disp)


@dataclass(frozen=True)
class InstanceLoad:
    """A load report (see ``Freeness`` for the three freeness measures)."""

    instance_id: int
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    num_high: int
    freeness: float  # for migration pairing (and the scaler's per-instance view)
    dispatch_freeness: float  # as a normal request's dispatch sees it
    dispatch_freeness_high: float  # as a high-priority request's dispatch sees it
    draining: bool
    migrations_out: int
    migrations_in: int
    can_migrate_out: bool
    can_migrate_in: bool
    num_preempted_waiting: int = 0
    inputs: LoadInputs | None = field(default=None, compare=False)

    @classmethod
    def from_inputs(cls, instance_id: int, x: LoadInputs, total_blocks: int, migrations_out: int,
                    migrations_in: int, can_migrate_out: bool, can_migrate_in: bool) -> InstanceLoad:
        f = freeness(x)
        return cls(instance_id, x.num_running, x.num_waiting, x.free_blocks, total_blocks, x.num_high, f.migration,
                   f.dispatch, f.dispatch_high, x.draining, migrations_out, migrations_in, can_migrate_out,
                   can_migrate_in, x.num_preempted_waiting, x)

    @property
    def is_idle(self) -> bool:
        """Nothing queued, running or migrating (as of this report)."""
        return not (self.num_running or self.num_waiting or self.migrations_out or self.migrations_in)

    @property
    def migrating(self) -> bool:
        return bool(self.migrations_out or self.migrations_in)

    def with_pending(self, pending: Sequence[tuple[float, bool]]) -> InstanceLoad:
        """This load as it will be once the instance has queued requests dispatched after it reported: (virtual usage
        of the request's prompt in blocks, is high priority) each, appended to its queue. The same ``freeness`` rule
        on the new inputs."""
        if not pending or self.inputs is None:
            return self
        x = self.inputs
        head, head_high = (x.head_blocks, x.head_high) if x.num_waiting else pending[0]
        if x.priorities and not head_high:  # a high-priority request enters the queue ahead of normal ones
            head, head_high = next(((b, h) for b, h in pending if h), (head, head_high))
        queued = x.queued_blocks + sum(b for b, _ in pending) if x.queued_demand == "all" else head
        new = replace(x, queued_blocks=queued, head_blocks=head, head_high=head_high,
                      num_waiting=x.num_waiting + len(pending), num_high=x.num_high + sum(1 for _, h in pending if h))
        return InstanceLoad.from_inputs(self.instance_id, new, self.num_total_blocks, self.migrations_out,
                                        self.migrations_in, self.can_migrate_out, self.can_migrate_in)

    def pending_usage(self, num_tokens: int) -> float:
        """The virtual usage a waiting request of ``num_tokens`` adds (``with_pending``'s unit)."""
        x = self.inputs
        if x is None or x.queued_demand == "all":
            return num_tokens / (x.block_size if x is not None else 16)
        return float(-(-num_tokens // x.block_size))

    def with_draining(self) -> InstanceLoad:
        """This load once the instance has been told to drain (before it reports so itself)."""
        x = replace(self.inputs, draining=True) if self.inputs is not None else None
        return replace(self, draining=True, freeness=-math.inf, dispatch_freeness=-math.inf,
                       dispatch_freeness_high=-math.inf, can_migrate_in=False, inputs=x)

    def with_migration_out(self) -> InstanceLoad:
        """This load once a migration out of the instance has been asked for (before it reports it)."""
        return replace(self, migrations_out=self.migrations_out + 1, can_migrate_out=False, can_migrate_in=False)

    def with_migration_in(self) -> InstanceLoad:
        """This load once a migration into the instance has been asked for (before it reports it)."""
        return replace(self, migrations_in=self.migrations_in + 1, can_migrate_out=False, can_migrate_in=False)


@dataclass
class IncomingMigration:
    """The destination side of one migration: its source and the blocks pre-allocated for it so far."""

    migration_id: int
    src: int

    @property
    def owner_key(self) -> tuple[str, int]:
        return ("migration", self.migration_id)


class Llumlet:
    def __init__(self, instance_id: int, scheduler: LocalScheduler, config: LlumletConfig | None = None) -> None:
        self.instance_id = instance_id
        self.scheduler = scheduler
        self.config = config or LlumletConfig()
        self.draining = False
        self.migrations_out = 0
        self.migrating: set[int] = set()  # request ids with a migration out in flight
        self.incoming: dict[int, IncomingMigration] = {}  # migration id -> its destination side here

    @property
    def blocks(self):
        return self.scheduler.blocks

    @property
    def migrations_in(self) -> int:
        return len(self.incoming)

    # -- load ----------------------------------------------------------------------------------------------------
    def _queued_blocks(self) -> float:
        if self.config.queued_demand == "head":
            return float(self.scheduler.head_demand_blocks())
        return self.scheduler.waiting_demand_tokens / self.blocks.block_size

    def high_priority_reserve_blocks(self) -> int:
        """Blocks held back from one priority class (0 with priorities off): total minus the high-priority KV cap
        (osdi24ae ``vllm/instance_info.py:96-97``)."""
        if not self.config.enable_priorities:
            return 0
        cap = self.config.high_priority_kv_tokens // self.blocks.block_size
        return max(0, self.blocks.num_blocks - cap)

    def priority_reserve_blocks(self) -> int:
        """The reserve normal requests see now: only while this instance holds high-priority requests."""
        return self.high_priority_reserve_blocks() if self.scheduler.num_high > 0 else 0

    def load_inputs(self) -> LoadInputs:
        s = self.scheduler
        bm = s.blocks
        head = s.waiting[0] if s.waiting else None
        head_blocks = 0.0 if head is None else (
            head.seq_len / bm.block_size if self.config.queued_demand == "all" else float(s.head_demand_blocks())
        )
        return LoadInputs(
            free_blocks=bm.num_free_blocks,
            watermark_blocks=bm.watermark_blocks,
            queued_blocks=self._queued_blocks(),
            head_blocks=head_blocks,
            num_running=len(s.running) + len(s.frozen),
            num_waiting=len(s.waiting),
            num_high=s.num_high,
            reserve_blocks=self.high_priority_reserve_blocks(),
            num_preempted_waiting=len(s.preempted_waiting),
            block_size=bm.block_size,
            queued_demand=self.config.queued_demand,
            draining=self.draining,
            priorities=s.config.enable_priorities and s.config.local_priority == "strict",
            head_high=head is not None and head.is_high,
        )

    def load(self) -> InstanceLoad:
        free_slot = self.migrations_out + self.migrations_in < self.config.max_migrations
        return InstanceLoad.from_inputs(
            self.instance_id,
            self.load_inputs(),
            self.blocks.num_blocks,
            self.migrations_out,
            self.migrations_in,
            free_slot,
            free_slot and not self.draining,
        )

    def is_idle(self) -> bool:
        """No request queued, running or frozen here and no migration in either direction."""
        return self.scheduler.num_requests == 0 and not (self.migrations_out or self.incoming or self.migrating)

    # -- migration: source side ----------------------------------------------------------------------------------
    def _may_move(self, req: Request) -> bool:
        return (
            req.num_generated >= 1
            and req.request_id not in self.migrating
            and not (req.is_high and self.config.enable_priorities)
        )

    def can_migrate(self, req: Request) -> bool:
        """May ``req`` start migrating out: running here, already produced output, no migration of it in flight,
        and not high priority with priorities on (those are never migrated)."""
        return req.status is RequestStatus.RUNNING and self._may_move(req) and any(
            r is req for r in self.scheduler.running
        )

    def can_start_migration_out(self) -> bool:
        return self.migrations_out + self.migrations_in < self.config.max_migrations

    def pick_migration_candidate(self) -> Request | None:
        """LCFS: the last-arrived running request that may migrate (``candidate: artifact``: the last running request,
        if any running request may migrate; ``fewest-blocks``: of those that may migrate, the one holding the fewest
        KV blocks, the last-arrived of equals)."""
        running = self.scheduler.running
        if self.config.candidate == "fewest-blocks":
            movable = (req for req in reversed(running) if self._may_move(req))
            return min(movable, key=lambda req: self.blocks.num_blocks_of(req.request_id), default=None)
        for req in reversed(running):
            if self._may_move(req):
                if self.config.candidate == "artifact" and running[-1].request_id not in self.migrating:
                    return running[-1]
                return req
        return None

    def running_request(self, request_id: int) -> Request | None:
        return next((r for r in self.scheduler.running if r.request_id == request_id), None)

    def is_migratable(self, req: Request, preemptions_at_start: int) -> bool:
        """Still running (or frozen by this migration) here, and not preempted since the migration began."""
        return (
            req.status in (RequestStatus.RUNNING, RequestStatus.FROZEN)
            and len(req.preemptions_s) == preemptions_at_start
            and (req.request_id in self.scheduler.frozen or req in self.scheduler.running)
        )

    def kv_blocks_of(self, req: Request) -> list[int]:
        return self.blocks.table(req.request_id)

    def kv_tokens_of(self, req: Request) -> int:
        """Tokens whose KV is already written: everything but the newest generated token."""
        return req.seq_len - 1

    # -- migration: destination side ----------------------------------------------------------------------------
    def can_accept_migration(self) -> bool:
        return not self.draining and self.migrations_out + self.migrations_in < self.config.max_migrations

    def reserve_in(self, migration_id: int, src: int) -> bool:
        """Claim a slot for an incoming migration (when the pairing decides it); False if this instance takes none."""
        if migration_id in self.incoming:
            return True
        if not self.can_accept_migration():
            return False
        self.incoming[migration_id] = IncomingMigration(migration_id, src)
        return True

    def has_room_for(self, num_blocks: int) -> bool:
        """Can this instance take ``num_blocks`` more blocks of a migrating request (above the admission
        watermark, and not while draining)."""
        return not self.draining and self.blocks.can_allocate_blocks(num_blocks)

    def pre_alloc(self, migration_id: int, num_blocks: int) -> PreAllocated | Refused:
        """PRE-ALLOC: reserve blocks for a migration's next stage (ACK with their ids) or refuse (ABORT)."""
        inc = self.incoming.get(migration_id)
        if inc is None:
            return Refused("destination holds no slot for the migration")
        if not self.has_room_for(num_blocks):
            return Refused("destination is draining" if self.draining else "destination lacks free blocks")
        return PreAllocated(self.blocks.allocate_blocks(inc.owner_key, num_blocks))

    def commit_in(self, migration_id: int, req: Request) -> Committed | Failed:
        """COMMIT: adopt ``req`` (its KV fills the blocks pre-allocated for the migration)."""
        inc = self.incoming.pop(migration_id, None)
        if inc is None:
            return Failed("destination holds no such migration")
        self.scheduler.adopt(req, inc.owner_key)
        req.instances.append(self.instance_id)
        return Committed()

    def abort_in(self, migration_id: int) -> bool:
        """ABORT: free what the migration pre-allocated here; False if it was not (or no longer) here."""
        inc = self.incoming.pop(migration_id, None)
        if inc is None:
            return False
        self.blocks.free(inc.owner_key)
        return True

    def drop_incoming_from(self, src: int) -> int:
        """The source ``src`` is gone: abort every migration from it; return how many."""
        dead = [mid for mid, inc in self.incoming.items() if inc.src == src]
        for mid in dead:
            self.abort_in(mid)
        return len(dead)


def reported_load(llumlet: Llumlet, report: InstanceLoad | None) -> InstanceLoad:
    """What the global scheduler knows of an instance under per-step reports (the artifact's view: an instance
    reports the load it had when it scheduled a step, once that step has produced its tokens; osdi24ae
    ``vllm/core/scheduler.py:511-558``, ``vllm/engine/llm_engine_manager.py:263-276``): the last such report (none
    yet: its load now, an empty instance at first), with what the global scheduler knows first-hand: whether it is
    draining and the migrations it takes part in (the global scheduler started them)."""
    now = llumlet.load()
    if report is None:
        return now
    if now.draining:
        return report.with_draining()
    return replace(report, migrations_out=now.migrations_out, migrations_in=now.migrations_in,
                   can_migrate_out=now.can_migrate_out, can_migrate_in=now.can_migrate_in)
