"""LLaMA-architecture decoder (RMSNorm, rotary embeddings, SwiGLU, grouped-query attention) with seeded random weights
(the ``PRESETS`` shapes) or a real model's (``llumnix.engine.gguf_model``).

The model knows nothing about paging: each layer hands its rotated q/k/v to an ``attn`` callback chosen by the caller
(the paged ModelRunner or the dense reference), so the same weights serve both. Module names follow Hugging Face's
LlamaForCausalLM (minus its ``model.`` prefix), except that q/k/v and gate/up are fused into ``qkv_proj`` and
``gate_up_proj`` (fewer kernel launches per layer; HF weights are their concatenation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from llumnix.engine import fused_ops

# (layer index, q [T, heads, head_dim], k [T, kv_heads, head_dim], v [T, kv_heads, head_dim]) -> [T, heads, head_dim].
# An attention may also have ``rope_store(layer, qkv, cos, sin) -> q``: the rotary embedding of the unrotated
# qkv [T, heads + 2 kv_heads, head_dim] with the keys and values written into its KV cache in one kernel
# (``fused_ops.rope_store``); the fused model then calls it and the attention with k and v None (already written).
AttnFn = Callable[[int, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    # Fig 10 migrates sequences of up to 8k tokens; the weights are random, so no trained context limit applies.
    max_position: int = 8192

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"ModelConfig.{f.name} must be positive, got {getattr(self, f.name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_params(self) -> int:
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate_size + 2 * h
        return self.num_layers * per_layer + 2 * self.vocab_size * h + h

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype.itemsize


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=2
    ),
    # ~10x the per-token compute of tiny: big enough for CPU step-time profiles to show batch/length effects.
    "small": ModelConfig(
        vocab_size=4096, hidden_size=512, intermediate_size=1376, num_layers=10, num_heads=8, num_kv_heads=4
    ),
    "llama-7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32
    ),
    "llama-30b": ModelConfig(
        vocab_size=32000, hidden_size=6656, intermediate_size=17920, num_layers=60, num_heads=52, num_kv_heads=52
    ),
}


def model_names() -> list[str]:
    """Every model name the engine knows: the random-weight presets, then the real models (``gguf_model``)."""
    from llumnix.engine.gguf_model import REAL_MODELS

    return [*PRESETS, *REAL_MODELS]


def get_model_config(name: str) -> ModelConfig:
    from llumnix.engine import gguf_model

    if gguf_model.is_real_model(name):
        return gguf_model.model_config(name)
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")
    return PRESETS[name]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, 1, head_dim] for absolute positions [T]: computed in fp32, then cast (half-split layout, as HF)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., kv_heads, D] -> [..., heads, D]; query head h reads kv head h // (heads // kv_heads)."""
    groups = num_heads // x.shape[-2]
    return x if groups == 1 else x.repeat_interleave(groups, dim=-2)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [Sq, H, D] are the last Sq positions of the Sk >= Sq keys k/v [Sk, KVH, D]; returns [Sq, H, D]."""
    sq, sk, heads = q.shape[0], k.shape[0], q.shape[1]
    # [1, heads, S, D]: the fused (flash / memory-efficient) SDPA kernels want 4-D inputs.
    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, repeat_kv(k, heads), repeat_kv(v, heads)))
    if sq == sk:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    else:  # SDPA's is_causal aligns top-left; a cached prefix needs the diagonal shifted by its length.
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return out[0].transpose(0, 1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttnFn,
                fused: bool = False) -> torch.Tensor:  # fmt: skip
        t, nq, nkv = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(t, nq + 2 * nkv, self.head_dim)
        rope_store = getattr(attn, "rope_store", None) if fused else None
        if rope_store is not None:  # rotary + KV cache write in one kernel; the attention only reads
            q = rope_store(self.layer_idx, qkv, cos, sin)
            return self.o_proj(attn(self.layer_idx, q, None, None).reshape(t, -1))
        rotate = fused_ops.rope if fused else apply_rope
        q, k = rotate(qkv[:, : nq + nkv], cos, sin).split([nq, nkv], dim=1)
        return self.o_proj(attn(self.layer_idx, q, k, qkv[:, nq + nkv :]).reshape(t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if fused:
            return self.down_proj(fused_ops.silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttnFn) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """Flat token layout: every call processes T tokens (any mix of sequences) as one [T, hidden] batch.

    ``fused_ops`` (set by the runner where Triton runs): each residual add with the next RMS norm, the rotary
    embedding and SiLU-times-up run as one kernel each (``fused_ops``), the same arithmetic in fewer launches; with
    an attention that has ``rope_store`` (decode over the paged pool), the rotary writes the KV cache too."""

    fused_ops = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttnFn) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden] (call compute_logits on the rows you need)."""
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        if self.fused_ops:
            return self._forward_fused(x, cos, sin, attn)
        for layer in self.layers:
            x = layer(x, cos, sin, attn)
        return self.norm(x)

    def _forward_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttnFn) -> torch.Tensor:
        """``forward`` with each residual add folded into the next norm: h = norm(x); per layer x += attn(h),
        h = norm(x), x += mlp(h), h = next norm(x); the last next norm is the final one."""
        eps = self.config.rms_norm_eps
        h, x = fused_ops.add_rms_norm(x, self.layers[0].input_layernorm.weight, eps)
        for i, layer in enumerate(self.layers):
            h, x = fused_ops.add_rms_norm(layer.self_attn(h, cos, sin, attn, fused=True),
                                          layer.post_attention_layernorm.weight, eps, residual=x)
            nxt = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            h, x = fused_ops.add_rms_norm(layer.mlp(h, fused=True), nxt.weight, eps, residual=x)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def build_model(
    config: ModelConfig | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LlamaForCausalLM:
    """Allocate uninitialised weights directly on `device` in `dtype`, then fill them from a seeded generator there.

    Linear weights ~ N(0, 1/fan_in) (std 0.016 at LLaMA-7B's 4096, i.e. the usual ~0.02), embeddings ~ N(0, 1),
    norms = 1. A flat 0.02 would leave a small model's attention near uniform and its embeddings swamped, and greedy
    decoding would repeat one token; this keeps outputs varied and context-dependent, which the tests rely on.
    Values are drawn in fp32 one tensor at a time and cast, so the same seed and device type give the same weights
    in every dtype (CPU and CUDA generators differ). On the meta device nothing is allocated or initialised.
    A real model's name (``gguf_model.REAL_MODELS``) loads its weights instead (``seed`` unused).
    """
    if isinstance(config, str):
        from llumnix.engine import gguf_model

        if gguf_model.is_real_model(config):
            return gguf_model.load_model(config, device, dtype)
        config = get_model_config(config)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model = model.to_empty(device=device).requires_grad_(False).eval()
    if device.type == "meta":
        return model
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                std = 1.0 if name.startswith("embed_tokens") else p.shape[1] ** -0.5
                p.copy_(torch.empty(p.shape, dtype=torch.float32, device=device).normal_(0.0, std, generator=gen))
    return model
