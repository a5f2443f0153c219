"""How a migration stage's KV blocks travel from the source actor to the destination actor.

The source reads its blocks (``executor.read_blocks``), ``pack``s them, and ``send``s them to the destination actor's
``mig_write``; the destination ``unpack``s and writes them (``executor.write_blocks``). One small class per transport:
``ObjectStoreTransport`` moves numpy arrays through Ray's object store (zero-copy reads on the destination's host); a
torch.distributed (gloo / NCCL) transport would implement the same three methods.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np


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


class KVTransport(ABC):
    name = "base"

    @abstractmethod
    async def send(self, dst_actor: Any, migration_id: int, dst_blocks: list[int], payload: KVPayload) -> None:
        """Deliver ``payload`` into ``dst_blocks`` of the destination; return once it has been written there."""


class ObjectStoreTransport(KVTransport):
    """Put the payload in Ray's object store and pass its reference to the destination's ``mig_write``."""

    name = "object-store"

    async def send(self, dst_actor: Any, migration_id: int, dst_blocks: list[int], payload: KVPayload) -> None:
        import ray

        ref = ray.put(payload) if payload.array is not None else payload
        await dst_actor.mig_write.remote(migration_id, dst_blocks, ref)


TRANSPORTS: dict[str, type[KVTransport]] = {ObjectStoreTransport.name: ObjectStoreTransport}


def make_transport(name: str = ObjectStoreTransport.name) -> KVTransport:
    try:
        return TRANSPORTS[name]()
    except KeyError:
        raise ValueError(f"unknown KV transport {name!r}; choose one of {sorted(TRANSPORTS)}") from None
