"""Multi-stage live migration of one running request, as a transport-independent state machine.

Stage 0 copies every complete KV block the request has while it keeps decoding on the source; each next stage copies
the blocks completed meanwhile. Once at most ``last_stage_max_blocks`` blocks remain (or after ``max_stages``), the
request is frozen on the source and the rest, including its partial last block, is copied (stop-and-copy: the
request's downtime). Then COMMIT: the destination adopts the request and the source frees its blocks.

Every stage starts with PRE-ALLOC on the destination, answered by ACK (blocks reserved) or ABORT (no memory). A stage
also aborts when the request finished or was preempted on the source. ABORT frees everything pre-allocated and leaves
the request running on the source. The runtime moves the bytes (a virtual delay in the simulator, tensor copies in
the real engine) between ``begin_stage`` and ``end_stage``; both are called at the source's step boundaries.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from llumnix.core.llumlet import Llumlet
from llumnix.core.request import Request


@dataclass(frozen=True)
class MigrationConfig:
    # Two blocks: a decode step adds at most one block per request, so after stage 0 (the bulk copy) the dirty set is
    # usually 0-2 blocks; waiting for fewer would add stages without shortening the stop-and-copy noticeably, and the
    # downtime of 2 blocks (32 tokens) is dominated by the fixed per-stage handshake, not by bytes.
    last_stage_max_blocks: int = 2
    max_stages: int = 8

    def __post_init__(self) -> None:
        if self.last_stage_max_blocks < 0:
            raise ValueError(f"last_stage_max_blocks must be >= 0, got {self.last_stage_max_blocks}")
        if self.max_stages < 1:
            raise ValueError(f"max_stages must be >= 1, got {self.max_stages}")


class MigrationPhase(enum.Enum):
    STAGING = "staging"
    STOP_AND_COPY = "stop_and_copy"
    COMMITTED = "committed"
    ABORTED = "aborted"


@dataclass(frozen=True)
class Stage:
    index: int
    src_blocks: list[int]  # physical block ids on the source, in the request's logical order
    dst_blocks: list[int]  # pre-allocated ids on the destination, same order
    final: bool


@dataclass
class Migration:
    migration_id: int
    request: Request
    src: Llumlet
    dst: Llumlet
    config: MigrationConfig = field(default_factory=MigrationConfig)

    phase: MigrationPhase = MigrationPhase.STAGING
    start_s: float = 0.0
    end_s: float | None = None
    stages: list[Stage] = field(default_factory=list)
    copied_blocks: int = 0
    abort_reason: str | None = None
    downtime_s: float = 0.0
    _freeze_s: float | None = None
    _preemptions_at_start: int = 0

    @property
    def owner_key(self) -> tuple[str, int]:
        return ("migration", self.migration_id)

    @property
    def done(self) -> bool:
        return self.phase in (MigrationPhase.COMMITTED, MigrationPhase.ABORTED)

    @property
    def bytes_blocks(self) -> int:
        return sum(len(s.src_blocks) for s in self.stages)

    def start(self, now: float) -> Stage | None:
        """Claim the request and begin stage 0. Returns the stage, or None if it aborted at once."""
        self.start_s = now
        self._preemptions_at_start = len(self.request.preemptions_s)
        self.src.migrations_out += 1
        self.dst.migrations_in += 1
        self.src.migrating.add(self.request.request_id)
        return self._begin_stage(now)

    def next_stage_extent(self, copied_blocks: int) -> tuple[int, bool]:
        """Where the next stage ends (exclusive block index in the request's table) and whether it is the final
        stop-and-copy, given ``copied_blocks`` already copied. Non-final stages copy only complete blocks: the last,
        partial one still changes while the request decodes."""
        req, src = self.request, self.src
        num_blocks = src.blocks.num_blocks_of(req.request_id)
        complete = min(num_blocks, src.kv_tokens_of(req) // src.blocks.block_size)
        final = (
            num_blocks - copied_blocks <= self.config.last_stage_max_blocks
            or len(self.stages) + 1 >= self.config.max_stages
        )
        return (num_blocks if final else max(copied_blocks, complete)), final

    def _begin_stage(self, now: float) -> Stage | None:
        req = self.request
        if not self.src.is_migratable(req, self._preemptions_at_start):
            return self.abort(now, "request finished or was preempted on the source")
        upto, final = self.next_stage_extent(self.copied_blocks)
        src_blocks = self.src.kv_blocks_of(req)[self.copied_blocks : upto]
        dst_blocks = self.dst.pre_alloc(self.owner_key, len(src_blocks))
        if dst_blocks is None:
            return self.abort(now, "destination lacks free blocks")
        if final:
            self.src.scheduler.freeze(req)
            self._freeze_s = now
            self.phase = MigrationPhase.STOP_AND_COPY
        stage = Stage(len(self.stages), list(src_blocks), dst_blocks, final)
        self.stages.append(stage)
        return stage

    def end_stage(self, now: float) -> Stage | None:
        """The runtime finished copying the current stage: begin the next one, or commit. None when done."""
        stage = self.stages[-1]
        self.copied_blocks += len(stage.src_blocks)
        if not stage.final:
            return self._begin_stage(now)
        req = self.request
        self.src.scheduler.release(req)
        self.dst.scheduler.adopt(req, self.owner_key)
        self.downtime_s = now - (self._freeze_s or now)
        self._finish(now, MigrationPhase.COMMITTED)
        req.instances.append(self.dst.instance_id)
        return None

    def abort(self, now: float, reason: str) -> None:
        """ABORT: free the destination's pre-allocation; the request keeps running on the source."""
        if self.done:
            return None
        self.dst.blocks.free(self.owner_key)
        if self.phase is MigrationPhase.STOP_AND_COPY and self.request.request_id in self.src.scheduler.frozen:
            self.src.scheduler.unfreeze(self.request)
            self.downtime_s = now - (self._freeze_s or now)
        self.abort_reason = reason
        self._finish(now, MigrationPhase.ABORTED)
        return None

    def _finish(self, now: float, phase: MigrationPhase) -> None:
        self.phase = phase
        self.end_s = now
        self.src.migrations_out -= 1
        self.dst.migrations_in -= 1
        self.src.migrating.discard(self.request.request_id)
        self.request.migrations.append(
            (
                self.start_s,
                now,
                self.src.instance_id,
                self.dst.instance_id,
                self.downtime_s,
                len(self.stages),
                phase is MigrationPhase.COMMITTED,
            )
        )
