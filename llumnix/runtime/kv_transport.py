"""How a migration stage's KV blocks travel from the source instance actor to the destination actor: the
``llumnix.engine.kv_transfer.KVTransfer`` interface over Ray.

``start(copy)`` sends the stage's blocks in an asyncio task; the pending copy completes once the destination has
written them into its pre-allocated blocks (``executor.write_blocks``). A non-final stage goes ``chunk_blocks`` blocks
at a time, each chunk read from the source's executor (``read_blocks``) when the previous one has been written, so the
source's steps run between the chunks instead of behind one copy of the whole stage (as the engine's paced
``kv_transfer.PoolTransfer``; the KV of those blocks no longer changes). The stop-and-copy stage is read at once, in
``start``, while the request is suspended, and sent whole. Paced (``TransportSpec.paced``), a non-final stage sends
at most one chunk per source step, as the engine bench paces it (the source's step loop calls ``stepped()`` after each
step); unpaced, the chunks go back to back. Copies from a GPU to the host (``pack``) run off the event loop.
Destinations are other instance actors, looked up by id in ``peers``. A profile executor moves no bytes: its copy
takes the time the profile gives a migration stage (``Executor.copy_time_s``), in one call. One small class per
transport:

- ``ObjectStoreTransport`` (``object-store``): the blocks, ``pack``ed as numpy, go through Ray's object store to the
  destination actor's ``mig_write`` (zero-copy reads on the destination's host).
- ``TorchDistTransport`` (``gloo`` / ``nccl``): a ``DistChannel`` per (source, destination) pair, opened on the first
  migration between the two (the source asks the destination to join over Ray: ``kv_accept``, both sides joining at
  once) and dropped when a transfer over it fails; a stage's blocks cross the channel while the destination's
  ``kv_recv`` receives them into a buffer and writes them. Ray carries only the control messages. On a GPU the
  reads, sends, receives and writes go on a CUDA stream of their own (``TorchDistTransport.kv_stream``), not behind
  the decode step in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from llumnix.core.migration_protocol import Copy
from llumnix.engine.kv_transfer import CHUNK_BLOCKS, KVTransfer, PendingCopy, TaskCopy, check_copy, chunk_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVPayload:
    """A stage's KV data as plain numpy (``dtype`` is the torch dtype name; bfloat16 travels as its int16 bits)."""

    array: np.ndarray | None
    dtype: str
    num_blocks: int

    @property
    def nbytes(self) -> int:
        return 0 if self.array is None else int(self.array.nbytes)


def pack(data: Any, num_blocks: int) -> KVPayload:
    """Turn what ``Executor.read_blocks`` returned into a payload (torch tensors become host numpy arrays)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency; the profile backend does not need it
        torch = None
    if torch is not None and isinstance(data, torch.Tensor):
        dtype = str(data.dtype).removeprefix("torch.")
        tensor = data.detach().to("cpu")
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the bits
            tensor = tensor.view(torch.int16)
        return KVPayload(tensor.contiguous().numpy(), dtype, num_blocks)
    if isinstance(data, np.ndarray):
        return KVPayload(data, str(data.dtype), num_blocks)
    return KVPayload(None, "none", num_blocks)  # the profile executor moves no data


def unpack(payload: KVPayload) -> Any:
    """The inverse of ``pack``: what ``Executor.write_blocks`` accepts."""
    if payload.array is None:
        return payload.num_blocks
    import torch

    with warnings.catch_warnings():  # object-store arrays are read-only; write_blocks only reads them
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(np.ascontiguousarray(payload.array))
    if payload.dtype == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    return tensor


# Paced, a non-final stage sends at most one chunk per source step; by default the chunks go back to back. Serving
# over NCCL on 2 x H200 (benchmarks/gpu_serve_migration.sh, 8 background requests, 3 migrations a length; per length
# the mean of 3 migrations, six paced runs against three back to back): paced, the source's step itself is shorter
# (+4..+7% at 7680 tokens against +9..+10%; +6..+9% at 2048 against +10..+13%), but the chunks' host work moves to
# the step boundaries and the step-to-step interval, the source's token rate, is longer (+14..+17% at 7680 against
# +9..+10%; +19..+24% at 2048 against +11..+16%), over a bulk stage twice as long.
PACED = False


@dataclass(frozen=True)
class TransportSpec:
    """What every instance of a cluster needs to build its transport (all use the same one)."""

    name: str = "object-store"
    store_address: str | None = None  # gloo / nccl: the TCPStore (host:port) their channels rendezvous on
    timeout_s: float = 60.0  # gloo / nccl: opening a channel, or one stage's transfer, fails after this long
    listen_host: str | None = None  # gloo: the address channels listen on (None: each instance's node address)
    chunk_blocks: int | None = CHUNK_BLOCKS  # blocks per send of a non-final stage (None: a stage in one send)
    paced: bool = PACED  # a non-final stage sends at most one chunk per source step (else back to back)


# Paced, the longest a bulk stage's next chunk waits for the source's next step (a source that stops stepping, its
# other requests done or preempted, does not hold the migration up longer)
PACE_WAIT_S = 0.05


class StepTicks:
    """The source's steps, counted, for a paced bulk stage: ``tick()`` after each step; ``await after(n)`` returns
    once more than ``n`` have ended (or after ``bound_s``)."""

    def __init__(self, bound_s: float = PACE_WAIT_S) -> None:
        self.count, self.bound_s = 0, bound_s
        self._next: asyncio.Event | None = None

    def tick(self) -> None:
        self.count += 1
        if self._next is not None:
            self._next.set()
            self._next = None

    async def after(self, n: int) -> None:
        if self.count > n:
            return
        if self._next is None:
            self._next = asyncio.Event()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._next.wait(), self.bound_s)


class CommitCopy(TaskCopy):
    """A stage's copy over Ray. ``commit``, once it has landed: the destination's answer (``Committed`` / ``Failed``)
    to a COMMIT the copy carried (``RayTransport.start(copy, commit=...)``); None if it carried none, or made no call
    to carry it in (a stage of no blocks)."""

    commit: Any = None

    async def wait(self) -> int:
        self.num_bytes, self.commit = await self.task
        return self.num_bytes


class RayTransport(KVTransfer):
    """What the Ray transports share: the source's executor, the peers by id, the asyncio task per copy.

    ``start(copy, commit=request)`` on the final stage hands the destination the COMMIT the protocol sends once that
    copy has landed (``Migration``: a final ``Copied`` is always answered by ``Commit``), in the same call: the
    destination adopts the request right after writing the blocks (``InstanceActor.kv_recv`` / ``mig_write``), which
    saves the stop-and-copy a Ray round trip. The source's ``Migration`` still steps through COPIED and COMMIT; its
    runtime answers the COMMIT with what came back (``CommitCopy.commit``)."""

    carries_commit = True

    def __init__(self, executor: Any, peers: Mapping[int, Any], chunk_blocks: int | None = CHUNK_BLOCKS,
                 paced: bool = PACED) -> None:
        if chunk_blocks is not None and chunk_blocks < 1:
            raise ValueError(f"chunk_blocks must be >= 1 (or None: a stage in one send), got {chunk_blocks}")
        self.executor, self.peers, self.chunk_blocks = executor, peers, chunk_blocks
        self.ticks = StepTicks() if paced else None

    def stepped(self) -> None:
        """The source ended a step (paced: a bulk stage's next chunk may go)."""
        if self.ticks is not None:
            self.ticks.tick()

    def start(self, copy: Copy, commit: Any = None) -> PendingCopy:
        """Begin the stage; ``commit`` (the request, final stage only): the destination commits it with the last
        chunk (``CommitCopy``)."""
        check_copy(copy)
        if commit is not None and not copy.final:
            raise ValueError("only the final stage's copy carries the commit")
        # a modelled engine moves no KV: its stage is one call, after the copy time its profile gives
        chunk = max(1, chunk_of(copy, self.chunk_blocks if self.executor.moves_kv else None))  # (1: an empty stage)
        first = self.read(list(copy.src_blocks[:chunk])) if copy.src_blocks else None
        delay_s = self.executor.copy_time_s(len(copy.src_blocks))
        return CommitCopy(asyncio.get_running_loop().create_task(self._send(copy, chunk, first, delay_s, commit)))

    async def _send(self, copy: Copy, chunk: int, data: Any, delay_s: float, commit: Any) -> tuple[int, Any]:
        """Send the stage ``chunk`` blocks at a time, one after another (``data``: the first chunk, read already);
        the last chunk carries ``commit``. The bytes moved, and the destination's answer to the commit."""
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        moved, answer = 0, None
        ticks = None if copy.final else self.ticks
        seen = ticks.count if ticks is not None else 0  # the steps ended when the first chunk was read
        for a in range(0, len(copy.src_blocks), chunk):
            if a:
                if ticks is not None:
                    await ticks.after(seen)
                    seen = ticks.count
                data = self.read(list(copy.src_blocks[a : a + chunk]))
            last = a + chunk >= len(copy.src_blocks)
            sent, answer = await self.send(self.peers[copy.dst], copy.dst, copy.migration_id,
                                           list(copy.dst_blocks[a : a + chunk]), data, commit if last else None)
            moved += sent
        return moved, answer

    def read(self, block_ids: list[int]) -> Any:
        """A chunk's data, from the source's executor."""
        return self.executor.read_blocks(block_ids)

    @abstractmethod
    async def send(self, dst_actor: Any, dst_id: int, migration_id: int, dst_blocks: list[int], data: Any,
                   commit: Any = None) -> tuple[int, Any]:
        """Deliver ``data`` (what ``read_blocks`` returned) into ``dst_blocks`` of the destination; return once it has
        been written there (and, given ``commit``, the request adopted): the bytes moved and the destination's answer
        (to the commit; else None)."""


class ObjectStoreTransport(RayTransport):
    """Put the payload in Ray's object store and pass its reference to the destination's ``mig_write``."""

    name = "object-store"

    async def send(self, dst_actor: Any, dst_id: int, migration_id: int, dst_blocks: list[int], data: Any,
                   commit: Any = None) -> tuple[int, Any]:
        if getattr(data, "is_cuda", False):  # a device-to-host copy: off the event loop
            payload = await asyncio.to_thread(pack, data, len(dst_blocks))
        else:  # host data (or none: a modelled engine's) packs at once, in the loop's own time
            payload = pack(data, len(dst_blocks))
        num_bytes = payload.nbytes
        if payload.array is not None:
            import ray

            payload = ray.put(payload)
        return num_bytes, await dst_actor.mig_write.remote(migration_id, dst_blocks, payload, commit)


class TorchDistTransport(RayTransport):
    """KV blocks over torch.distributed channels (gloo: through host memory; NCCL: GPU to GPU), one per peer and
    direction: this instance holds rank 0 of the channels it sends on and rank 1 of those it receives on."""

    def __init__(self, executor: Any, peers: Mapping[int, Any], backend: str, instance_id: int,
                 store_address: str | None, timeout_s: float = 60.0, hostname: str | None = None,
                 chunk_blocks: int | None = CHUNK_BLOCKS, paced: bool = PACED) -> None:
        from llumnix.runtime.dist_channel import BACKENDS

        super().__init__(executor, peers, chunk_blocks, paced)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not store_address:
            raise ValueError(f"the {backend} KV transport needs the address of a TCPStore (the cluster hosts one)")
        self.name, self.instance_id, self.store_address = backend, instance_id, store_address
        self.timeout_s, self.hostname = timeout_s, hostname
        self._out: dict[int, Any] = {}  # destination id -> DistChannel (rank 0)
        self._in: dict[int, Any] = {}  # source id -> DistChannel (rank 1)
        self._locks: dict[int, asyncio.Lock] = {}
        self._stream: Any = None  # the KV stream, made on first use on a GPU

    # -- the KV stream ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def kv_stream(self, after_engine: bool = False) -> Iterator[None]:
        """CUDA work issued inside (reads, sends, receives, writes of a migration's blocks) goes on this instance's KV
        stream, not the engine's, where it would wait for the decode step in flight: a chunk of the bulk stage, and
        the stop-and-copy, held up to a step on each side (measured: 15-17 ms of downtime, 2-3 steps). Elsewhere
        (CPU, a modelled engine) as is. ``after_engine``: first order the stream after the engine's work so far; a
        stage starts so, at a step boundary, after the steps that wrote its blocks (complete blocks, or a suspended
        request's: none of the later steps writes them)."""
        device = getattr(self.executor, "device", None)
        if device is None or device.type != "cuda":
            yield
            return
        import torch

        if self._stream is None:  # high priority: its kernels go before a running step's pending blocks
            self._stream = torch.cuda.Stream(device, priority=-1)
        if after_engine:
            self._stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._stream):
            yield

    def _on_kv_stream(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` with the KV stream current (for a worker thread: a thread has its own current stream)."""
        with self.kv_stream():
            return fn(*args)

    def start(self, copy: Copy, commit: Any = None) -> PendingCopy:
        """Begin the stage: called at a step boundary, so its first chunk is read after the steps that wrote it."""
        with self.kv_stream(after_engine=True):
            return super().start(copy, commit)

    def read(self, block_ids: list[int]) -> Any:
        with self.kv_stream():
            return super().read(block_ids)

    def write(self, dst_blocks: list[int], data: Any) -> None:
        """Write received blocks into the destination's pre-allocated ones, on the KV stream; the engine's work from
        now on (the step that adopts the request; or, after an abort, the steps of those blocks' next owners) waits
        for the write."""
        with self.kv_stream():
            self.executor.write_blocks(dst_blocks, data)
        if self._stream is not None:
            import torch

            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)

    # -- source side -----------------------------------------------------------------------------------------------
    async def send(self, dst_actor: Any, dst_id: int, migration_id: int, dst_blocks: list[int], data: Any,
                   commit: Any = None) -> tuple[int, Any]:
        import torch

        if not isinstance(data, torch.Tensor):  # the profile executor moves no data: only the call
            return await ObjectStoreTransport.send(self, dst_actor, dst_id, migration_id, dst_blocks, data, commit)
        async with self._locks.setdefault(dst_id, asyncio.Lock()):  # one transfer per channel at a time
            channel = self._out.get(dst_id) or await self._open(dst_actor, dst_id)
            dtype = str(data.dtype).removeprefix("torch.")
            sending = asyncio.ensure_future(asyncio.to_thread(self._on_kv_stream, channel.send, data))
            answering = asyncio.ensure_future(dst_actor.kv_recv.remote(
                self.instance_id, channel.key, migration_id, dst_blocks, tuple(data.shape), dtype, commit))
            both = {sending, answering}
            done, _ = await asyncio.wait(both, return_when=asyncio.FIRST_EXCEPTION)
            failed = next((t.exception() for t in done if t.exception() is not None), None)
            if failed is not None:  # at the first failure, on either side: closing the channel ends the other
                self._drop(self._out, dst_id, channel, f"transfer failed: {failed!r}")
                await asyncio.wait(both)
            # The destination's answer decides: it has the blocks once kv_recv returned (and, carrying the commit,
            # it has adopted the request: aborting now would leave it on both instances).
            answer = answering.result()
        return data.numel() * data.element_size(), answer

    async def _open(self, dst_actor: Any, dst_id: int) -> Any:
        from llumnix.runtime.dist_channel import ChannelError, pair_key

        key = pair_key(self.instance_id, dst_id)
        joined = dst_actor.kv_accept.remote(self.instance_id, key)
        try:
            channel, _ = await asyncio.gather(asyncio.to_thread(self._connect, key, 0), joined)
        except Exception as e:
            raise ChannelError(f"instance {self.instance_id}: no {self.name} channel to instance {dst_id}: {e}") from e
        self._out[dst_id] = channel
        log.info("instance %d: %s KV channel to instance %d open (%s)", self.instance_id, self.name, dst_id, key)
        return channel

    # -- destination side --------------------------------------------------------------------------------------------
    async def accept(self, src_id: int, key: str) -> None:
        """Join the channel ``key`` that ``src_id`` opens to this instance (replacing an older one from it)."""
        channel = await asyncio.to_thread(self._connect, key, 1)
        old = self._in.get(src_id)
        if old is not None:
            self._drop(self._in, src_id, old, "replaced by a new channel")
        self._in[src_id] = channel

    async def receive(self, src_id: int, key: str, shape: tuple[int, ...], dtype: str) -> Any:
        """The tensor ``src_id`` is sending over channel ``key`` (on the channel's device)."""
        from llumnix.runtime.dist_channel import ChannelError

        channel = self._in.get(src_id)
        if channel is None or channel.key != key:
            raise ChannelError(f"instance {self.instance_id}: no channel {key} from instance {src_id}")
        try:
            return await asyncio.to_thread(self._on_kv_stream, lambda: channel.recv(channel.empty(shape, dtype)))
        except BaseException as e:
            self._drop(self._in, src_id, channel, f"transfer failed: {e!r}")
            raise

    # -- both ----------------------------------------------------------------------------------------------------------
    def _connect(self, key: str, rank: int) -> Any:
        from llumnix.runtime.dist_channel import DistChannel

        return DistChannel.connect(self.store_address, key, rank, self.name, self.timeout_s, hostname=self.hostname,
                                   high_priority=True)

    @staticmethod
    def _drop(channels: dict[int, Any], peer: int, channel: Any, reason: str) -> None:
        if channels.get(peer) is channel:
            del channels[peer]
        channel.close(reason)

    def forget(self, peer_id: int) -> None:
        for channels in (self._out, self._in):
            channel = channels.get(peer_id)
            if channel is not None:
                self._drop(channels, peer_id, channel, f"instance {peer_id} is gone")

    def close(self) -> None:
        for channels in (self._out, self._in):
            for peer, channel in list(channels.items()):
                self._drop(channels, peer, channel, "instance stopping")


TRANSPORTS = ("object-store", "gloo", "nccl")


def make_transport(spec: TransportSpec | str, instance_id: int, executor: Any, peers: Mapping[int, Any],
                   hostname: str | None = None) -> RayTransport:
    """The transport ``spec`` names, for the source ``instance_id`` (``hostname``: the address gloo listens on)."""
    if isinstance(spec, str):
        spec = TransportSpec(spec)
    if spec.name == ObjectStoreTransport.name:
        return ObjectStoreTransport(executor, peers, spec.chunk_blocks, spec.paced)
    if spec.name in TRANSPORTS:
        return TorchDistTransport(executor, peers, spec.name, instance_id, spec.store_address, spec.timeout_s,
                                  hostname, spec.chunk_blocks, spec.paced)
    raise ValueError(f"unknown KV transport {spec.name!r}; choose one of {', '.join(TRANSPORTS)}")
