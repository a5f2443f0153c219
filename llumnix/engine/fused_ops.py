"""Fused element-wise kernels of a decoder layer (Triton): fewer, larger kernels per step.

A decode step of LLaMA-7B launches ~28 kernels a layer, most of them tiny (norms, rotary, residual adds, SiLU); on one
H200 their kernel time and the gaps between them under CUDA-graph replay cost ~2.4 ms of a 6.2 ms batch-1 step
(``llumnix bench step-breakdown``, ``benchmarks/h200-step-breakdown.csv``). These kernels do the same arithmetic in
one launch each:

- ``add_rms_norm``: the residual add (rounded to the model's dtype, as torch's add) and the RMS norm of the sum
  (in fp32, rounded, then times the weight and rounded: ``RMSNorm`` in ``model.py``); one program per token.
- ``rope``: rotary embedding of the query and key heads, rounded step by step as ``apply_rope`` is (``x * cos``,
  ``rotate(x) * sin``, their sum); ``rope_store`` (decode steps over the paged pool) also writes the rotated keys
  and the values into their KV cache slots, where the attention would have written them in two more launches.
- ``silu_mul``: ``silu(gate) * up`` of the fused gate/up projection.

Every rounding to the model's dtype is to nearest even, as torch's. The rotary kernels are compiled without fusing a
multiply into the next add (``enable_fp_fusion=False``; with it, a few bf16 elements came out one unit off torch's on
an H200): their bits are ``apply_rope``'s. The norm's reduction order and reciprocal square root and SiLU's
exponential differ from torch's: a step's bits can differ from the unfused path's in the last place; each path is
deterministic and batch-invariant on its own (one program per token, the reduction order fixed by the hidden size). Used on CUDA where Triton runs (``ModelRunner(fused_ops=...)``); the CPU
path keeps the torch ops; ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors (tests).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n, eps,
                             HAS_RES: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        ok = offs < n
        x = tl.load(x_ptr + row * n + offs, mask=ok, other=0.0)
        if HAS_RES:
            r = tl.load(res_ptr + row * n + offs, mask=ok, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype, fp_downcast_rounding="rtne")  # rounded as torch's add
            tl.store(res_out_ptr + row * n + offs, x, mask=ok)
        xf = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)
        y = (xf * inv).to(x.dtype, fp_downcast_rounding="rtne")
        w = tl.load(w_ptr + offs, mask=ok, other=0.0)
        tl.store(out_ptr + row * n + offs, (y.to(tl.float32) * w.to(tl.float32)).to(x.dtype, fp_downcast_rounding="rtne"), mask=ok)

    @triton.jit
    def _rotate(src, cos_row, sin_row, HALF: tl.constexpr):
        """One head's rotary embedding (its two halves), rounded step by step as ``apply_rope`` is: ``x * cos``,
        ``rotate(x) * sin``, their sum."""
        d = tl.arange(0, HALF)
        x1 = tl.load(src + d)
        x2 = tl.load(src + HALF + d)
        c1 = tl.load(cos_row + d).to(tl.float32)
        c2 = tl.load(cos_row + HALF + d).to(tl.float32)
        s1 = tl.load(sin_row + d).to(tl.float32)
        s2 = tl.load(sin_row + HALF + d).to(tl.float32)
        dt = x1.dtype
        x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
        # x * cos + cat(-x2, x1) * sin, each product rounded, then the sum (apply_rope's three ops)
        lo = ((x1f * c1).to(dt, fp_downcast_rounding="rtne").to(tl.float32) + (-x2f * s1).to(dt, fp_downcast_rounding="rtne").to(tl.float32)).to(dt, fp_downcast_rounding="rtne")
        hi = ((x2f * c2).to(dt, fp_downcast_rounding="rtne").to(tl.float32) + (x1f * s2).to(dt, fp_downcast_rounding="rtne").to(tl.float32)).to(dt, fp_downcast_rounding="rtne")
        return lo, hi

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, stride_x_t, stride_x_h, stride_cs_t, heads,
                     HALF: tl.constexpr):  # fmt: skip
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        d = tl.arange(0, HALF)
        lo, hi = _rotate(x_ptr + t * stride_x_t + h * stride_x_h, cos_ptr + t * stride_cs_t,
                         sin_ptr + t * stride_cs_t, HALF)
        dst = out_ptr + (t * heads + h) * (2 * HALF)
        tl.store(dst + d, lo)
        tl.store(dst + HALF + d, hi)

    @triton.jit
    def _rope_store_kernel(x_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, slots_ptr, stride_x_t, stride_x_h,
                           stride_cs_t, stride_slot, q_heads, kv_heads, HALF: tl.constexpr):  # fmt: skip
        """Program (token, head) over the q heads then the KV heads: a q head rotated into q; a KV head's key
        rotated, and its value copied, into the token's cache slot."""
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        d = tl.arange(0, HALF)
        lo, hi = _rotate(x_ptr + t * stride_x_t + h * stride_x_h, cos_ptr + t * stride_cs_t,
                         sin_ptr + t * stride_cs_t, HALF)
        if h < q_heads:
            dst = q_ptr + (t * q_heads + h) * (2 * HALF)
            tl.store(dst + d, lo)
            tl.store(dst + HALF + d, hi)
        else:
            kvh = h - q_heads
            at = tl.load(slots_ptr + t) * stride_slot + kvh * (2 * HALF)
            tl.store(k_ptr + at + d, lo)
            tl.store(k_ptr + at + HALF + d, hi)
            full = tl.arange(0, 2 * HALF)
            v = tl.load(x_ptr + t * stride_x_t + (q_heads + kv_heads + kvh) * stride_x_h + full)
            tl.store(v_ptr + at + full, v)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < inter
        g = tl.load(x_ptr + row * 2 * inter + offs, mask=ok, other=0.0)
        u = tl.load(x_ptr + row * 2 * inter + inter + offs, mask=ok, other=0.0)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype, fp_downcast_rounding="rtne")  # silu, rounded as torch's
        tl.store(out_ptr + row * inter + offs, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype, fp_downcast_rounding="rtne"), mask=ok)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """x [T, n] (plus ``residual``, if given, rounded) -> (RMS norm of the sum times ``weight``, the sum)."""
    x = x.contiguous()
    t, n = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    res_in = residual.contiguous() if residual is not None else x
    _add_rms_norm_kernel[(t,)](x, res_in, weight, out, res_out, n, eps, HAS_RES=residual is not None,
                               BLOCK=triton.next_power_of_2(n), num_warps=8)
    return out, res_out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] (any strides with a contiguous last dim), cos / sin [T, 1, D] -> rotated [T, heads, D]."""
    t, heads, d = x.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(t, heads, d, dtype=x.dtype, device=x.device)
    _rope_kernel[(t, heads)](x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0), heads, HALF=d // 2,
                             enable_fp_fusion=False)  # fmt: skip
    return out


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_slab: torch.Tensor, v_slab: torch.Tensor,
               slots: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``rope`` of the query and key heads of qkv [T, q heads + 2 KV heads, D] (any strides with a contiguous last
    dim), with the rotated keys and the values written into their cache slots (k_slab, v_slab [slots, KV heads, D],
    contiguous; ``slots`` [T], long) in the same launch: the rotary and the KV cache write as one kernel. Returns the
    rotated queries [T, q heads, D]; the keys' bits are ``rope``'s, the values' the input's."""
    t, heads, d = qkv.shape
    kv_heads = k_slab.shape[1]
    q_heads = heads - 2 * kv_heads
    cos, sin = cos.contiguous(), sin.contiguous()
    q = torch.empty(t, q_heads, d, dtype=qkv.dtype, device=qkv.device)
    _rope_store_kernel[(t, q_heads + kv_heads)](qkv, cos, sin, q, k_slab, v_slab, slots, qkv.stride(0),
                                                qkv.stride(1), cos.stride(0), k_slab.stride(0), q_heads, kv_heads,
                                                HALF=d // 2, enable_fp_fusion=False)  # fmt: skip
    return q


SILU_BLOCK = 1024


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate, then up) -> silu(gate) * up [T, I]."""
    gate_up = gate_up.contiguous()
    t, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty(t, inter, dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul_kernel[(t, triton.cdiv(inter, SILU_BLOCK))](gate_up, out, inter, BLOCK=SILU_BLOCK)
    return out
