"""The messages of the migration handshake, between a source's ``Migration`` and the runtime that executes it.

``Migration`` (the source side, ``llumnix.core.migration``) says what it needs next: an *action*. The runtime executes
it (on the destination's ``Llumlet`` in the simulator, over an actor call and a KV transport on a real cluster) and
tells the migration what happened: a *result*. Nothing here does I/O.

Actions: ``PreAlloc`` (reserve blocks on the destination for the next stage), ``Copy`` (move a stage's KV blocks;
``final`` is the stop-and-copy stage, the request frozen on the source), ``Commit`` (the destination adopts the
request), ``Abort`` (free what the destination pre-allocated; the request keeps running on the source).
Results: ``PreAllocated`` / ``Refused`` answer a PreAlloc, ``Copied`` / ``Failed`` a Copy, ``Committed`` / ``Failed`` a
Commit. An Abort needs no answer: the migration has ended.
"""

from __future__ import annotations

from dataclasses import dataclass

from llumnix.core.request import Request


@dataclass(frozen=True)
class PreAlloc:
    migration_id: int
    dst: int
    num_blocks: int


@dataclass(frozen=True)
class Copy:
    """Copy ``src_blocks`` (the source's block ids, in the request's order) into ``dst_blocks`` (pre-allocated).

    A non-final copy overlaps the source's decode steps; its result must be delivered at a source step boundary
    (the next stage begins then and may freeze the request). A final copy's result may come at any time."""

    migration_id: int
    dst: int
    stage: int
    src_blocks: tuple[int, ...]
    dst_blocks: tuple[int, ...]
    final: bool
    request_id: int = -1


@dataclass(frozen=True)
class Commit:
    migration_id: int
    dst: int
    request: Request


@dataclass(frozen=True)
class Abort:
    migration_id: int
    dst: int
    reason: str


Action = PreAlloc | Copy | Commit | Abort


@dataclass(frozen=True)
class PreAllocated:
    block_ids: list[int]


@dataclass(frozen=True)
class Refused:
    reason: str


@dataclass(frozen=True)
class Copied:
    num_bytes: int = 0


@dataclass(frozen=True)
class Committed:
    pass


@dataclass(frozen=True)
class Failed:
    reason: str


Result = PreAllocated | Refused | Copied | Committed | Failed
