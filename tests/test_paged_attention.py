"""The split-KV paged decode kernel (llumnix/engine/paged_attention.py) against a float64 reference, and its promises:
a sequence's output is the same bits alone or in any batch, run after run, and under a CUDA graph replayed with other
lengths. Runs on CUDA, or on CPU through Triton's interpreter (TRITON_INTERPRET=1); skipped without Triton. Head dims
and head counts are small so that the interpreter stays fast."""

import random

import pytest
import torch

from llumnix.engine import paged_attention

DEVICE = paged_attention.triton_device()
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs Triton: a CUDA device, or TRITON_INTERPRET=1")
BLOCK = 16


def _contexts(heads: int, kv_heads: int) -> list[int]:
    """Around the shape's partition: one partition, exactly one, one more token, several, a partial last one."""
    p = paged_attention.partition_tokens(heads, kv_heads)
    return [1, 15, 16, p - 1, p, p + 1, 2 * p + 1, 1500, 3000]


def _case(lens: list[int], heads: int, kv_heads: int, dtype: torch.dtype, seed: int = 0, head_dim: int = 16):
    """q [B, H, D], K/V pools with every sequence's blocks at shuffled places (and spare blocks), tables, lens."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-n // BLOCK) for n in lens]
    num_blocks = sum(blocks) + 7
    order = list(range(num_blocks))
    random.Random(seed).shuffle(order)
    tables = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = torch.tensor(order[used : used + n], dtype=torch.int32)
        used += n
    k_pool, v_pool = (torch.randn(num_blocks * BLOCK, kv_heads, head_dim, generator=gen) for _ in range(2))
    q = torch.randn(len(lens), heads, head_dim, generator=gen)
    to = {"device": DEVICE, "dtype": dtype}
    return (q.to(**to), k_pool.to(**to), v_pool.to(**to), tables.to(DEVICE),
            torch.tensor(lens, dtype=torch.int32, device=DEVICE))


def _reference(q, k_pool, v_pool, tables, lens) -> torch.Tensor:
    """Softmax attention in float64 over each sequence's tokens, gathered through its table (of the same inputs)."""
    heads, kv_heads, head_dim = q.shape[1], k_pool.shape[1], q.shape[2]
    out = []
    for b, n in enumerate(lens.tolist()):
        tok = torch.arange(n, device=tables.device)
        slots = tables[b, tok // BLOCK].long() * BLOCK + tok % BLOCK
        k, v = (pool[slots].double().repeat_interleave(heads // kv_heads, dim=1) for pool in (k_pool, v_pool))
        scores = torch.einsum("hd,nhd->hn", q[b].double(), k) * head_dim**-0.5
        out.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v))
    return torch.stack(out)


def test_the_address_arithmetic_switches_keep_the_bits(monkeypatch):
    """Block ids loaded once per block, 32-bit offsets, the programs' order, loops bounded by the length: how the
    kernel addresses the pool and schedules its programs and loops, not what it computes."""
    q, k_pool, v_pool, tables, lens = _case([1, 16, 300, 513], 3, 1, torch.float32, seed=4)
    outs = []
    names = ("TABLE_PER_BLOCK", "OFFS32", "HEAD_MAJOR", "DYNAMIC_SPLIT")  # (one pass: CUDA only)
    for switches in ((0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (1, 1, 0, 0), (1, 1, 1, 0), (0, 0, 1, 0), (1, 1, 1, 1),
                     (0, 0, 0, 1)):
        for name, on in zip(names, switches, strict=True):
            monkeypatch.setattr(paged_attention, name, bool(on))
        outs.append(paged_attention.paged_decode_attention(q, k_pool, v_pool, tables, lens, BLOCK))
    assert all(torch.equal(out, outs[0]) for out in outs[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(2, 2), (3, 1)], ids=["mha", "gqa3"])
def test_split_kernel_matches_float64_reference(dtype, heads, kv_heads):
    q, k_pool, v_pool, tables, lens = _case(_contexts(heads, kv_heads), heads, kv_heads, dtype)
    out = paged_attention.paged_decode_attention(q, k_pool, v_pool, tables, lens, BLOCK)
    assert out.shape == q.shape and out.dtype == dtype
    tol = 2e-6 if dtype == torch.float32 else 1.6e-2  # bf16: the output's own rounding (2^-7 relative) and q's
    torch.testing.assert_close(out.double(), _reference(q, k_pool, v_pool, tables, lens), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_kernel_is_batch_invariant_and_deterministic(dtype):
    """A 1100-token sequence and a 40-token one (35 and 2 of this shape's 32-token partitions): the same bits alone
    (table as wide as their own context), in a batch of others of different lengths (a wider table, other rows, other
    positions), again, and with the partitions split among fewer programs."""
    lens = [1100, 2100, 40, 513, 7]
    q, k_pool, v_pool, tables, lens_t = _case(lens, 3, 1, dtype, seed=3)

    def run(rows: list[int], width: int | None = None) -> torch.Tensor:
        t = tables[rows, : width or -(-max(lens[r] for r in rows) // BLOCK)].contiguous()
        return paged_attention.paged_decode_attention(q[rows].contiguous(), k_pool, v_pool, t, lens_t[rows], BLOCK)

    batch = run([1, 3, 0, 4, 2])
    again = run([1, 3, 0, 4, 2])
    assert batch.equal(again)
    for splits in (1, 2):  # programs per (sequence, KV head): the same partitions, taken by fewer programs
        assert paged_attention.paged_decode_attention(q[[1, 3, 0, 4, 2]], k_pool, v_pool, tables[[1, 3, 0, 4, 2]],
                                                      lens_t[[1, 3, 0, 4, 2]], BLOCK, splits=splits).equal(batch)
    alone = run([0])
    assert alone[0].equal(batch[2])
    assert run([0], width=tables.shape[1])[0].equal(alone[0])  # a padded table: more partitions in the grid
    assert run([2])[0].equal(batch[4])
    assert run([4, 2])[1].equal(batch[4])


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA device")
def test_split_kernel_replays_in_a_cuda_graph_for_other_lengths():
    """Captured once for a table of 3000 tokens' width with some lengths; replayed with others: the eager bits."""
    q, k_pool, v_pool, tables, lens = _case([3000, 1500, 513, 40], 6, 2, torch.bfloat16, seed=5)
    static_lens = lens.clone()

    def step() -> torch.Tensor:
        return paged_attention.paged_decode_attention(q, k_pool, v_pool, tables, static_lens, BLOCK)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for new in ([3000, 1500, 513, 40], [1, 2999, 512, 1024], [600, 7, 3000, 2048]):
        static_lens.copy_(torch.tensor(new, dtype=torch.int32))
        graph.replay()
        expected = paged_attention.paged_decode_attention(q, k_pool, v_pool, tables, static_lens, BLOCK)
        assert out.equal(expected)
        torch.testing.assert_close(out.double(), _reference(q, k_pool, v_pool, tables, static_lens), rtol=1.6e-2,
                                   atol=1.6e-2)
