"""A point-to-point torch.distributed channel between two processes: the wire under cross-process KV migration.

Each channel is its own two-rank process group (gloo: CPU tensors; NCCL: CUDA tensors) built directly on a key of a
shared ``TCPStore``, never through the default process group, so one process can hold channels to many peers and
open or drop them at any time. Both ranks must ``DistChannel.connect`` concurrently with the same key; a fresh key
per connection (``pair_key``) keeps a re-opened channel apart from a broken one. Tensors travel as their raw bytes,
so any dtype (bfloat16 included) goes through either backend; the receiver allocates the buffer (``empty``) from a
shape and dtype it was told. A transfer that fails or outlives the channel's timeout raises ``ChannelError`` and
breaks the channel (a timed-out pair is in an unknown state): open a new one.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")
_HANDSHAKE = 16  # bytes rank 0 sends rank 1 on connect: both ends are up (and NCCL has built its communicator)
_POLL_S = 20e-6  # sleep between completion checks while blocking on an NCCL transfer


class ChannelError(RuntimeError):
    """A channel could not be opened, or a transfer over it failed or timed out; the channel is closed."""


@dataclass
class StoreServer:
    """A ``TCPStore`` that listens on one address only, and the socket it listens on (keep both alive)."""

    store: dist.TCPStore
    sock: socket.socket

    def close(self) -> None:
        self.sock.close()


def serve_store(host: str = "127.0.0.1", port: int = 0) -> tuple[StoreServer, str]:
    """Host a ``TCPStore`` for channels to rendezvous on; return it (keep it alive) and its ``host:port`` address.

    The store listens on ``host`` alone (torch's own server would listen on every interface, where anyone who reaches
    the port could read and write the rendezvous keys): loopback for a cluster on one host, the node's address
    otherwise."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(128)
    bound = sock.getsockname()[1]
    store = dist.TCPStore(host, bound, is_master=True, wait_for_workers=False, master_listen_fd=sock.fileno())
    return StoreServer(store, sock), f"{host}:{bound}"


_keys = itertools.count()


def pair_key(src: object, dst: object) -> str:
    """A store key no other channel of this process uses (a new one per connection attempt)."""
    return f"channel/{src}->{dst}/{time.time_ns()}-{next(_keys)}"


def _timeout(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


@dataclass
class Transfer:
    """One send or receive in flight; ``tensor`` is its data (the buffer, for a receive). Its end is known only by
    waiting (gloo marks a send or receive complete only in ``wait``): learn from the peer that it has landed.
    Waiting again for a completed transfer returns at once (gloo's own wait, called twice, waits for another)."""

    channel: DistChannel
    work: Any
    tensor: torch.Tensor
    op: str
    completed: bool = field(default=False, init=False)

    def wait(self) -> torch.Tensor:
        """Block until the transfer has completed, at most the channel's timeout; return ``tensor``."""
        ch = self.channel
        if self.completed:
            return self.tensor
        try:
            if ch.backend == "gloo":
                self.work.wait(_timeout(ch.timeout_s))
            else:  # NCCL's own wait(timeout) polls at a millisecond: check more often, then order the stream
                deadline = time.monotonic() + ch.timeout_s
                while not self.work.is_completed():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"not completed within {ch.timeout_s:g} s")
                    time.sleep(_POLL_S)
                self.work.wait()
        except Exception as e:
            raise ch.fail(self.op, e) from e
        self.completed = True
        return self.tensor

    def wait_ordered(self) -> torch.Tensor:
        """Make work queued after this call see the transfer's data: with NCCL the current CUDA stream waits for it
        and the CPU does not; with gloo (CPU tensors) this is ``wait``."""
        if self.channel.backend == "gloo" or self.completed:
            return self.wait()
        try:
            self.work.wait()
        except Exception as e:
            raise self.channel.fail(self.op, e) from e
        return self.tensor


class DistChannel:
    """Rank 0 and rank 1 of a two-process group; either rank may send, one transfer per direction at a time."""

    def __init__(self, backend: str, rank: int, group: Any, device: torch.device, timeout_s: float, key: str) -> None:
        self.backend, self.rank, self.group, self.device = backend, rank, group, device
        self.timeout_s, self.key = timeout_s, key
        self.peer = 1 - rank
        self.broken: str | None = None

    @classmethod
    def connect(
        cls,
        store_address: str,
        key: str,
        rank: int,
        backend: str = "gloo",
        timeout_s: float = 60.0,
        device: torch.device | str | None = None,
        hostname: str | None = None,
        high_priority: bool = False,
    ) -> DistChannel:
        """Join the channel ``key`` on the store at ``store_address`` as ``rank`` (0 or 1); returns once the peer has
        joined too (or raises ``ChannelError`` after ``timeout_s``). ``device``: the CUDA device of an NCCL channel
        (default: the current one). ``hostname``: the address gloo listens on (default: this host's name).
        ``high_priority``: NCCL's kernels on high-priority streams, so that the GPU schedules them before the
        pending blocks of a decode step running meanwhile (at normal priority a small transfer waited for the
        step's end on either side: traced, 3-5 ms of a serving migration's stop-and-copy)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if rank not in (0, 1):
            raise ValueError(f"a channel has ranks 0 and 1, got {rank}")
        host, _, port = store_address.rpartition(":")
        try:
            client = dist.TCPStore(host, int(port), is_master=False, timeout=_timeout(timeout_s))
            store = dist.PrefixStore(key, client)
            if backend == "gloo":
                dev = torch.device("cpu")
                opts = dist.ProcessGroupGloo._Options()
                opts._timeout = _timeout(timeout_s)
                gloo_dev = dist.ProcessGroupGloo.create_device(hostname=hostname) if hostname else \
                    dist.ProcessGroupGloo.create_default_device()
                opts._devices = [gloo_dev]
                group = dist.ProcessGroupGloo(store, rank, 2, opts)
            else:
                dev = _cuda_device(device)
                torch.cuda.set_device(dev)
                opts = dist.ProcessGroupNCCL.Options()
                # Our own wait() times out first and aborts the group, before NCCL's watchdog would act.
                opts._timeout = _timeout(2 * timeout_s)
                opts.is_high_priority_stream = high_priority
                group = dist.ProcessGroupNCCL(store, rank, 2, opts)
        except Exception as e:
            raise ChannelError(f"channel {key}: rank {rank} could not join over {backend} at {store_address}: {e}") from e
        channel = cls(backend, rank, group, dev, timeout_s, key)
        token = torch.zeros(_HANDSHAKE, dtype=torch.uint8, device=dev)
        (channel.isend(token) if rank == 0 else channel.irecv(token)).wait()
        log.debug("channel %s: rank %d connected over %s", key, rank, backend)
        return channel

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype | str) -> torch.Tensor:
        """A receive buffer on this channel's device."""
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        return torch.empty(shape, dtype=dtype, device=self.device)

    def isend(self, tensor: torch.Tensor) -> Transfer:
        """Start sending ``tensor`` (copied to this channel's device if it lives elsewhere) to the peer."""
        data = tensor.detach().to(self.device).contiguous()
        return self._start("send", data, lambda t: self.group.send([t], self.peer, 0))

    def irecv(self, buffer: torch.Tensor) -> Transfer:
        """Start receiving into ``buffer`` (contiguous, on this channel's device, of the sent tensor's size)."""
        if buffer.device != self.device or not buffer.is_contiguous():
            raise ValueError(f"channel {self.key}: receive buffers must be contiguous on {self.device}")
        return self._start("recv", buffer, lambda t: self.group.recv([t], self.peer, 0))

    def send(self, tensor: torch.Tensor) -> None:
        self.isend(tensor).wait()

    def recv(self, buffer: torch.Tensor) -> torch.Tensor:
        return self.irecv(buffer).wait()

    def _start(self, op: str, tensor: torch.Tensor, post) -> Transfer:
        if self.broken:
            raise ChannelError(f"channel {self.key} is closed: {self.broken}")
        try:
            work = post(_as_bytes(tensor))
        except Exception as e:
            raise self.fail(op, e) from e
        return Transfer(self, work, tensor, op)

    def fail(self, op: str, error: BaseException) -> ChannelError:
        """Close the channel after ``error`` in ``op``; return the error to raise."""
        reason = f"{op} from rank {self.rank} failed: {error}"
        self.close(reason)
        return ChannelError(f"channel {self.key} ({self.backend}): {reason}")

    def close(self, reason: str = "closed") -> None:
        """Abort the group (pending transfers on either side fail). Idempotent."""
        if self.broken:
            return
        self.broken = reason
        try:
            self.group.abort()
        except Exception as e:  # already torn down by the backend
            log.debug("channel %s: abort: %r", self.key, e)


def _cuda_device(device: torch.device | str | None) -> torch.device:
    if not torch.cuda.is_available():
        raise ValueError("an NCCL channel needs a CUDA device; use the gloo backend on CPU")
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cuda":
        raise ValueError(f"an NCCL channel carries CUDA tensors, got device {dev}")
    return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())


__all__ = ["BACKENDS", "ChannelError", "DistChannel", "StoreServer", "Transfer", "pair_key", "serve_store"]
