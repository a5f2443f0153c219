"""The Ray KV transports' pacing (``llumnix.runtime.kv_transport.RayTransport``), without Ray: a non-final stage
is read and sent a chunk at a time, each chunk read only once the previous one has been written; the stop-and-copy
stage is read in ``start`` and sent whole; a modelled engine's stage is one call. The Ray cluster's migration tests
run the real transports (object store, gloo) with chunks."""

from __future__ import annotations

import asyncio
import itertools

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
    async def send(self, dst_actor, dst_id, migration_id, dst_blocks, data, commit=None) -> tuple[int, object]:
        await asyncio.sleep(0)  # a round trip: the caller's loop runs meanwhile
        self.executor.events.append(("sent", tuple(dst_blocks), tuple(data)) + ((("commit", commit),) if commit else ()))
        return 10 * len(dst_blocks), (f"committed {commit}" if commit else None)


def run_copy(copy: Copy, executor: Recorder, chunk_blocks: int | None, commit=None) -> tuple[list, list, int]:
    """The events up to ``start``'s return, all events, and the bytes the copy reports (with ``commit``: and the
    destination's answer to it)."""

    async def go():
        transport = RecordingTransport(executor, {copy.dst: object()}, chunk_blocks, paced=False)
        pending = transport.start(copy, commit=commit) if commit else transport.start(copy)
        at_start = list(executor.events)
        moved = await pending.wait()
        return at_start, ((moved, pending.commit) if commit else moved)

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


def test_the_final_copy_carries_the_commit_in_its_last_send():
    """The stop-and-copy hands the destination the COMMIT that follows it (one call fewer); only there."""
    copy = Copy(7, 1, 2, (0, 1, 2), (10, 11, 12), final=True)
    _, events, (moved, answer) = run_copy(copy, Recorder(), chunk_blocks=2, commit="req-7")
    assert events == [("read", (0, 1, 2)), ("sent", (10, 11, 12), (0, 1, 2), ("commit", "req-7"))]
    assert moved == 30 and answer == "committed req-7"
    _, events, moved = run_copy(Copy(7, 1, 0, (0, 1), (10, 11), final=False), Recorder(), chunk_blocks=2)
    assert all(len(e) < 4 for e in events) and moved == 20  # a non-final stage carries none
    with pytest.raises(ValueError, match="only the final stage"):
        run_copy(Copy(7, 1, 0, (0,), (10,), final=False), Recorder(), chunk_blocks=2, commit="req-7")
    assert RayTransport.carries_commit


def run_paced(copy: Copy, steps: int, bound_s: float = 5.0) -> list:
    """A paced copy beside a source that ends ``steps`` steps, one per 3 rounds of the loop (then stops stepping)."""
    executor = Recorder()

    async def go():
        transport = RecordingTransport(executor, {copy.dst: object()}, 2, paced=True)
        transport.ticks.bound_s = bound_s

        async def step_loop():
            for _ in range(steps):
                for _ in range(3):
                    await asyncio.sleep(0)
                executor.events.append(("step",))
                transport.stepped()

        stepping = asyncio.ensure_future(step_loop())
        await transport.start(copy).wait()
        await stepping

    asyncio.run(go())
    return executor.events


def test_a_paced_stage_sends_at_most_one_chunk_per_source_step():
    events = run_paced(Copy(7, 1, 0, tuple(range(7)), tuple(range(10, 17)), final=False), steps=10)
    sends = [e for e in events if e[0] in ("read", "step")]
    between = [sum(e == ("step",) for e in gap) for gap in _gaps(sends)]
    assert [e[1] for e in events if e[0] == "read"] == [(0, 1), (2, 3), (4, 5), (6,)]
    assert all(n >= 1 for n in between), events  # a step ended between any two chunks' reads
    assert RecordingTransport(Recorder(), {}, 2).ticks is None  # unpaced (the default): the chunks go back to back


def _gaps(events: list) -> list[list]:
    """The events between consecutive reads."""
    reads = [i for i, e in enumerate(events) if e[0] == "read"]
    return [events[a + 1 : b] for a, b in itertools.pairwise(reads)]


def test_pacing_holds_neither_the_stop_and_copy_nor_a_source_that_stopped_stepping():
    final = run_paced(Copy(7, 1, 2, tuple(range(5)), tuple(range(10, 15)), final=True), steps=0)
    assert final[0] == ("read", (0, 1, 2, 3, 4)) and len(final) == 2  # whole, at once, no step needed
    stalled = run_paced(Copy(7, 1, 0, tuple(range(6)), tuple(range(10, 16)), final=False), steps=0, bound_s=0.01)
    assert [e[0] for e in stalled] == ["read", "sent"] * 3  # each chunk waited the bound, then went
