"""Decode attention read straight from the paged KV pool (Triton kernels), instead of gathering every sequence's
keys and values into a padded copy first.

Split-KV ("flash-decoding", as vLLM's paged attention v2): each sequence's context is cut into partitions of
``PARTITION`` tokens (scaled with the tile where it is smaller than ``BLOCK_N``: ``split_constants``). The partition
kernel walks a partition in tiles of ``BLOCK_N`` tokens (fewer with GQA: ``TILE_ROWS``), looks each token's slot
up in the block table, loads its key and value from the pool once for all the query heads that share that KV head
(GQA), and keeps an online softmax; it writes the partition's partial output with its max and sum of exponentials.
A second kernel, one program per (sequence, query head), combines a sequence's partitions in a fixed order (chunks of
``COMBINE_CHUNK`` partitions, one after another). A sequence of one partition (``PARTITION`` tokens or fewer) is
written out directly, and its combine program exits at once.

The partition kernel's grid is (KV head, sequence, split) (``HEAD_MAJOR``; else (sequence, KV head, split)): ``splits``
programs per sequence and KV head, each taking partitions split, split + splits, ... in turn. The split count is
chosen from the shapes only, to fill the GPU (``PROGRAMS_PER_SM``): a large batch gets one program per sequence and KV
head walking all its partitions (no flood of empty programs when the table is wide and the contexts short), a single
long sequence one program per partition.

One pass: when the batch alone fills the GPU (``FULL_PROGRAMS_PER_SM``), the partition is the whole table and the tile
``FULL_BLOCK_N`` tokens: one program per sequence and KV head, no partials, no combine (the kernel before split-KV); its
tile loop stops at the sequence's context instead of walking the table's width (``DYNAMIC_ONE_PASS``).
The mode depends on the launch's shapes only (batch, KV heads, SMs), so ``--invariant-batch R``, which runs every
decode step as launches of exactly R rows, keeps one mode and a sequence's bits; without it, a sequence's bits may
differ between a batch that fills the GPU and one that does not.

Determinism and batch invariance within a mode: the partition size is a constant of the shape, every partition is
computed from scratch the same way whichever program takes it, and every program reads only its own sequence's
length, so a sequence's output is computed by the same operations in the same order whatever batch it is in, however
wide its block table is padded, however the partitions are split among programs, and run after run. The grid depends
only on the tensors' shapes (the partition count comes from the block table's width, not from the lengths): a CUDA
graph captured for the widest table replays for any lengths, partitions past a sequence's length are skipped. The
partial results are allocated in the call (torch's caching allocator: from the graph's own pool under capture).

Without Triton (CPU torch wheels ship none) ``available()`` is False and the runner keeps its gather + SDPA path;
``TRITON_INTERPRET=1`` runs the kernels on CPU tensors (tests).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

# Constants of a process (each one changes the order of the floating-point operations: a sequence's bits must not
# depend on its batch, or on the run). Read at each call, so that a tuning benchmark can set them before its runs.
# Split-KV's constants are for MHA's tiles of BLOCK_N tokens; a smaller tile (several query heads a KV head: TILE_ROWS)
# scales them with it, so that a program's work stays one tile's worth (``split_constants``).
PARTITION = 128  # context tokens per partition
BLOCK_N = 128  # context tokens per tile (MHA; fewer with several query heads per KV head: TILE_ROWS)
TILE_ROWS = 128  # (query heads of a KV head, padded) x tile tokens at most: the [G, tile, D] products in registers
NUM_WARPS = 2  # per program of the partition kernel
PROGRAMS_PER_SM = 16  # partition-kernel programs to launch per SM (fewer: a program walks several partitions)
COMBINE_CHUNK = 16  # partitions the combine kernel reduces at a time
# Address arithmetic is a visible part of the kernel's time (benchmarks/h200-decode-kernel-variants.csv, the kernel
# alone on one H200: both on, 5-9% faster at every cell, the same bits): a tile's block ids are loaded once per block
# (not once per token), and slot offsets are 32-bit where one layer's K (or V) slab has fewer than 2**31 elements.
TABLE_PER_BLOCK = True
OFFS32 = True
# Program order: with HEAD_MAJOR the grid's fastest axis is the KV head, so programs that run side by side read the
# neighbouring heads of the same tokens (one token's K over all heads is one contiguous row of the pool), instead of
# the same head of different sequences. The same programs and arithmetic: only the order they are scheduled in (the
# kernel alone on one H200: up to 4% faster from batch 128, the same elsewhere; h200-decode-kernel-order.csv).
HEAD_MAJOR = True
# A partition's tile loop: a fixed trip count (PARTITION / tile, tiles past the context skipped) or one bounded by the
# context (no software pipelining). In one pass the partition is the whole table (as wide as the graph's longest
# context, 4k-8k tokens), so a fixed count walks mostly skipped tiles: bounded by the context, the kernel alone on one
# H200 is 4-21% faster from batch 32 (128 x 512: 1.47 -> 1.17x its KV's copy time; 256 x 2k: 1.28 -> 1.20x). With
# split-KV's 4-tile partitions the fixed count is faster (the context-bound loop, the partitions' loop bounded too:
# 8 x 8k 1.27 -> 1.63x); pipelined (num_stages 2, 3) 1.7-2.5x slower everywhere (h200-decode-kernel-dynamic.csv).
# Bounded in one pass only, as now: 1-20% faster from batch 32, split-KV unchanged (h200-decode-kernel-onepass.csv).
DYNAMIC_ONE_PASS = True
DYNAMIC_SPLIT = False
# A launch whose (sequence, KV head) pairs already fill the GPU (at least FULL_PROGRAMS_PER_SM per SM) gains nothing
# from splitting and loses the partials' writes and the combine: it walks each context in one pass, in tiles of
# FULL_BLOCK_N. 0 turns the one-pass mode off. The constants were picked on one H200 (LLaMA-7B and SmolLM2 shapes,
# bf16, the kernel alone against the copy bandwidth; benchmarks/h200-decode-kernel*.csv): with tiles of 64, tiles of
# 64 beat 32 at every batch, 256-token partitions beat 512 at short contexts and small batches, one pass from 4
# programs per SM on (h200-decode-kernel-sweep2.csv); then LLaMA-7B's tiles of 128 (4 warps; 8 warps: 2-3x slower):
# 2-7% faster than 64 in one pass (with HEAD_MAJOR: 128 x 512 1.51 -> 1.41x its KV's copy time, 256 x 512 1.46 ->
# 1.36x, 256 x 8k 1.31 -> 1.24x); in split-KV 512-token partitions were faster alone from 8 x 512 on but 15% slower at
# 1 x 512 (h200-decode-kernel-tiles.csv), and in the engine's steps 256-token ones are 5% faster at 1 x 512-2k and 2%
# slower at 8 x 8k (h200-decode-grid-p256.csv against -onepass.csv): 256, where the step is furthest from its floor.
# SmolLM2's shape (32-token tiles) walked 512-token partitions (16 tiles) 1.7-1.9x slower up to batch 8
# (h200-decode-kernel-smollm2-tiles.csv). Loading V with K, or the next tile's block ids a tile ahead, was 1-50% slower
# (h200-decode-kernel-loads.csv).
# Split-KV from 256-token partitions, 4 warps and 4 programs per SM to one-tile partitions, 2 warps and 16 programs per
# SM (the kernel alone on one H200 over batch 1-16 x 512-8k tokens, h200-decode-kernel-partitions*.csv): LLaMA-7B's
# 128 x 128 tiles 9-22% faster at every cell (9-13% at batch 1), SmolLM2's 4 x 32 x 64 ones (then 32-token
# partitions, 1 warp, 64 programs per SM) 24-70% faster. Smaller partitions without fewer warps, or fewer warps
# without them, were slower somewhere (64-token ones with 4 warps up to 28% at 1 x 8k; 256 with 2 warps up to 24% at
# 1 x 512).
FULL_PROGRAMS_PER_SM = 8
FULL_BLOCK_N = 128
# Warps per program in one pass, for tiles of FULL_BLOCK_N tokens (fewer with smaller tiles, as in split-KV). 2 rather
# than 4, and one pass from 8 programs per SM rather than 4 (LLaMA-7B's batch 32 then splits), the kernel alone on one
# H200 (h200-decode-kernel-full-warps.csv): at batch 64-256 0.99-1.09x the KV's copy time instead of 1.12-1.34x; at
# batch 32 split-KV 1.02-1.27x where one pass took 1.21-1.32x (1.19-1.25x with 2 warps); 1 warp 1.6-1.8x.
FULL_NUM_WARPS = 2


def available(device: torch.device) -> bool:
    """Whether the kernel can run on ``device``: Triton present, and a CUDA device (or the interpreter)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def triton_device() -> str | None:
    """Where this process can run the Triton kernels: "cuda", "cpu" under the interpreter (TRITON_INTERPRET=1), or
    None (no Triton: CPU torch wheels ship none)."""
    if available(torch.device("cuda")) and torch.cuda.is_available():
        return "cuda"
    return "cpu" if available(torch.device("cpu")) else None


if triton is not None:

    @triton.jit
    def _tile(
        q, m, denom, acc, start, last, kvh, k_ptr, v_ptr, table_ptr, stride_slot, d,
        GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
        TABLE_PER_BLOCK: tl.constexpr, OFFS32: tl.constexpr,
    ):  # fmt: skip
        """The online softmax over the BLOCK_N tokens from ``start`` (those before ``last``): m, denom, acc updated."""
        tok = start + tl.arange(0, BLOCK_N)
        valid = tok < last
        if TABLE_PER_BLOCK:  # one table entry per block of the tile, spread over its tokens
            nb: tl.constexpr = BLOCK_N // BLOCK_SIZE
            bi = start // BLOCK_SIZE + tl.arange(0, nb)
            blk = tl.load(table_ptr + bi, mask=bi * BLOCK_SIZE < last, other=0)
            slot = blk[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]
            slot = tl.reshape(slot, (BLOCK_N,))
        else:
            block = tl.load(table_ptr + tok // BLOCK_SIZE, mask=valid, other=0)
            slot = block * BLOCK_SIZE + tok % BLOCK_SIZE
        if not OFFS32:
            slot = slot.to(tl.int64)
        offs = slot[:, None] * stride_slot + kvh * HEAD_DIM + d[None, :]
        k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)  # [N, D]
        if GROUP_PAD == 1:  # MHA: plain [N, D] tiles
            s = tl.sum(k * q, axis=1)[None, :]
        else:
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])  # [G, N]
        v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
        if GROUP_PAD == 1:
            pv = tl.sum(tl.reshape(p, (BLOCK_N,))[:, None] * v, axis=0)[None, :]
        else:
            pv = tl.sum(p[:, :, None] * v[None, :, :], axis=1)  # [G, D]
        return m_new, denom * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + pv

    @triton.jit
    def _finish(
        acc, m, denom, length, part, b, heads, g_ok, d, out_ptr, part_o_ptr, part_ml_ptr, stride_o_b, stride_o_h,
        stride_p_b, stride_p_h, HEAD_DIM: tl.constexpr, PARTITION: tl.constexpr,
    ):  # fmt: skip
        """A partition's result: the output itself if it is the sequence's only one, else its partials."""
        if length <= PARTITION:
            o_offs = b * stride_o_b + heads[:, None] * stride_o_h + d[None, :]
            tl.store(out_ptr + o_offs, (acc / denom[:, None]).to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
        else:
            row = b * stride_p_b + heads * stride_p_h + part  # [G]: this partition of each head
            tl.store(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=g_ok[:, None])
            tl.store(part_ml_ptr + row * 2, m, mask=g_ok)
            tl.store(part_ml_ptr + row * 2 + 1, denom, mask=g_ok)

    @triton.jit
    def _partition_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, part_o_ptr, part_ml_ptr, tables_ptr, lens_ptr, scale,
        stride_q_b, stride_q_h, stride_o_b, stride_o_h, stride_t_b, stride_slot, stride_p_b, stride_p_h,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr, PARTITION: tl.constexpr, SPLITS: tl.constexpr, ITERS: tl.constexpr,
        TABLE_PER_BLOCK: tl.constexpr, OFFS32: tl.constexpr, HEAD_MAJOR: tl.constexpr, DYNAMIC: tl.constexpr,
    ):  # fmt: skip
        """One (sequence, KV head, split): partitions split, split + SPLITS, ... of the sequence (ITERS at most),
        each for the GROUP query heads of that KV head, each from scratch (so a partition's result does not depend on
        SPLITS). Partial results: part_o [B, H, P, D] (unnormalised), part_ml [B, H, P, 2] (max, sum of exps)."""
        if HEAD_MAJOR:
            kvh = tl.program_id(0)
            b = tl.program_id(1)
        else:
            b = tl.program_id(0)
            kvh = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(lens_ptr + b)
        d = tl.arange(0, HEAD_DIM)
        g = tl.arange(0, GROUP_PAD)
        heads = kvh * GROUP + g
        g_ok = g < GROUP
        q = tl.load(q_ptr + b * stride_q_b + heads[:, None] * stride_q_h + d[None, :], mask=g_ok[:, None], other=0.0)
        q = q.to(tl.float32) * scale  # [G, D]
        table_ptr = tables_ptr + b * stride_t_b
        for it in range(ITERS):
            part = split + it * SPLITS
            first = part * PARTITION
            if first < length:  # partitions past the context (the grid is sized for the widest table): nothing
                last = tl.minimum(length, first + PARTITION)
                m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
                denom = tl.zeros((GROUP_PAD,), tl.float32)
                acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
                if DYNAMIC:  # up to the context: no skipped iterations (and no software pipelining)
                    for start in tl.range(first, last, BLOCK_N, num_stages=1):
                        m, denom, acc = _tile(q, m, denom, acc, start, last, kvh, k_ptr, v_ptr, table_ptr,
                                              stride_slot, d, GROUP_PAD, BLOCK_SIZE, HEAD_DIM, BLOCK_N,
                                              TABLE_PER_BLOCK, OFFS32)
                else:
                    for i in range(0, PARTITION, BLOCK_N):  # a fixed trip count; tiles past the context skipped
                        start = first + i
                        if start < last:
                            m, denom, acc = _tile(q, m, denom, acc, start, last, kvh, k_ptr, v_ptr, table_ptr,
                                                  stride_slot, d, GROUP_PAD, BLOCK_SIZE, HEAD_DIM, BLOCK_N,
                                                  TABLE_PER_BLOCK, OFFS32)
                _finish(acc, m, denom, length, part, b, heads, g_ok, d, out_ptr, part_o_ptr, part_ml_ptr,
                        stride_o_b, stride_o_h, stride_p_b, stride_p_h, HEAD_DIM, PARTITION)

    @triton.jit
    def _combine_kernel(
        out_ptr, part_o_ptr, part_ml_ptr, lens_ptr, stride_o_b, stride_o_h, stride_p_b, stride_p_h,
        HEAD_DIM: tl.constexpr, PARTITION: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
    ):  # fmt: skip
        """One (sequence, query head): its partitions' partial outputs weighted by exp(max - overall max), in chunks
        of CHUNK partitions taken in order: the same reduction whatever the grid or the table's width."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        length = tl.load(lens_ptr + b)
        parts = tl.cdiv(length, PARTITION)
        if parts <= 1:  # written by its only partition
            return
        base = b * stride_p_b + h * stride_p_h
        d = tl.arange(0, HEAD_DIM)
        top = tl.full((), float("-inf"), tl.float32)
        for c in tl.static_range(CHUNKS):  # CHUNKS: enough for the widest table; chunks past the context skipped
            if c * CHUNK < parts:
                p = c * CHUNK + tl.arange(0, CHUNK)
                ml = tl.load(part_ml_ptr + (base + p) * 2, mask=p < parts, other=float("-inf"))
                top = tl.maximum(top, tl.max(ml))
        acc = tl.zeros((HEAD_DIM,), tl.float32)
        denom = tl.full((), 0.0, tl.float32)
        for c in tl.static_range(CHUNKS):
            if c * CHUNK < parts:
                p = c * CHUNK + tl.arange(0, CHUNK)
                ok = p < parts
                w = tl.exp(tl.load(part_ml_ptr + (base + p) * 2, mask=ok, other=float("-inf")) - top)
                denom += tl.sum(w * tl.load(part_ml_ptr + (base + p) * 2 + 1, mask=ok, other=0.0))
                o = tl.load(part_o_ptr + (base + p)[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)
                acc += tl.sum(w[:, None] * o, axis=0)
        tl.store(out_ptr + b * stride_o_b + h * stride_o_h + d, (acc / denom).to(out_ptr.dtype.element_ty))


@functools.cache
def _sm_count_of(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def split_constants(tile: int) -> tuple[int, int, int]:
    """Split-KV's partition (tokens), warps and programs per SM for tiles of ``tile`` tokens: the constants, which are
    for tiles of BLOCK_N tokens, scaled with the tile (a partition of as many tiles, warps in proportion, programs per
    SM inversely)."""
    return (max(tile, PARTITION * tile // BLOCK_N), max(1, NUM_WARPS * tile // BLOCK_N),
            PROGRAMS_PER_SM * BLOCK_N // tile)


def _group_pad(heads: int, kv_heads: int) -> int:
    """Query heads a KV head, up to a power of two (the kernel's GROUP_PAD rows)."""
    return 1 << (heads // kv_heads - 1).bit_length()


def _tile_of(group_pad: int, block_n: int) -> int:
    """Tokens per tile: ``block_n``, fewer with several query heads a KV head ([G, tile, D] products in registers)."""
    return min(block_n, max(16, TILE_ROWS // group_pad))


def partition_tokens(heads: int, kv_heads: int) -> int:
    """The split-KV partition of a shape with ``heads`` query heads and ``kv_heads`` KV heads (tokens)."""
    return split_constants(_tile_of(_group_pad(heads, kv_heads), BLOCK_N))[0]


def _splits(parts: int, batch: int, kv_heads: int, programs_per_sm: int, device: torch.device) -> int:
    """Programs per (sequence, KV head): about ``programs_per_sm`` per SM (rounded down to a power of two), at most
    one per partition. From shapes only (a CUDA graph's grid stays fixed); it schedules the work, the partitions'
    arithmetic is the same."""
    if device.type != "cuda":
        return parts
    wanted = -(-programs_per_sm * _sm_count(device) // (batch * kv_heads))
    return min(parts, 1 << (wanted.bit_length() - 1))  # a power of two (few compiled variants), dividing parts


def _fills_gpu(batch: int, kv_heads: int, device: torch.device) -> bool:
    """Whether one program per (sequence, KV head) already gives every SM ``FULL_PROGRAMS_PER_SM`` programs."""
    if device.type != "cuda" or not FULL_PROGRAMS_PER_SM:
        return False
    return batch * kv_heads >= FULL_PROGRAMS_PER_SM * _sm_count(device)


def paged_decode_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
    block_size: int, *, splits: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """q [B, H, D]; k_pool, v_pool [slots, KVH, D] (one layer's K and V slabs); tables [B, max blocks] (int32,
    block ids of each sequence in order); lens [B] (int32, context tokens incl. the current one) -> [B, H, D].
    ``splits``: programs per (sequence, KV head), 1 to the table's partitions (default: from the device's SM count);
    the output's bits do not depend on it."""
    batch, heads, head_dim = q.shape
    kv_heads = k_pool.shape[1]
    if heads % kv_heads or head_dim & (head_dim - 1):
        raise ValueError(f"needs heads ({heads}) a multiple of kv heads ({kv_heads}) and a power-of-two head dim "
                         f"({head_dim})")
    q = q.contiguous()
    out = torch.empty_like(q)
    group = heads // kv_heads
    group_pad = _group_pad(heads, kv_heads)
    one_pass = splits is None and _fills_gpu(batch, kv_heads, q.device)
    if one_pass:  # one pass over the whole table
        tile = _tile_of(group_pad, FULL_BLOCK_N)
        partition = max(tile, triton.next_power_of_2(tables.shape[1] * block_size))
        warps, programs_per_sm = max(1, FULL_NUM_WARPS * tile // FULL_BLOCK_N), PROGRAMS_PER_SM
    else:
        tile = _tile_of(group_pad, BLOCK_N)
        partition, warps, programs_per_sm = split_constants(tile)
    if partition % tile:
        raise ValueError(f"PARTITION ({partition}) must be a multiple of the tile ({tile} tokens)")
    # from the table's width (fixed under a graph), up to a power of two: few compiled variants when run eagerly
    parts = triton.next_power_of_2(max(1, -(-tables.shape[1] * block_size // partition)))
    splits = min(parts, splits or _splits(parts, batch, kv_heads, programs_per_sm, q.device))
    part_o = torch.empty(batch, heads, parts, head_dim, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(batch, heads, parts, 2, dtype=torch.float32, device=q.device)
    _partition_kernel[(kv_heads, batch, splits) if HEAD_MAJOR else (batch, kv_heads, splits)](
        q, k_pool, v_pool, out, part_o, part_ml, tables, lens, head_dim ** -0.5,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0), k_pool.stride(0),
        heads * parts, parts,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_N=tile,
        PARTITION=partition, SPLITS=splits, ITERS=-(-parts // splits), num_warps=warps,
        TABLE_PER_BLOCK=TABLE_PER_BLOCK and tile % block_size == 0, OFFS32=OFFS32 and k_pool.numel() < 2**31,
        HEAD_MAJOR=HEAD_MAJOR, DYNAMIC=DYNAMIC_ONE_PASS if one_pass else DYNAMIC_SPLIT,
    )  # fmt: skip
    if parts > 1:  # some sequence may span several partitions
        _combine_kernel[(batch, heads)](
            out, part_o, part_ml, lens, out.stride(0), out.stride(1), heads * parts, parts,
            HEAD_DIM=head_dim, PARTITION=partition, CHUNK=COMBINE_CHUNK, CHUNKS=-(-parts // COMBINE_CHUNK),
        )  # fmt: skip
    return out
