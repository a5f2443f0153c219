"""Paged KV cache: one preallocated tensor, addressed through block tables that a BlockManager owns.

Token at position p of a sequence lives in slot ``block_table[p // block_size] * block_size + p % block_size``.
The pool never hands out block ids; it only reads and writes the blocks it is told to.
"""

from __future__ import annotations

import torch

from llumnix.engine import fused_ops
from llumnix.engine.paged_attention import paged_decode_attention


def block_index(block_ids: list[int], device: torch.device) -> torch.Tensor:
    """Block ids as a long tensor on ``device``. On a side CUDA stream (a serving instance's KV stream: the engine's
    step may be running on the default one) sent from pinned memory without the host waiting: a copy from pageable
    memory made the host wait for the decode step in flight (traced: 4.7 ms of a migration's stop-and-copy). On the
    default stream (nothing runs beside: the Fig 10 bench's processes) a plain copy: pinned there, the child process's
    steps during its bulk stages were 3-5% slower (A/B on 2 x H200: benchmarks/h200x2-nccl-ids-*.csv)."""
    idx = torch.tensor(block_ids, dtype=torch.long)
    if device.type != "cuda":
        return idx
    if torch.cuda.current_stream(device) == torch.cuda.default_stream(device):
        return idx.to(device)
    return idx.pin_memory().to(device, non_blocking=True)


class KVCachePool:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int = 16,
        *,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        scratch_blocks: int = 0,
    ):
        """``scratch_blocks`` more blocks follow the ``num_blocks`` a block manager hands out: padding rows of a
        static-shape step write there (``scratch_slot``), never into a sequence's blocks."""
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        # [layer, k|v, block, offset in block, kv head, head dim]: one layer's K (or V) is a contiguous slab.
        self.cache = torch.zeros(
            num_layers, 2, num_blocks + scratch_blocks, block_size, num_kv_heads, head_dim, dtype=dtype,
            device=self.device,
        )
        self.scratch_slot = num_blocks * block_size if scratch_blocks else None

    @property
    def bytes_per_block(self) -> int:
        """Bytes of K and V of one block over all layers: what migrating one block moves."""
        return self.cache[:, :, 0].numel() * self.cache.element_size()

    def slot_mapping(self, block_table: list[int], start_pos: int, num_tokens: int) -> torch.Tensor:
        """Slots (long, on CPU) of positions start_pos .. start_pos + num_tokens - 1."""
        end = start_pos + num_tokens
        num_blocks_needed = -(-end // self.block_size)
        if start_pos < 0 or num_blocks_needed > len(block_table):
            raise ValueError(
                f"block table of {len(block_table)} blocks cannot hold positions [{start_pos}, {end}) "
                f"with block_size {self.block_size}"
            )
        pos = torch.arange(start_pos, end)
        table = torch.tensor(block_table[:num_blocks_needed], dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _slab(self, layer: int, kv: int) -> torch.Tensor:
        return self.cache[layer, kv].view(-1, self.num_kv_heads, self.head_dim)

    @torch.inference_mode()
    def write_slots(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [len(slots), kv_heads, head_dim]."""
        self._slab(layer, 0)[slots] = k
        self._slab(layer, 1)[slots] = v

    @torch.inference_mode()
    def gather_slots(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at `slots` (any shape S) -> two [*S, kv_heads, head_dim] tensors."""
        return self._slab(layer, 0)[slots], self._slab(layer, 1)[slots]

    def rope_store(self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   slots: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The rotated queries of qkv [T, heads + 2 kv heads, D], its rotated keys and its values written at
        ``slots`` of this layer: one kernel (``fused_ops.rope_store``; Triton)."""
        return fused_ops.rope_store(qkv, cos, sin, self._slab(layer, 0), self._slab(layer, 1), slots)

    def paged_decode(self, layer: int, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """Decode attention of q [B, H, D] over each sequence's context read in place (``paged_attention``)."""
        return paged_decode_attention(q, self._slab(layer, 0), self._slab(layer, 1), tables, lens, self.block_size)

    def write(self, layer: int, block_table: list[int], start_pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        slots = self.slot_mapping(block_table, start_pos, k.shape[0]).to(self.device)
        self.write_slots(layer, slots, k, v)

    def gather(self, layer: int, block_table: list[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of a sequence's first `num_tokens` positions, each [num_tokens, kv_heads, head_dim]."""
        return self.gather_slots(layer, self.slot_mapping(block_table, 0, num_tokens).to(self.device))

    @torch.inference_mode()
    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Contiguous copy [num_layers, 2, len(block_ids), block_size, kv_heads, head_dim] of those blocks."""
        return self.cache.index_select(2, block_index(block_ids, self.device))

    @torch.inference_mode()
    def write_blocks(self, block_ids: list[int], payload: torch.Tensor) -> None:
        """Inverse of read_blocks (payload may come from another pool / device of the same geometry)."""
        expected = (*self.cache.shape[:2], len(block_ids), *self.cache.shape[3:])
        if tuple(payload.shape) != expected:
            raise ValueError(f"payload shape {tuple(payload.shape)} != expected {expected}")
        self.cache.index_copy_(2, block_index(block_ids, self.device), payload.to(device=self.device, dtype=self.dtype))
