import os
import random

import pytest
import torch

from llumnix.engine import (
    PRESETS,
    KVCachePool,
    ModelConfig,
    ModelRunner,
    SeqInput,
    build_model,
    dense_generate,
    dense_logits,
    get_model_config,
)
from llumnix.engine import runner as runner_module
from llumnix.engine.device import torch_threads
from llumnix.engine.runner import group_by_length

PROMPT_LENS = [1, 4, 13, 16, 29, 40]


class Blocks:
    """Test stand-in for a BlockManager: hands out block ids in shuffled order, so tables are non-contiguous."""

    def __init__(self, num_blocks: int, seed: int):
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def table_for(self, table: list[int], num_tokens: int, block_size: int) -> list[int]:
        while len(table) * block_size < num_tokens:
            table.append(self.free.pop())
        return table


def prompts(lens: list[int], seed: int = 0, vocab: int = 1024) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lens]


def paged_generate(runner: ModelRunner, prompt_list: list[list[int]], n: int, blocks: Blocks) -> list[list[int]]:
    bs = runner.kv_cache.block_size
    tables = [blocks.table_for([], len(p), bs) for p in prompt_list]
    seqs = [SeqInput(p, 0, t) for p, t in zip(prompt_list, tables, strict=True)]
    outs = [[t] for t in runner.prefill(seqs)]
    for _ in range(n - 1):
        seqs = []
        for p, t, o in zip(prompt_list, tables, outs, strict=True):
            pos = len(p) + len(o) - 1
            seqs.append(SeqInput([o[-1]], pos, blocks.table_for(t, pos + 1, bs)))
        for o, t in zip(outs, runner.decode(seqs), strict=True):
            o.append(t)
    return outs


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """The tiny model's matmuls are too small to gain from threads, and on a busy 2-core box OpenMP spinning makes
    them ~20x slower."""
    with torch_threads("cpu", 1):
        yield


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner("tiny", num_blocks=256, block_size=4, seed=0)


def test_presets_and_config():
    assert set(PRESETS) >= {"tiny", "small", "llama-7b", "llama-30b"}
    assert get_model_config("llama-7b").kv_bytes_per_token(torch.float16) == 512 * 1024  # the paper's 0.5 MB/token
    assert abs(get_model_config("llama-7b").num_params / 1e9 - 6.74) < 0.01
    assert abs(get_model_config("llama-30b").num_params / 1e9 - 32.5) < 0.1
    assert 5 < PRESETS["small"].num_params / PRESETS["tiny"].num_params < 15
    with pytest.raises(ValueError, match="tiny"):
        get_model_config("gpt-5")
    with pytest.raises(ValueError):
        ModelConfig(vocab_size=10, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=3)


def test_big_model_builds_on_meta_in_target_dtype():
    model = build_model("llama-30b", device="meta", dtype=torch.float16)
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == get_model_config("llama-30b").num_params
    assert all(p.is_meta and p.dtype == torch.float16 for p in params)


def test_random_weights_give_varied_context_dependent_outputs(runner):
    a, b, c, d = prompts([12, 12, 12, 12], seed=3)
    outs = [dense_generate(runner.model, p, 24) for p in (a, b, c, d)]
    assert min(len(set(o)) for o in outs) >= 6 and len(set().union(*outs)) >= 48  # not stuck on a token
    assert len({tuple(o) for o in outs}) == 4
    assert outs[0] != dense_generate(runner.model, [(a[0] + 1) % 1024, *a[1:]], 24)  # not only the last token matters


def test_paged_logits_match_dense(runner):
    prompt_list = prompts(PROMPT_LENS, seed=1)
    blocks = Blocks(256, seed=1)
    tables = [blocks.table_for([], len(p) + 1, 4) for p in prompt_list]
    logits = runner.prefill_logits([SeqInput(p, 0, t) for p, t in zip(prompt_list, tables, strict=True)])
    ref = torch.stack([dense_logits(runner.model, p)[-1] for p in prompt_list])
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)

    nxt = logits.argmax(-1).tolist()
    logits = runner.decode_logits(
        [SeqInput([t], len(p), tb) for p, t, tb in zip(prompt_list, nxt, tables, strict=True)]
    )
    ref = torch.stack([dense_logits(runner.model, [*p, t])[-1] for p, t in zip(prompt_list, nxt, strict=True)])
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lens", [[5], [7, 7, 7], [6000, *[50] * 255], [1, 4, 13, 16, 29, 40, 300, 2, 90]])
def test_group_by_length_bounds_padding(lens):
    groups = group_by_length(lens)
    assert sorted(i for g in groups for i in g) == list(range(len(lens)))
    for g in groups:
        assert len(g) * max(lens[i] for i in g) <= 2 * sum(lens[i] for i in g)
    if len(set(lens)) == 1:
        assert len(groups) == 1


@pytest.mark.parametrize("block_size", [4, 16])
def test_greedy_generation_matches_dense(block_size):
    runner = ModelRunner("tiny", num_blocks=128, block_size=block_size, seed=0)
    prompt_list = prompts(PROMPT_LENS, seed=2)
    outs = paged_generate(runner, prompt_list, 12, Blocks(128, seed=block_size))
    assert outs == [dense_generate(runner.model, p, 12) for p in prompt_list]


def test_prefill_with_cached_prefix_equals_full_prefill(runner):
    (seq,) = prompts([37], seed=4)
    blocks = Blocks(256, seed=4)
    full_table, split_table = blocks.table_for([], 45, 4), blocks.table_for([], 45, 4)
    full = runner.prefill_logits([SeqInput(seq, 0, full_table)])
    (short,) = prompts([5], seed=5)  # batched with an unrelated fresh sequence
    runner.prefill([SeqInput(seq[:13], 0, split_table)])
    split, _ = runner.prefill_logits(
        [SeqInput(seq[13:], 13, split_table), SeqInput(short, 0, blocks.table_for([], 5, 4))]
    )
    torch.testing.assert_close(split, full[0], atol=1e-4, rtol=1e-4)

    tokens = {}
    for name, table in (("full", full_table), ("split", split_table)):
        out, pos = [int(full[0].argmax())], len(seq)
        for _ in range(6):
            out += runner.decode([SeqInput([out[-1]], pos, table)])
            pos += 1
        tokens[name] = out
    assert tokens["full"] == tokens["split"] == dense_generate(runner.model, seq, 7)


def test_kv_migration_copy_continues_identically():
    """Multi-stage copy as in live migration: stage 0 copies all blocks while the source keeps decoding, stage 1
    re-copies the blocks written meanwhile, then both sides decode on and must agree token for token."""
    src = ModelRunner("tiny", num_blocks=64, block_size=4, seed=7)
    dst = ModelRunner("tiny", num_blocks=96, block_size=4, seed=7)
    src_blocks, dst_blocks = Blocks(64, seed=1), Blocks(96, seed=2)
    (prompt,) = prompts([21], seed=6)
    src_table = src_blocks.table_for([], len(prompt), 4)
    out, pos = src.prefill([SeqInput(prompt, 0, src_table)]), len(prompt)

    def step(runner: ModelRunner, table: list[int], blocks: Blocks, out: list[int], pos: int) -> tuple[list[int], int]:
        return out + runner.decode([SeqInput([out[-1]], pos, blocks.table_for(table, pos + 1, 4))]), pos + 1

    for _ in range(2):  # 23 tokens cached: the last of 6 blocks is partly filled
        out, pos = step(src, src_table, src_blocks, out, pos)
    copied = len(src_table)
    dst_table = dst_blocks.table_for([], copied * 4, 4)
    dst.kv_cache.write_blocks(dst_table, src.kv_cache.read_blocks(src_table))  # stage 0
    for _ in range(5):  # source keeps running; fills the partial last block and opens a new one
        out, pos = step(src, src_table, src_blocks, out, pos)
    dirty = list(range(copied - 1, len(src_table)))
    dst_table = dst_blocks.table_for(dst_table, len(src_table) * 4, 4)
    payload = src.kv_cache.read_blocks([src_table[i] for i in dirty])
    assert (
        payload.is_contiguous()
        and payload.numel() * payload.element_size() == len(dirty) * src.kv_cache.bytes_per_block
    )
    dst.kv_cache.write_blocks([dst_table[i] for i in dirty], payload)  # stage 1 (stop-and-copy)

    src_out, src_pos, dst_out, dst_pos = list(out), pos, list(out), pos
    for _ in range(8):
        src_out, src_pos = step(src, src_table, src_blocks, src_out, src_pos)
        dst_out, dst_pos = step(dst, dst_table, dst_blocks, dst_out, dst_pos)
    assert dst_out == src_out == dense_generate(src.model, prompt, len(src_out))


def test_kv_pool_block_io_and_validation():
    pool = KVCachePool(2, 8, 4, num_kv_heads=2, head_dim=8)
    assert pool.bytes_per_block == 2 * 2 * 4 * 2 * 8 * 4
    payload = torch.randn(2, 2, 3, 4, 2, 8)
    pool.write_blocks([5, 1, 6], payload)
    torch.testing.assert_close(pool.read_blocks([5, 1, 6]), payload)
    k, _ = pool.gather(1, [1, 6], 6)
    torch.testing.assert_close(k, torch.cat([payload[1, 0, 1], payload[1, 0, 2, :2]]))
    with pytest.raises(ValueError):
        pool.write_blocks([0, 1], payload)
    with pytest.raises(ValueError):
        pool.slot_mapping([3], 2, 3)


def test_runner_rejects_bad_batches(runner):
    with pytest.raises(ValueError):
        runner.decode([SeqInput([1, 2], 3, [0, 1])])
    with pytest.raises(ValueError):
        runner.prefill([SeqInput(list(range(9)), 0, [0, 1])])
    with pytest.raises(ValueError):
        runner.prefill([])


def test_bf16_cpu_runs_close_to_fp32():
    runner = ModelRunner("tiny", num_blocks=64, block_size=16, dtype=torch.bfloat16, seed=0)
    (p,) = prompts([20], seed=8)
    logits = runner.prefill_logits([SeqInput(p, 0, [3, 9])])
    ref = dense_logits(build_model("tiny", dtype=torch.float32, seed=0), p)[-1]
    assert torch.nn.functional.cosine_similarity(logits[0], ref, dim=0) > 0.98
    assert len(runner.decode([SeqInput([int(logits[0].argmax())], 20, [3, 9])])) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_generation(dtype):
    runner = ModelRunner("tiny", num_blocks=128, block_size=16, device="cuda", dtype=dtype, seed=0)
    prompt_list = prompts(PROMPT_LENS, seed=2)
    outs = paged_generate(runner, prompt_list, 8, Blocks(128, seed=0))
    if dtype == torch.float32:
        assert outs == [dense_generate(runner.model, p, 8) for p in prompt_list]
    else:  # fused half-precision kernels round differently from the dense path; compare logits, not long greedy runs
        tables = [Blocks(128, seed=1).table_for([], len(p), 16) for p in prompt_list[:1]]
        logits = runner.prefill_logits([SeqInput(prompt_list[0], 0, tables[0])])
        ref = dense_logits(runner.model, prompt_list[0])[-1]
        assert torch.nn.functional.cosine_similarity(logits[0], ref, dim=0) > 0.999


def test_matches_huggingface_llama(runner):
    transformers = pytest.importorskip("transformers", reason="transformers not installed: HF cross-check skipped")
    cfg = runner.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position,
        tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf_weights = {}
    for name, w in runner.model.state_dict().items():
        prefix = "" if name == "lm_head.weight" else "model."
        if name.endswith("qkv_proj.weight"):
            parts = w.split([cfg.num_heads * cfg.head_dim, *[cfg.num_kv_heads * cfg.head_dim] * 2])
            for proj, part in zip("qkv", parts, strict=True):
                hf_weights[prefix + name.replace("qkv_proj", f"{proj}_proj")] = part
        elif name.endswith("gate_up_proj.weight"):
            for proj, part in zip(("gate", "up"), w.chunk(2), strict=True):
                hf_weights[prefix + name.replace("gate_up_proj", f"{proj}_proj")] = part
        else:
            hf_weights[prefix + name] = w
    hf.load_state_dict(hf_weights)
    (p,) = prompts([25], seed=9)
    with torch.inference_mode():
        ref = hf(torch.tensor([p])).logits[0].float()
    torch.testing.assert_close(dense_logits(runner.model, p), ref, atol=1e-4, rtol=1e-4)


def test_static_decode_matches_the_eager_step():
    """The fixed-shape step that CUDA graphs replay (here run eagerly on CPU): padded rows and padded context
    positions change neither the real rows' logits nor any block the sequences own."""
    from llumnix.engine.runner import StaticDecode

    runner = ModelRunner("tiny", num_blocks=64, block_size=4, seed=0)
    prompt_list = prompts([9, 12, 17], seed=5)
    blocks = Blocks(64, seed=3)
    tables = [blocks.table_for([], len(p) + 1, 4) for p in prompt_list]
    first = runner.prefill([SeqInput(p, 0, t) for p, t in zip(prompt_list, tables, strict=True)])
    seqs = [SeqInput([tok], len(p), t) for p, t, tok in zip(prompt_list, tables, first, strict=True)]
    lens = [len(p) + 1 for p in prompt_list]
    eager = runner.decode_logits(seqs)
    owned = sorted({b for t in tables for b in t})
    before = runner.kv_cache.read_blocks(owned)
    static = StaticDecode(runner, batch=4, context=32)  # one padding row, contexts padded from 10-18 to 32
    static.fill(seqs, lens)
    logits = static.run()
    assert logits.shape[0] == 4 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits[:3], eager, rtol=1e-4, atol=1e-4)
    assert logits[:3].argmax(-1).tolist() == eager.argmax(-1).tolist() == static.tokens[:3].tolist()
    # it rewrote the step's own KV (equal up to the rounding of a 4-row batch); the pad row wrote only scratch
    torch.testing.assert_close(runner.kv_cache.read_blocks(owned), before, rtol=1e-5, atol=1e-5)
    assert runner.kv_cache.scratch_slot == 64 * 4 and runner.kv_cache.cache.shape[2] == 65
    with pytest.raises(ValueError, match="CUDA"):
        ModelRunner("tiny", num_blocks=8, cuda_graphs=True)


def _paged_kernel_device() -> str | None:
    from llumnix.engine import paged_attention

    if paged_attention.available(torch.device("cuda")) and torch.cuda.is_available():
        return "cuda"
    return "cpu" if paged_attention.available(torch.device("cpu")) else None  # TRITON_INTERPRET=1


@pytest.mark.skipif(_paged_kernel_device() is None, reason="needs Triton: a CUDA device, or TRITON_INTERPRET=1")
def test_paged_decode_kernel_generates_like_the_dense_model():
    """The Triton kernel reads K/V through the block tables; fp32 greedy decoding equals the dense model's, eagerly
    and through the static (graph-replayed on CUDA) step, and its logits equal the gather path's."""
    from llumnix.engine.runner import StaticDecode

    device = _paged_kernel_device()
    kernel = ModelRunner("tiny", num_blocks=128, block_size=4, device=device, seed=0, paged_kernel=True)
    gather = ModelRunner("tiny", num_blocks=128, block_size=4, device=device, seed=0, paged_kernel=False,
                         cuda_graphs=False)
    prompt_list = prompts([3, 17, 30], seed=4)
    outs = paged_generate(kernel, prompt_list, 6, Blocks(128, seed=2))
    assert outs == [dense_generate(kernel.model, p, 6) for p in prompt_list]
    tables = [Blocks(128, seed=9).table_for([], 40, 4) for _ in range(1)]
    for r in (kernel, gather):
        r.prefill([SeqInput(prompt_list[2], 0, tables[0])])
    seqs = [SeqInput([7], len(prompt_list[2]), tables[0])]
    torch.testing.assert_close(kernel.decode_logits(seqs), gather.decode_logits(seqs), rtol=1e-4, atol=1e-4)
    static = StaticDecode(kernel, batch=2, context=64)
    static.fill(seqs, [len(prompt_list[2]) + 1])
    torch.testing.assert_close(static.run()[:1], gather.decode_logits(seqs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", [False, pytest.param(True, marks=pytest.mark.skipif(
    _paged_kernel_device() is None, reason="needs Triton: a CUDA device, or TRITON_INTERPRET=1"))])
def test_batch_invariant_decoding(kernel):
    """With invariant_batch, a sequence's decode logits are the same bits alone, beside others, or in a later chunk
    of a batch larger than the chunk; greedy decoding still equals the dense model's."""
    device = _paged_kernel_device() if kernel else "cpu"
    runner = ModelRunner("tiny", num_blocks=256, block_size=4, device=device, seed=0, paged_kernel=kernel,
                         invariant_batch=4)
    prompt_list = prompts([23, 5, 40, 11, 31, 2, 17], seed=6)
    assert paged_generate(runner, prompt_list[:3], 5, Blocks(256, seed=3)) == [
        dense_generate(runner.model, p, 5) for p in prompt_list[:3]]
    blocks = Blocks(256, seed=5)
    tables = [blocks.table_for([], len(p) + 1, 4) for p in prompt_list]
    runner.prefill([SeqInput(p, 0, t) for p, t in zip(prompt_list, tables, strict=True)])
    seqs = [SeqInput([9], len(p), t) for p, t in zip(prompt_list, tables, strict=True)]
    alone = runner.decode_logits(seqs[:1])
    assert runner.decode_logits(seqs[:3])[0].equal(alone[0])
    everyone = runner.decode_logits(seqs[1:] + seqs[:1])  # 7 rows: chunks of 4 and 3 (+1 padding row)
    assert everyone[-1].equal(alone[0])
    assert everyone[:3].equal(runner.decode_logits(seqs[1:4]))
    # the greedy tokens (in a static step, taken from its buffers chunk by chunk) are those logits' argmax
    assert runner.decode(seqs[1:] + seqs[:1]) == everyone.argmax(-1).tolist()
    assert runner.decode(seqs[:1]) == alone.argmax(-1).tolist()
    with pytest.raises(ValueError, match="invariant_batch"):
        ModelRunner("tiny", num_blocks=8, invariant_batch=0)


def test_a_failed_graph_capture_falls_back_to_eager_decoding(monkeypatch):
    """If a decode step cannot be captured as a CUDA graph, the runner decodes eagerly (same tokens) from then on."""
    from llumnix.engine.runner import StaticDecode

    runner = ModelRunner("tiny", num_blocks=64, block_size=4, seed=0)
    eager = paged_generate(runner, prompts([5, 9], seed=1), 4, Blocks(64, seed=0))

    def fail(self, pool):  # the way a kernel that synchronises with the host fails under capture
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StaticDecode, "capture", fail)
    again = ModelRunner("tiny", num_blocks=64, block_size=4, seed=0)
    again.cuda_graphs = True  # as on CUDA
    assert paged_generate(again, prompts([5, 9], seed=1), 4, Blocks(64, seed=0)) == eager
    assert again.cuda_graphs is False and not again._static


def test_decode_graph_blas_workspace_is_set_for_the_capture_and_restored(monkeypatch):
    """runner._blas_workspace: torch's size setter where torch has one, else CUBLAS_WORKSPACE_CONFIG for the while
    (torch 2.11 reads it whenever it makes a workspace); either way the size before comes back, also after an error;
    None leaves everything alone."""
    env = runner_module.CUBLAS_WORKSPACE_ENV
    sizes = [32 << 20]

    def set_size(size=None):
        if size is not None:
            sizes.append(size)
        return sizes[-1]

    monkeypatch.setattr(torch.backends.cuda, "cublas_workspace_size", set_size, raising=False)
    with pytest.raises(RuntimeError), runner_module._blas_workspace(0):
        assert set_size() == 0
        raise RuntimeError("capture failed")
    assert sizes == [32 << 20, 0, 32 << 20]
    monkeypatch.delattr(torch.backends.cuda, "cublas_workspace_size")
    for before in (None, ":4096:8"):
        if before is None:
            monkeypatch.delenv(env, raising=False)
        else:
            monkeypatch.setenv(env, before)
        with runner_module._blas_workspace(0):
            assert os.environ[env] == ":0:1"
        assert os.environ.get(env) == before
    with runner_module._blas_workspace(None):
        assert os.environ.get(env) == before
