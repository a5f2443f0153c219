"""A request and its lifecycle timeline."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from llumnix.core.records import MigrationRecord

NORMAL = 0
HIGH = 1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FROZEN = "frozen"  # in the stop-and-copy stage of a migration: holds KV, takes no steps
    FINISHED = "finished"


@dataclass
class Request:
    """One generation request.

    ``prompt_tokens`` / ``output_tokens`` are lengths (outputs use ignore_eos semantics: a request always produces
    exactly ``output_tokens`` tokens, unless it has ``stop_token_ids``). ``num_generated`` counts output tokens
    produced so far. A real engine also fills ``prompt_token_ids`` / ``output_token_ids``; the simulator only counts.
    ``stop_token_ids``: a real model's end-of-sequence tokens; generating one finishes the request early (it is the
    last output token). Empty for the simulator and random weights.
    """

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    priority: int = NORMAL
    prompt_token_ids: list[int] | None = None
    stop_token_ids: frozenset[int] = frozenset()

    status: RequestStatus = RequestStatus.WAITING
    num_generated: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    # Timeline (seconds, in the runtime's clock).
    dispatch_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    prefill_starts_s: list[float] = field(default_factory=list)
    prefill_ends_s: list[float] = field(default_factory=list)
    preemptions_s: list[float] = field(default_factory=list)
    migrations: list[MigrationRecord] = field(default_factory=list)
    instances: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1:
            raise ValueError(f"request {self.request_id}: prompt_tokens must be >= 1, got {self.prompt_tokens}")
        if self.output_tokens < 1:
            raise ValueError(f"request {self.request_id}: output_tokens must be >= 1, got {self.output_tokens}")
        if self.priority not in (NORMAL, HIGH):
            raise ValueError(f"request {self.request_id}: priority must be 0 (normal) or 1 (high), got {self.priority}")

    @property
    def seq_len(self) -> int:
        """Tokens whose KV the request needs after the next step: prompt plus every token generated so far."""
        return self.prompt_tokens + self.num_generated

    @property
    def is_high(self) -> bool:
        return self.priority == HIGH

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def remaining_tokens(self) -> int:
        return self.output_tokens - self.num_generated
