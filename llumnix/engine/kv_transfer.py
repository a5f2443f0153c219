"""How a migration stage's KV blocks travel from the source instance to the destination: one interface for every
runtime. A ``KVTransfer`` belongs to the source; ``start(copy)`` takes a ``Copy`` action of the source's
``Migration`` (the source's block ids, the destination's pre-allocated ids, the destination's instance id), begins
moving the blocks and returns a ``PendingCopy`` at once, so the source can keep decoding while it travels. The
pending copy answers ``done()`` (poll, for a synchronous driver) and ``await wait()`` (for an asyncio driver), which
returns the bytes moved or raises if the copy failed.

Implementations: in one process (this module) ``ExecutorTransfer`` (read from one executor, write to the other,
synchronously) and ``PoolTransfer`` (between two paged KV pools on a side CUDA stream, or staged through pinned host
memory); across processes ``llumnix.bench.migration.ChannelTransfer`` (a child process's pool, for Fig 10) and, between
Ray instance actors, ``llumnix.runtime.kv_transport`` (Ray's object store, or a gloo / NCCL channel).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

from llumnix.core.migration_protocol import Copy


class PendingCopy:
    """One stage's copy in flight. ``poll`` says when it has landed; ``wait_sync`` blocks until then."""

    def __init__(self, num_bytes: int, poll: Callable[[], bool] | None = None,
                 wait_sync: Callable[[], None] | None = None) -> None:
        self.num_bytes = num_bytes
        self._poll = poll
        self._wait_sync = wait_sync

    def done(self) -> bool:
        return self._poll is None or self._poll()

    async def wait(self) -> int:
        if not self.done() and self._wait_sync is not None:
            await asyncio.to_thread(self._wait_sync)
        return self.num_bytes


class TaskCopy(PendingCopy):
    """A copy carried out by an asyncio task (actor calls, channel transfers) that returns the bytes moved."""

    def __init__(self, task: asyncio.Task) -> None:
        super().__init__(0)
        self.task = task

    def done(self) -> bool:
        return self.task.done()

    async def wait(self) -> int:
        self.num_bytes = await self.task
        return self.num_bytes


class KVTransfer(ABC):
    name = "base"
    carries_commit = False  # start(copy, commit=request) hands the destination the final stage's COMMIT too

    @abstractmethod
    def start(self, copy: Copy) -> PendingCopy:
        """Begin moving ``copy.src_blocks`` of this instance into ``copy.dst_blocks`` of instance ``copy.dst``."""

    def synchronize(self) -> None:
        """Return once every copy started so far has landed (synchronous drivers)."""
        return None

    def stepped(self) -> None:
        """The source ended a decode step (an asynchronous driver's transfers may pace on it)."""
        return None

    def forget(self, peer_id: int) -> None:
        """``peer_id`` is gone: drop what this transfer holds for it."""
        return None

    def close(self) -> None:
        """The instance stops: release what the transfer holds."""
        return None


def check_copy(copy: Copy) -> None:
    if len(copy.src_blocks) != len(copy.dst_blocks):
        raise ValueError(f"{len(copy.src_blocks)} source blocks but {len(copy.dst_blocks)} destination blocks")


class ExecutorTransfer(KVTransfer):
    """Synchronous copies between executors of this process (``read_blocks`` here, ``write_blocks`` there)."""

    name = "in-process"

    def __init__(self, src: Any, destinations: Mapping[int, Any]) -> None:
        self.src, self.destinations = src, destinations

    def start(self, copy: Copy) -> PendingCopy:
        check_copy(copy)
        if not copy.src_blocks:
            return PendingCopy(0)
        data = self.src.read_blocks(list(copy.src_blocks))
        self.destinations[copy.dst].write_blocks(list(copy.dst_blocks), data)
        return PendingCopy(int(getattr(data, "nbytes", 0) or 0))


POOL_MODES = ("device", "host")
# Blocks a non-final stage copies per poll of its pending copy (a driver polls once per source decode step). Measured
# on one H200 (LLaMA-7B bf16, batch 1, 256-8k tokens; benchmarks/h200-migration-chunks.csv, the source's own decode
# steps during the bulk stage against the same request's steps unmigrated): -1.4..+0.8% with 16 blocks (128 MiB) per
# step, -1.1..+1.4% with 32, +0.3..+60% with the whole stage at once (the engine is bound by memory bandwidth, and so
# is the copy). 16 also kept an earlier sweep's stage wall time per step lowest (+2..+4%; 64 blocks: +7..+10%).
CHUNK_BLOCKS = 16


def block_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of the maximal runs where both block id lists advance by one together."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


class PoolTransfer(KVTransfer):
    """Copies KV blocks from one paged pool to another of the same geometry, in this process.

    On CUDA the copy is issued on a side stream (after the work already queued on the current stream, so the source's
    last writes land first) and returns at once. A non-final stage is paced: ``chunk_blocks`` blocks at a time, the
    next chunk issued when the pending copy is polled after the previous one landed, so a driver that polls once per
    decode step (``migrate_in_process``) copies one chunk beside each step instead of the whole stage at once, which
    would take the step's memory bandwidth (the engine is bound by it). The final stop-and-copy stage, and
    ``synchronize``, copy at full speed. Consecutive block ids are copied as slices (no gathered temporary); a
    fragmented table goes through ``index_select`` / ``index_copy_``. ``host`` stages each chunk through a reused
    pinned host buffer (the PCIe legs of a cross-GPU migration). On CPU each chunk is copied synchronously when
    issued (the same pacing, no overlap).
    """

    def __init__(self, src, destinations: Mapping[int, Any], mode: str = "device",
                 chunk_blocks: int | None = CHUNK_BLOCKS) -> None:
        import torch

        if mode not in POOL_MODES:
            raise ValueError(f"transport must be one of {POOL_MODES}, got {mode!r}")
        if chunk_blocks is not None and chunk_blocks < 1:
            raise ValueError(f"chunk_blocks must be >= 1 (or None: a stage in one go), got {chunk_blocks}")
        for dst in destinations.values():
            if src.cache.shape[:2] != dst.cache.shape[:2] or src.cache.shape[3:] != dst.cache.shape[3:]:
                raise ValueError(f"pools differ in geometry: {tuple(src.cache.shape)} vs {tuple(dst.cache.shape)}")
        self.src, self.destinations, self.mode, self.name = src, destinations, mode, mode
        self.torch = torch
        self.device = src.device
        self.cuda = self.device.type == "cuda"
        if mode == "host" and not self.cuda:
            raise ValueError("the host transport needs a CUDA device")
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.chunk_blocks = chunk_blocks
        self._staging = None  # flat pinned host buffer, grown on demand
        self._active: list[PacedCopy] = []

    def start(self, copy: Copy) -> PendingCopy:
        check_copy(copy)
        src_blocks, dst_blocks = list(copy.src_blocks), list(copy.dst_blocks)
        if not src_blocks:
            return PendingCopy(0)
        dst = self.destinations[copy.dst]
        num_bytes = self.src.bytes_per_block * len(src_blocks)
        if self.cuda:
            self.stream.wait_stream(self.torch.cuda.current_stream(self.device))
        pending = PacedCopy(num_bytes, src_blocks, dst_blocks, chunk_of(copy, self.chunk_blocks),
                            lambda s, d: self._copy_chunk(dst, s, d))
        self._active = [p for p in self._active if not p.issued_all] + [pending]
        return pending

    def _copy_chunk(self, dst, src_blocks: list[int], dst_blocks: list[int]):
        """Issue the copy of these blocks on the side stream; returns the CUDA event that marks it landed (on CPU:
        copied at once, an event already passed)."""
        torch = self.torch
        if not self.cuda:
            _copy_runs(dst.cache, self.src.cache, block_runs(src_blocks, dst_blocks))
            return _LANDED
        with torch.cuda.stream(self.stream):
            if self.mode == "device":
                runs = block_runs(src_blocks, dst_blocks)
                if len(runs) * 4 <= len(src_blocks):  # mostly contiguous: slices, no gathered temporary
                    _copy_runs(dst.cache, self.src.cache, runs)
                else:
                    src_idx = torch.tensor(src_blocks, dtype=torch.long, device=self.device)
                    dst_idx = torch.tensor(dst_blocks, dtype=torch.long, device=self.device)
                    dst.cache.index_copy_(2, dst_idx, self.src.cache.index_select(2, src_idx))
            else:
                src_idx = torch.tensor(src_blocks, dtype=torch.long, device=self.device)
                dst_idx = torch.tensor(dst_blocks, dtype=torch.long, device=self.device)
                payload = self.src.cache.index_select(2, src_idx)
                host = self._staging_flat(payload.numel())[: payload.numel()].view(payload.shape)
                host.copy_(payload, non_blocking=True)
                dst.cache.index_copy_(2, dst_idx, host.to(self.device, non_blocking=True))
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def _staging_flat(self, numel: int):
        if self._staging is None or self._staging.numel() < numel:
            self._staging = None
            self._staging = self.torch.empty(numel, dtype=self.src.dtype, pin_memory=True)
        return self._staging

    def synchronize(self) -> None:
        for pending in self._active:
            pending.drain()
        self._active = []
        if self.cuda:
            self.torch.cuda.synchronize(self.device)


def _copy_runs(dst_cache, src_cache, runs: list[tuple[int, int, int]]) -> None:
    """Copy block runs (src start, dst start, length) between two pools' caches ([layer, k|v, block, ...])."""
    for s, d, n in runs:
        dst_cache[:, :, d : d + n].copy_(src_cache[:, :, s : s + n], non_blocking=True)


def chunk_of(copy: Copy, chunk_blocks: int | None) -> int:
    """Blocks per chunk of this stage: the stop-and-copy (or no pacing) in one go, else ``chunk_blocks``."""
    return len(copy.src_blocks) if copy.final or chunk_blocks is None else chunk_blocks


class PacedCopy(PendingCopy):
    """A stage's copy issued ``chunk`` blocks at a time: the first at once, each next one when polled after the
    previous landed; one chunk in flight at a time. ``issue(src_blocks, dst_blocks)`` starts one chunk's copy and
    returns what tells it landed (``query()``, ``synchronize()``: a CUDA event, or ``Polled``)."""

    def __init__(self, num_bytes: int, src_blocks: list[int], dst_blocks: list[int], chunk: int,
                 issue: Callable[[list[int], list[int]], Any]) -> None:
        super().__init__(num_bytes, self._poll_chunks, self.drain)
        self.src_blocks, self.dst_blocks, self.chunk, self.issue = src_blocks, dst_blocks, chunk, issue
        self.next = 0
        self.event = None
        self._issue()

    @property
    def issued_all(self) -> bool:
        return self.next >= len(self.src_blocks)

    def _issue(self) -> None:
        a, b = self.next, min(len(self.src_blocks), self.next + self.chunk)
        self.event = self.issue(self.src_blocks[a:b], self.dst_blocks[a:b])
        self.next = b

    def _poll_chunks(self) -> bool:
        if not self.event.query():
            return False
        if self.issued_all:
            return True
        self._issue()
        return False

    def drain(self) -> None:
        """Issue every chunk left, back to back, and wait for the last."""
        while not self.issued_all:
            self.event.synchronize()
            self._issue()
        self.event.synchronize()


class Polled:
    """A chunk's landing told by a poll (True once landed) and a wait (``synchronize``)."""

    def __init__(self, poll: Callable[[], bool], wait: Callable[[], None]) -> None:
        self.query, self.synchronize = poll, wait


_LANDED = Polled(lambda: True, lambda: None)  # a chunk copied synchronously (CPU)
