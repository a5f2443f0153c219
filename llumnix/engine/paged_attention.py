"""Decode attention read straight from the paged KV pool (a Triton kernel), instead of gathering every sequence's
keys and values into a padded copy first.

One program per (sequence, query head) walks the sequence's context in tiles of ``BLOCK_N`` tokens, looks each
token's slot up in the block table, loads its key and value from the pool and keeps an online softmax: the KV is read
once, nothing is written but the output. Without Triton (CPU torch wheels ship none) ``available()`` is False and the
runner keeps its gather + SDPA path; ``TRITON_INTERPRET=1`` runs the kernel on CPU tensors (tests).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

BLOCK_N = 64  # context tokens per tile


def available(device: torch.device) -> bool:
    """Whether the kernel can run on ``device``: Triton present, and a CUDA device (or the interpreter)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr, scale,
        stride_q_b, stride_q_h, stride_o_b, stride_o_h, stride_t_b, stride_slot,
        GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // GROUP
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b * stride_q_b + h * stride_q_h + d).to(tl.float32) * scale
        length = tl.load(lens_ptr + b)
        m = tl.full((), float("-inf"), tl.float32)
        denom = tl.full((), 0.0, tl.float32)
        acc = tl.zeros((HEAD_DIM,), tl.float32)
        for start in range(0, length, BLOCK_N):
            tok = start + tl.arange(0, BLOCK_N)
            valid = tok < length
            block = tl.load(tables_ptr + b * stride_t_b + tok // BLOCK_SIZE, mask=valid, other=0)
            slot = block.to(tl.int64) * BLOCK_SIZE + tok % BLOCK_SIZE
            offs = slot[:, None] * stride_slot + kvh * HEAD_DIM + d[None, :]
            k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1)
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new)
            v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            denom = denom * alpha + tl.sum(p, axis=0)
            m = m_new
        tl.store(out_ptr + b * stride_o_b + h * stride_o_h + d, (acc / denom).to(out_ptr.dtype.element_ty))


def paged_decode_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
    block_size: int,
) -> torch.Tensor:  # fmt: skip
    """q [B, H, D]; k_pool, v_pool [slots, KVH, D] (one layer's K and V slabs); tables [B, max blocks] (int32,
    block ids of each sequence in order); lens [B] (int32, context tokens incl. the current one) -> [B, H, D]."""
    batch, heads, head_dim = q.shape
    kv_heads = k_pool.shape[1]
    if heads % kv_heads or head_dim & (head_dim - 1):
        raise ValueError(f"needs heads ({heads}) a multiple of kv heads ({kv_heads}) and a power-of-two head dim "
                         f"({head_dim})")
    q = q.contiguous()
    out = torch.empty_like(q)
    _paged_decode_kernel[(batch, heads)](
        q, k_pool, v_pool, out, tables, lens, head_dim ** -0.5,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0), k_pool.stride(0),
        GROUP=heads // kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_N=BLOCK_N,
    )  # fmt: skip
    return out
