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

    @abstractmethod
    def start(self, copy: Copy) -> PendingCopy:
        """Begin moving ``copy.src_blocks`` of this instance into ``copy.dst_blocks`` of instance ``copy.dst``."""

    def synchronize(self) -> None:
        """Return once every copy started so far has landed (synchronous drivers)."""
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


class PoolTransfer(KVTransfer):
    """Copies KV blocks from one paged pool to another of the same geometry, in this process.

    On CUDA the copy is issued on a side stream (after the work already queued on the current stream, so the source's
    last writes land first) and returns at once; the pending copy polls its CUDA event, so decode steps on the default
    stream overlap it. ``host`` stages the payload through a reused pinned host buffer (the PCIe legs of a cross-GPU
    migration). On CPU the copy is synchronous.
    """

    def __init__(self, src, destinations: Mapping[int, Any], mode: str = "device", chunk_blocks: int = 32) -> None:
        import torch

        if mode not in POOL_MODES:
            raise ValueError(f"transport must be one of {POOL_MODES}, got {mode!r}")
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
        # The host path moves this many blocks per device->host->device leg, so the decode steps' own small copies
        # queue behind one chunk, not behind the whole request's KV.
        self.chunk_blocks = chunk_blocks
        self._staging = None  # flat pinned host buffer, grown on demand

    def start(self, copy: Copy) -> PendingCopy:
        check_copy(copy)
        src_blocks, dst_blocks = list(copy.src_blocks), list(copy.dst_blocks)
        if not src_blocks:
            return PendingCopy(0)
        dst = self.destinations[copy.dst]
        num_bytes = self.src.bytes_per_block * len(src_blocks)
        if not self.cuda:
            dst.write_blocks(dst_blocks, self.src.read_blocks(src_blocks))
            return PendingCopy(num_bytes)
        torch = self.torch
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            src_idx = torch.tensor(src_blocks, dtype=torch.long, device=self.device)
            dst_idx = torch.tensor(dst_blocks, dtype=torch.long, device=self.device)
            if self.mode == "device":
                dst.cache.index_copy_(2, dst_idx, self.src.cache.index_select(2, src_idx))
            else:
                per_block = self.src.cache[:, :, 0].numel()
                staging = self._staging_flat(len(src_blocks) * per_block)
                for a in range(0, len(src_blocks), self.chunk_blocks):
                    b = min(len(src_blocks), a + self.chunk_blocks)
                    payload = self.src.cache.index_select(2, src_idx[a:b])
                    host = staging[a * per_block : b * per_block].view(payload.shape)
                    host.copy_(payload, non_blocking=True)
                    dst.cache.index_copy_(2, dst_idx[a:b], host.to(self.device, non_blocking=True))
            done = torch.cuda.Event()
            done.record(self.stream)
        return PendingCopy(num_bytes, done.query, done.synchronize)

    def _staging_flat(self, numel: int):
        if self._staging is None or self._staging.numel() < numel:
            self._staging = None
            self._staging = self.torch.empty(numel, dtype=self.src.dtype, pin_memory=True)
        return self._staging

    def synchronize(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
