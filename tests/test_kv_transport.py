"""The Ray KV transports' pacing (``llumnix.runtime.kv_transport.RayTransport``), without Ray: a non-final stage
is read and sent a chunk at a time, each chunk read only once the previous one has been written; the stop-and-copy
stage is read in ``start`` and sent whole; a modelled engine's stage is one call. The Ray cluster's migration tests
run the real transports (object store, gloo) with chunks."""

from __future__ import annotations

import asyncio

import pytest

from llumnix.core.migration_protocol import Copy
from llumnix.runtime.kv_transport import RayTransport


class Recorder:
    """A source executor and the transport's sends, in one event log."""

    def __init__(self, moves_kv: bool = True) -> None:
        self.moves_kv, self.events = moves_kv, []

    def read_blocks(self, block_ids: list[int]) -> list[int]:
        self.events.append(("read", tuple(block_ids)))
        return list(block_ids)

    def copy_time_s(self, num_blocks: int) -> float:
        return 0.0


class RecordingTransport(RayTransport):
    async def send(self, dst_actor, dst_id, migration_id, dst_blocks, data) -> int:
        await asyncio.sleep(0)  # a round trip: the caller's loop runs meanwhile
        self.executor.events.append(("sent", tuple(dst_blocks), tuple(data)))
        return 10 * len(dst_blocks)


def run_copy(copy: Copy, executor: Recorder, chunk_blocks: int | None) -> tuple[list, list, int]:
    """The events up to ``start``'s return, all events, and the bytes the copy reports."""

    async def go():
        transport = RecordingTransport(executor, {copy.dst: object()}, chunk_blocks)
        pending = transport.start(copy)
        at_start = list(executor.events)
        return at_start, await pending.wait()

    at_start, moved = asyncio.run(go())
    return at_start, executor.events, moved


def test_a_non_final_stage_goes_a_chunk_at_a_time_each_read_after_the_last_was_written():
    copy = Copy(7, 1, 0, (0, 1, 2, 3, 4), (10, 11, 12, 13, 14), final=False)
    at_start, events, moved = run_copy(copy, Recorder(), chunk_blocks=2)
    assert at_start == [("read", (0, 1))]
    assert events == [("read", (0, 1)), ("sent", (10, 11), (0, 1)), ("read", (2, 3)), ("sent", (12, 13), (2, 3)),
                      ("read", (4,)), ("sent", (14,), (4,))]
    assert moved == 50


@pytest.mark.parametrize(("final", "moves_kv", "chunk_blocks"), [(True, True, 2), (False, False, 2),
                                                                 (False, True, None)],
                         ids=["stop-and-copy", "modelled-engine", "unpaced"])
def test_a_stage_in_one_send(final, moves_kv, chunk_blocks):
    copy = Copy(7, 1, 1, (0, 1, 2), (10, 11, 12), final=final)
    at_start, events, moved = run_copy(copy, Recorder(moves_kv), chunk_blocks)
    assert at_start == [("read", (0, 1, 2))]  # the whole stage read at once (the final one: while suspended)
    assert events == [("read", (0, 1, 2)), ("sent", (10, 11, 12), (0, 1, 2))]
    assert moved == 30


def test_an_empty_stage_and_a_bad_chunk_size():
    for final, moves_kv in ((False, True), (True, True), (False, False)):  # nothing read, nothing sent
        assert run_copy(Copy(7, 1, 0, (), (), final=final), Recorder(moves_kv), 2)[1:] == ([], 0)
    with pytest.raises(ValueError, match="chunk_blocks must be >= 1"):
        RecordingTransport(Recorder(), {}, 0)
