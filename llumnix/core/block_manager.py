"""Paged KV block accounting (vLLM 0.1.x semantics): block tables per request over a fixed pool."""

from __future__ import annotations

from collections.abc import Hashable


class BlockManagerError(RuntimeError):
    """An accounting violation: a bug in the caller, never a normal refusal (refusals return False)."""


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    """Owns ``num_blocks`` KV blocks of ``block_size`` tokens.

    The watermark keeps a few blocks free when *admitting* new prompts so that running requests can still append
    tokens for a while; it does not apply to appends (vLLM 0.1.x), which is why preemption only happens on decode.
    Tables are keyed by any hashable owner (a request id, or a migration's pre-allocation key).
    """

    def __init__(self, num_blocks: int, block_size: int = 16, watermark: float = 0.01) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {watermark}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_blocks)
        # A stack of free ids: deterministic, and freed blocks are reused first (warm in cache on a real GPU).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[Hashable, list[int]] = {}

    # -- queries -------------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def tables(self) -> dict[Hashable, list[int]]:
        """Every owner's block table (read-only use: the scheduler's hot path reads lengths from it)."""
        return self._tables

    def table(self, owner: Hashable) -> list[int]:
        return self._tables.get(owner, [])

    def num_blocks_of(self, owner: Hashable) -> int:
        return len(self._tables.get(owner, ()))

    def owners(self) -> list[Hashable]:
        return list(self._tables)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.can_allocate_blocks(blocks_for(num_tokens, self.block_size))

    def can_allocate_blocks(self, num_blocks: int) -> bool:
        return len(self._free) - num_blocks >= self.watermark_blocks

    def can_append_slot(self) -> bool:
        return len(self._free) >= 1

    # -- mutations -----------------------------------------------------------------------------------------------
    def allocate(self, owner: Hashable, num_tokens: int) -> list[int]:
        """Allocate the blocks for ``num_tokens`` tokens of a new owner (a prompt being admitted)."""
        if owner in self._tables:
            raise BlockManagerError(f"owner {owner!r} already holds blocks")
        return self.allocate_blocks(owner, blocks_for(num_tokens, self.block_size))

    def allocate_blocks(self, owner: Hashable, num_blocks: int) -> list[int]:
        """Append ``num_blocks`` fresh blocks to ``owner``'s table (creating it) and return the new ids."""
        if num_blocks > len(self._free):
            raise BlockManagerError(f"asked for {num_blocks} blocks, only {len(self._free)} free")
        new = [self._free.pop() for _ in range(num_blocks)]
        self._tables.setdefault(owner, []).extend(new)
        return new

    def append_slot(self, owner: Hashable, seq_len: int) -> int | None:
        """Make room for token ``seq_len`` (1-based count) of ``owner``; return a newly allocated block id or None."""
        table = self._tables.get(owner)
        if table is None:
            raise BlockManagerError(f"owner {owner!r} holds no blocks")
        if len(table) * self.block_size >= seq_len:
            return None
        if not self._free:
            raise BlockManagerError("append_slot without a free block: call can_append_slot first")
        block = self._free.pop()
        table.append(block)
        return block

    def free(self, owner: Hashable) -> int:
        """Release every block of ``owner``; return how many. Freeing an unknown owner is a no-op (returns 0)."""
        table = self._tables.pop(owner, None)
        if not table:
            return 0
        self._free.extend(reversed(table))
        return len(table)

    def rename(self, old: Hashable, new: Hashable) -> None:
        """Hand a table to a new owner (a committed migration's pre-allocation becomes the request's table)."""
        if new in self._tables:
            raise BlockManagerError(f"owner {new!r} already holds blocks")
        self._tables[new] = self._tables.pop(old, [])

    def check(self) -> None:
        """Raise if accounting is inconsistent (every block is either free or in exactly one table)."""
        used = [b for t in self._tables.values() for b in t]
        every = used + self._free
        if len(every) != self.num_blocks or len(set(every)) != self.num_blocks:
            raise BlockManagerError(
                f"block accounting broken: {len(used)} used + {len(self._free)} free != {self.num_blocks} unique"
            )
