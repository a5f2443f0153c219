"""The client's side of a request on the serving cluster: its token stream reassembled across migrations and
re-dispatches, its engine timeline, and latency statistics of the frontend.

A request's tokens reach the frontend from whichever instance holds it, numbered by their position in its output; a
migrated request's last tokens on the source and first on the destination come through two instances' reports, so
they are put back in order here (``ClientRequest.add_token``). An engine request always numbers its outputs from the
start of the client's output (a re-dispatched one carries the tokens streamed so far), so positions never shift.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from llumnix.core.records import MigrationRecord
from llumnix.runtime.instance_actor import RequestStats


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
    stop_token_ids: frozenset[int] = frozenset()  # end-of-sequence tokens: the request finishes after one
    tokens: list[int] = field(default_factory=list)
    stopped: bool = False  # finished by a stop token or by its client (a stop string), not by max_tokens
    cut_short: bool = False  # its client finished it (a stop string) before the engine did
    abandoned: bool = False  # its client went away before it finished (ClusterManager.abort)
    first_token_s: float | None = None
    finish_s: float | None = None
    error: str | None = None
    engine_id: int = -1  # the engine request id of the current attempt
    owner: int | None = None
    instances: list[int] = field(default_factory=list)
    migrations: int = 0
    migration_downtime_s: float = 0.0
    migration_records: list[MigrationRecord] = field(default_factory=list)  # every attempt, aborted ones too
    redispatches: int = 0
    attempts: list[RequestStats] = field(default_factory=list)
    dispatching: bool = False
    _max_pos: int = -1  # the highest output position seen: whoever sent it holds the request
    _out_of_order: dict[int, int] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return self.finish_s is not None or self.error is not None

    def notify(self) -> None:
        self._changed.set()

    async def wait_for_change(self, seen_tokens: int) -> None:
        """Return once more than ``seen_tokens`` tokens exist or the request is done."""
        while len(self.tokens) <= seen_tokens and not self.done:
            self._changed.clear()
            await self._changed.wait()

    def new_attempt(self, engine_id: int, instance_id: int) -> None:
        """A new engine request continues this one on ``instance_id`` (outputs numbered from the client's start)."""
        self.engine_id, self.owner = engine_id, instance_id
        self._out_of_order.clear()
        self._max_pos = len(self.tokens) - 1
        self.instances.append(instance_id)

    def add_token(self, instance_id: int, position: int, token: int, now: float) -> bool:
        """Token ``position`` of the output arrived from ``instance_id``; True once the output is complete."""
        if position < len(self.tokens):
            return False
        self._out_of_order[position] = token
        if position > self._max_pos:
            self._max_pos, self.owner = position, instance_id
        while len(self.tokens) in self._out_of_order and not self.stopped:
            self.tokens.append(self._out_of_order.pop(len(self.tokens)))
            self.stopped = self.tokens[-1] in self.stop_token_ids
        if self.first_token_s is None and self.tokens:
            self.first_token_s = now
        if len(self.tokens) >= self.max_tokens or self.stopped:
            del self.tokens[self.max_tokens :]
            return True
        self._changed.set()
        return False

    def cut(self, num_tokens: int) -> None:
        """Its client is done with it after ``num_tokens`` tokens (a stop string ended its text): keep those only."""
        del self.tokens[num_tokens:]
        self.stopped = True

    def migration_ended(self, record: MigrationRecord) -> None:
        self.migration_records.append(record)
        if record.committed:
            self.owner = record.dst
            self.migrations += 1
            self.migration_downtime_s += record.downtime_s
            self.instances.append(record.dst)

    def summary(self) -> dict[str, Any]:
        """The ``llumnix`` extension block of a completion response (engine timelines on the instances' clocks)."""
        return {
            "instances": list(self.instances),
            "migrations": self.migrations,
            "migration_downtime_s": self.migration_downtime_s,
            "redispatches": self.redispatches,
            "preemptions": sum(len(a.preemptions_s) for a in self.attempts),
            "preemptions_s": [t for a in self.attempts for t in a.preemptions_s],
            "migration_records": [asdict(m) for m in self.migration_records],
            "prefill_ends_s": [t for a in self.attempts for t in a.prefill_ends_s],
            "dispatch_s": next((a.dispatch_s for a in self.attempts if a.dispatch_s is not None), None),
            "arrival_s": self.arrival_s,
            "first_token_s": self.first_token_s,
            "finish_s": self.finish_s,
        }
