"""Records the runtimes keep of what happened: one migration attempt, one engine step. Plain frozen data, the same
in the simulator and the real runtimes; ``llumnix.metrics.tables`` turns them into tables with declared columns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MigrationRecord:
    """One migration attempt of a request, committed or aborted (the runtime's clock, seconds)."""

    migration_id: int
    request_id: int
    src: int
    dst: int
    start_s: float
    end_s: float
    stages: int
    blocks: int  # KV blocks copied over all stages begun
    downtime_s: float  # freeze to commit (or to abort) of the stop-and-copy stage; 0 if it never froze
    committed: bool
    abort_reason: str = ""


@dataclass(frozen=True)
class StepRecord:
    """One engine step of one instance: when it ran (the runtime's clock, or the perf counter of a real instance),
    what it computed. ``prefill_sum_sq`` (the sum of squared prompt lengths) feeds the in-situ step-time fit."""

    instance_id: int
    start_s: float
    end_s: float
    kind: str  # "prefill" or "decode"
    batch_size: int
    prefill_tokens: int
    prefill_sum_sq: int
    context_tokens: int  # a decode step's KV tokens attended over
    migrating: bool  # a migration out of the instance was in flight

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s
