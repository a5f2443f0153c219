"""Multi-stage live migration of one running request: the source side, as a sans-I/O state machine.

Stage 0 copies every complete KV block the request has while it keeps decoding on the source; each next stage copies
the blocks completed meanwhile. Once at most ``last_stage_max_blocks`` blocks remain (or after ``max_stages``), the
request is frozen on the source and the rest, including its partial last block, is copied (stop-and-copy: the
request's downtime). Then COMMIT: the destination adopts the request and the source frees its blocks.

Every stage starts with PRE-ALLOC on the destination, answered by ACK (blocks reserved) or ABORT (no memory). A stage
also aborts when the request finished or was preempted on the source. ABORT frees everything pre-allocated and leaves
the request running on the source. A failed copy or commit aborts too.

The runtime drives it (vLLM v1's ``schedule()`` -> output -> ``update_from_output()`` shape)::

    mig = Migration(id, request, src_llumlet, dst_id)   # claims the source's migration slot
    action = mig.start(now)                              # at a source step boundary
    while action is not None:
        result = execute(action)                         # PreAlloc / Copy / Commit on the destination; Abort: free it
        action = mig.on_result(result, now)              # None once committed or aborted

``start`` and the result of a non-final ``Copy`` must be delivered at a source step boundary: they begin a stage,
which reads the request's blocks and may freeze it. The messages are in ``llumnix.core.migration_protocol``.
A final ``Copied`` is always answered by ``Commit``: a runtime may send the COMMIT along with the final stage's copy
(the destination adopts the request once the blocks are written; one message fewer in the downtime) and deliver the
destination's answer as the result of the ``Commit`` action when it comes (the Ray runtime does: ``RayTransport``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from llumnix.core.llumlet import Llumlet
from llumnix.core.migration_protocol import (
    Abort,
    Action,
    Commit,
    Committed,
    Copied,
    Copy,
    Failed,
    PreAlloc,
    PreAllocated,
    Refused,
    Result,
)
from llumnix.core.request import MigrationRecord, Request


@dataclass(frozen=True)
class MigrationConfig:
    # Two blocks: a decode step adds at most one block per request, so after stage 0 (the bulk copy) the dirty set is
    # usually 0-2 blocks; waiting for fewer would add stages without shortening the stop-and-copy noticeably, and the
    # downtime of 2 blocks (32 tokens) is dominated by the fixed per-stage handshake, not by bytes.
    last_stage_max_blocks: int = field(
        default=2, metadata={"help": "Blocks left at which a migration stops the request and copies the rest."}
    )
    max_stages: int = field(default=8, metadata={"help": "Most migration stages before the stop-and-copy is forced."})

    def __post_init__(self) -> None:
        if self.last_stage_max_blocks < 0:
            raise ValueError(f"last_stage_max_blocks must be >= 0, got {self.last_stage_max_blocks}")
        if self.max_stages < 1:
            raise ValueError(f"max_stages must be >= 1, got {self.max_stages}")


class MigrationPhase(enum.Enum):
    RESERVED = "reserved"  # decided, waiting for the source's next step boundary
    PRE_ALLOC = "pre_alloc"  # asked the destination for the next stage's blocks
    STAGING = "staging"  # a stage's copy in flight while the request keeps decoding
    STOP_AND_COPY = "stop_and_copy"  # the final copy in flight, the request frozen
    COMMITTING = "committing"  # asked the destination to adopt the request
    COMMITTED = "committed"
    ABORTED = "aborted"


@dataclass(frozen=True)
class Stage:
    index: int
    src_blocks: list[int]  # physical block ids on the source, in the request's logical order
    dst_blocks: list[int]  # pre-allocated ids on the destination, same order
    final: bool


NOT_MIGRATABLE = "request finished or was preempted on the source"


@dataclass
class Migration:
    migration_id: int
    request: Request
    src: Llumlet
    dst_id: int
    config: MigrationConfig = field(default_factory=MigrationConfig)

    phase: MigrationPhase = MigrationPhase.RESERVED
    start_s: float = 0.0
    end_s: float | None = None
    stages: list[Stage] = field(default_factory=list)
    copied_blocks: int = 0
    num_bytes: int = 0  # what the runtime reported moving (``Copied.num_bytes``)
    abort_reason: str | None = None
    downtime_s: float = 0.0
    _freeze_s: float | None = None
    _preemptions_at_start: int = 0
    _pending: tuple[int, bool] | None = None  # (blocks up to, final) of the stage whose PRE-ALLOC is in flight

    def __post_init__(self) -> None:
        """Claim the source's migration slot and the request, so no other migration picks either."""
        self.src.migrations_out += 1
        self.src.migrating.add(self.request.request_id)

    @property
    def done(self) -> bool:
        return self.phase in (MigrationPhase.COMMITTED, MigrationPhase.ABORTED)

    @property
    def committed(self) -> bool:
        return self.phase is MigrationPhase.COMMITTED

    @property
    def blocks(self) -> int:
        """KV blocks copied (or being copied) over all stages begun."""
        return sum(len(s.src_blocks) for s in self.stages)

    # -- the protocol ----------------------------------------------------------------------------------------------
    def start(self, now: float) -> Action:
        """Begin stage 0 (at a source step boundary)."""
        if self.phase is not MigrationPhase.RESERVED:
            raise RuntimeError(f"migration {self.migration_id} already started")
        self.start_s = now
        self._preemptions_at_start = len(self.request.preemptions_s)
        return self._begin_stage(now)

    def on_result(self, result: Result, now: float) -> Action | None:
        """What happened to the last action; returns the next action, or None once committed (or already ended)."""
        if self.done:
            return None
        phase = self.phase
        if phase is MigrationPhase.PRE_ALLOC:
            if isinstance(result, PreAllocated):
                return self._stage_allocated(result.block_ids, now)
            if isinstance(result, Refused | Failed):
                return self.abort(now, result.reason)
        elif phase in (MigrationPhase.STAGING, MigrationPhase.STOP_AND_COPY):
            if isinstance(result, Copied):
                self.copied_blocks += len(self.stages[-1].src_blocks)
                self.num_bytes += result.num_bytes
                if phase is MigrationPhase.STAGING:
                    return self._begin_stage(now)
                self.phase = MigrationPhase.COMMITTING
                return Commit(self.migration_id, self.dst_id, self.request)
            if isinstance(result, Failed):
                return self.abort(now, f"transfer failed: {result.reason}")
        elif phase is MigrationPhase.COMMITTING:
            if isinstance(result, Committed):
                self._commit(now)
                return None
            if isinstance(result, Failed):
                return self.abort(now, f"commit failed: {result.reason}")
        raise ValueError(f"migration {self.migration_id}: {type(result).__name__} does not answer phase {phase.value}")

    def abort(self, now: float, reason: str) -> Abort | None:
        """ABORT (the runtime's own reasons too: destination gone, source stopping). The request keeps running on the
        source; the returned action tells the runtime to free the destination's pre-allocation. None if ended."""
        if self.done:
            return None
        if self.phase is MigrationPhase.RESERVED:
            self.start_s = now
        if self.phase is MigrationPhase.STOP_AND_COPY or self.phase is MigrationPhase.COMMITTING:
            if self.request.request_id in self.src.scheduler.frozen:
                self.src.scheduler.unfreeze(self.request)
            self.downtime_s = now - (self._freeze_s if self._freeze_s is not None else now)
        self.abort_reason = reason
        self._finish(now, MigrationPhase.ABORTED)
        return Abort(self.migration_id, self.dst_id, reason)

    # -- stages ------------------------------------------------------------------------------------------------------
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

    def _begin_stage(self, now: float) -> Action:
        if not self.src.is_migratable(self.request, self._preemptions_at_start):
            return self.abort(now, NOT_MIGRATABLE)
        upto, final = self.next_stage_extent(self.copied_blocks)
        self._pending = (upto, final)
        self.phase = MigrationPhase.PRE_ALLOC
        return PreAlloc(self.migration_id, self.dst_id, upto - self.copied_blocks)

    def _stage_allocated(self, dst_blocks: list[int], now: float) -> Action:
        upto, final = self._pending
        self._pending = None
        src_blocks = self.src.kv_blocks_of(self.request)[self.copied_blocks : upto]
        if len(dst_blocks) != len(src_blocks):
            return self.abort(now, f"destination pre-allocated {len(dst_blocks)} blocks for a stage of "
                                   f"{len(src_blocks)}")
        if final:
            self.src.scheduler.freeze(self.request)
            self._freeze_s = now
            self.phase = MigrationPhase.STOP_AND_COPY
        else:
            self.phase = MigrationPhase.STAGING
        stage = Stage(len(self.stages), list(src_blocks), list(dst_blocks), final)
        self.stages.append(stage)
        return Copy(self.migration_id, self.dst_id, stage.index, tuple(stage.src_blocks), tuple(stage.dst_blocks),
                    final, self.request.request_id)

    def _commit(self, now: float) -> None:
        self.src.scheduler.release(self.request)
        self.downtime_s = now - (self._freeze_s if self._freeze_s is not None else now)
        self._finish(now, MigrationPhase.COMMITTED)

    def _finish(self, now: float, phase: MigrationPhase) -> None:
        self.phase = phase
        self.end_s = now
        self.src.migrations_out -= 1
        self.src.migrating.discard(self.request.request_id)
        self.request.migrations.append(self.record())

    def record(self) -> MigrationRecord:
        return MigrationRecord(
            migration_id=self.migration_id,
            request_id=self.request.request_id,
            src=self.src.instance_id,
            dst=self.dst_id,
            start_s=self.start_s,
            end_s=self.end_s if self.end_s is not None else self.start_s,
            stages=len(self.stages),
            blocks=self.blocks,
            downtime_s=self.downtime_s,
            committed=self.committed,
            abort_reason=self.abort_reason or "",
        )


def answer_locally(mig: Migration, action: Action | None, dst: Llumlet, now: float) -> Copy | None:
    """Carry out the actions a destination ``Llumlet`` in this process answers at once (PRE-ALLOC, COMMIT, ABORT);
    return the first ``Copy`` (moving the blocks is the runtime's job), or None once the migration has ended."""
    while action is not None:
        if isinstance(action, PreAlloc):
            action = mig.on_result(dst.pre_alloc(action.migration_id, action.num_blocks), now)
        elif isinstance(action, Commit):
            action = mig.on_result(dst.commit_in(action.migration_id, action.request), now)
        elif isinstance(action, Abort):
            dst.abort_in(action.migration_id)
            action = None
        else:
            return action
    return None
