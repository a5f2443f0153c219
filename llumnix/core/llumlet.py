"""The llumlet: an instance's agent. Reports load (virtual usage, freeness), picks requests to migrate, and is one
endpoint of the migration protocol (see ``llumnix.core.migration``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from llumnix.core.block_manager import blocks_for
from llumnix.core.local_scheduler import LocalScheduler
from llumnix.core.request import Request, RequestStatus

QUEUED_DEMAND_MODES = ("all", "head")


@dataclass(frozen=True)
class LlumletConfig:
    """How an instance computes its load.

    ``queued_demand``: "all" counts the blocks of every waiting request (the authors' artifact), "head" only the
    head-of-line one (Algorithm 1 of the paper). ``high_priority_kv_tokens``: with priorities on, an instance holding
    high-priority requests looks full beyond this many tokens of KV to normal requests, so its batch stays small and
    the high-priority requests decode fast (artifact: ~1,600 tokens).
    """

    queued_demand: str = "all"
    enable_priorities: bool = False
    high_priority_kv_tokens: int = 1_600
    max_migrations_out: int = 1
    max_migrations_in: int = 1

    def __post_init__(self) -> None:
        if self.queued_demand not in QUEUED_DEMAND_MODES:
            raise ValueError(f"queued_demand must be one of {QUEUED_DEMAND_MODES}, got {self.queued_demand!r}")
        if self.high_priority_kv_tokens < 1:
            raise ValueError(f"high_priority_kv_tokens must be >= 1, got {self.high_priority_kv_tokens}")
        if self.max_migrations_out < 0 or self.max_migrations_in < 0:
            raise ValueError("max_migrations_out / max_migrations_in must be >= 0")


@dataclass(frozen=True)
class InstanceLoad:
    """A load report. Freeness is in blocks per running request and can be negative (or -inf while draining)."""

    instance_id: int
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    num_high: int
    freeness: float  # as seen by a normal-priority request (includes the high-priority reserve)
    freeness_high: float  # as seen by a high-priority request
    draining: bool
    migrations_out: int
    migrations_in: int
    can_migrate_out: bool
    can_migrate_in: bool


class Llumlet:
    def __init__(self, instance_id: int, scheduler: LocalScheduler, config: LlumletConfig | None = None) -> None:
        self.instance_id = instance_id
        self.scheduler = scheduler
        self.config = config or LlumletConfig()
        self.draining = False
        self.migrations_out = 0
        self.migrations_in = 0
        self.migrating: set[int] = set()  # request ids with a migration out in flight

    @property
    def blocks(self):
        return self.scheduler.blocks

    # -- load ----------------------------------------------------------------------------------------------------
    def _queued_blocks(self) -> int:
        if self.config.queued_demand == "head":
            return self.scheduler.head_demand_blocks()
        return self.scheduler.waiting_demand_blocks

    def priority_reserve_blocks(self) -> int:
        if not (self.config.enable_priorities and self.scheduler.num_high > 0):
            return 0
        cap = blocks_for(self.config.high_priority_kv_tokens, self.blocks.block_size)
        return max(0, self.blocks.num_blocks - self.blocks.watermark_blocks - cap)

    def load(self) -> InstanceLoad:
        s = self.scheduler
        bm = s.blocks
        free = bm.num_free_blocks
        num_running = len(s.running) + len(s.frozen)
        denom = max(1, num_running + (1 if s.waiting else 0))
        room = free - bm.watermark_blocks - self._queued_blocks()
        if self.draining:
            freeness = freeness_high = -math.inf
        else:
            freeness_high = room / denom
            freeness = (room - self.priority_reserve_blocks()) / denom if s.num_high else freeness_high
        cfg = self.config
        return InstanceLoad(
            self.instance_id,
            num_running,
            len(s.waiting),
            free,
            bm.num_blocks,
            s.num_high,
            freeness,
            freeness_high,
            self.draining,
            self.migrations_out,
            self.migrations_in,
            self.migrations_out < cfg.max_migrations_out,
            (not self.draining) and self.migrations_in < cfg.max_migrations_in,
        )

    # -- migration: source side ----------------------------------------------------------------------------------
    def pick_migration_candidate(self) -> Request | None:
        """LCFS: the last-arrived running normal-priority request that already produced output."""
        for req in reversed(self.scheduler.running):
            if req.is_high and self.config.enable_priorities:
                continue
            if req.num_generated >= 1 and req.request_id not in self.migrating:
                return req
        return None

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
    def pre_alloc(self, owner: object, num_blocks: int) -> list[int] | None:
        """Reserve blocks for an incoming stage, or None (the destination lacks memory: ABORT)."""
        if self.draining or not self.blocks.can_allocate_blocks(num_blocks):
            return None
        return self.blocks.allocate_blocks(owner, num_blocks)
