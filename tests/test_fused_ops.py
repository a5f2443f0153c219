"""The fused element-wise kernels (llumnix/engine/fused_ops.py) against the torch ops they replace, and the model with
and without them. Runs on CUDA, or on CPU through Triton's interpreter (TRITON_INTERPRET=1; its float32 -> bfloat16
conversion truncates where CUDA rounds to nearest, so bf16 bits are checked on CUDA only); skipped without Triton."""

import pytest
import torch
import torch.nn.functional as F

from llumnix.engine import fused_ops, paged_attention
from llumnix.engine.model import RMSNorm, apply_rope, rope_cos_sin
from llumnix.engine.runner import ModelRunner, SeqInput

DEVICE = paged_attention.triton_device()
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs Triton: a CUDA device, or TRITON_INTERPRET=1")
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_is_the_rounded_sum_and_rmsnorm_of_it(dtype):
    x, r = _randn(7, 384, dtype=dtype), _randn(7, 384, dtype=dtype, seed=1)
    norm = RMSNorm(384, 1e-5).to(device=DEVICE, dtype=dtype)
    norm.weight.data = _randn(384, dtype=dtype, seed=2)
    out, res = fused_ops.add_rms_norm(x, norm.weight, 1e-5, residual=r)
    assert torch.equal(res, x + r)  # the residual stream: exactly torch's rounded add
    # the reduction order and the reciprocal square root differ from F.rms_norm's: a few units in the last place in
    # fp32 (then rounded away in bf16: mostly the same bits, at most one unit off)
    ulps = 2 if dtype == torch.bfloat16 else 8
    first, same = fused_ops.add_rms_norm(x, norm.weight, 1e-5)  # no residual yet: the sum is x itself
    assert same is x
    for got, ref in ((out, norm(x + r)), (first, norm(x))):
        tolerance = ulps * torch.finfo(dtype).eps * ref.float().abs().clamp_min(1e-3)
        assert ((got.float() - ref.float()).abs() <= tolerance).all()
        if dtype == torch.bfloat16:
            assert (got == ref).float().mean() > 0.8


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_gives_apply_ropes_bits(dtype):
    """Bit for bit: each product rounded to the dtype, then the sum (no multiply fused into the add)."""
    qkv = _randn(5, 10, 64, dtype=dtype)  # 6 query + 2 key heads rotated, 2 value heads not
    cos, sin = rope_cos_sin(torch.tensor([0, 3, 17, 511, 4000], device=DEVICE), 64, 10000.0, dtype)
    assert torch.equal(fused_ops.rope(qkv[:, :8], cos, sin), apply_rope(qkv[:, :8], cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_store_is_rope_and_the_cache_write_in_one_kernel(dtype):
    """q: rope's bits; the rotated keys and the values land in their slots' rows of the slabs, nothing else moves."""
    t, q_heads, kv_heads, d = 5, 6, 2, 64
    qkv = _randn(t, q_heads + 2 * kv_heads, d, dtype=dtype)
    cos, sin = rope_cos_sin(torch.tensor([0, 3, 17, 511, 4000], device=DEVICE), d, 10000.0, dtype)
    k_slab, v_slab = _randn(40, kv_heads, d, dtype=dtype, seed=5), _randn(40, kv_heads, d, dtype=dtype, seed=6)
    k_before, v_before = k_slab.clone(), v_slab.clone()
    slots = torch.tensor([7, 0, 39, 12, 13], device=DEVICE)
    q = fused_ops.rope_store(qkv, cos, sin, k_slab, v_slab, slots)
    rotated = fused_ops.rope(qkv[:, : q_heads + kv_heads], cos, sin)
    assert torch.equal(q, rotated[:, :q_heads])
    assert torch.equal(k_slab[slots], rotated[:, q_heads:])
    assert torch.equal(v_slab[slots], qkv[:, q_heads + kv_heads :])
    others = torch.ones(40, dtype=torch.bool, device=DEVICE)
    others[slots] = False
    assert torch.equal(k_slab[others], k_before[others]) and torch.equal(v_slab[others], v_before[others])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_silu_times_up(dtype):
    gate_up = _randn(3, 2 * 1500, dtype=dtype)  # 1500: not a multiple of the kernel's block
    gate, up = gate_up.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    out = fused_ops.silu_mul(gate_up)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)


def test_the_model_decodes_the_same_tokens_with_the_fused_kernels():
    """tiny, float32: the fused path's logits within float rounding of the unfused path's, the same greedy tokens."""
    runs = {}
    for fused in (False, True):
        runner = ModelRunner("tiny", 64, 16, device=DEVICE, seed=3, cuda_graphs=False, fused_ops=fused)
        assert runner.model.fused_ops is fused
        prompt = list(range(40, 140))
        table = list(range(8))
        logits = runner.prefill_logits([SeqInput(prompt, 0, table)])
        tokens = [int(logits.argmax())]
        for i in range(12):
            tokens.append(runner.decode([SeqInput([tokens[-1]], len(prompt) + i, table)])[0])
        runs[fused] = logits, tokens
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-4)
    assert runs[True][1] == runs[False][1]


def test_the_fused_kernels_are_off_on_cpu_by_default():
    assert ModelRunner("tiny", 8, 16, device="cpu").fused_ops is False
