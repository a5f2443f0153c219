"""Real inference engine: a LLaMA-architecture model in torch over a paged KV cache (CPU and CUDA)."""

from llumnix.engine.kv_cache import KVCachePool
from llumnix.engine.model import PRESETS, LlamaForCausalLM, ModelConfig, build_model, get_model_config
from llumnix.engine.runner import ModelRunner, SeqInput, dense_generate, dense_logits

__all__ = [
    "PRESETS",
    "KVCachePool",
    "LlamaForCausalLM",
    "ModelConfig",
    "ModelRunner",
    "SeqInput",
    "build_model",
    "dense_generate",
    "dense_logits",
    "get_model_config",
]
