"""The model a vLLM instance serves: a Hugging Face model directory, a random-weight LLaMA written to one, or a real
model (``llumnix.engine.gguf_model``) written to one from the same dequantised weights the torch engine loads.

vLLM loads models from disk and no weights can be downloaded here, so ``--backend vllm --model tiny`` writes a LLaMA of
the torch preset's shape (``llumnix.engine.model.PRESETS``) with random weights from ``seed`` into a cache directory
once, and every instance (each its own process, possibly on another node) loads the same directory or writes an
identical one: the same seed gives the same weights, so a migrated request continues token for token.

Nothing here imports vLLM: the frontend process checks a configuration without it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

# Larger than LLaMA's 0.02 so that greedy decoding of random weights does not collapse onto one token.
INITIALIZER_RANGE = 0.2
RECIPE_VERSION = 1  # bump when the weights a (preset, seed) gives change: cached directories are then rewritten
RECIPE_FILE = "llumnix_model.json"
VLLM_CPU_BLOCK_MULTIPLE = 32  # vLLM's CPU attention takes block sizes that are multiples of 32


class VllmUnavailableError(RuntimeError):
    """``vllm`` cannot be imported in this environment."""


def require_vllm() -> None:
    """Raise with the fix when ``vllm`` is not importable (it lives in its own venv)."""
    if importlib.util.find_spec("vllm") is None:
        raise VllmUnavailableError(
            "the vllm backend needs vLLM, which is not installed in this environment: run `make install-vllm` and "
            "start llumnix from the vLLM venv (.venv-vllm/bin/llumnix or .venv-vllm/bin/python -m llumnix.cli)"
        )


def model_cache_dir() -> Path:
    """Where preset models are written: ``$LLUMNIX_MODEL_CACHE``, else ``~/.cache/llumnix/models``."""
    from llumnix.engine.gguf_model import model_cache_dir as engine_cache_dir

    return engine_cache_dir()


def is_preset(model: str) -> bool:
    from llumnix.engine.model import PRESETS

    return model in PRESETS


def check_model(model: str) -> None:
    """Raise ValueError unless ``model`` is a preset name, a real model's (installed) or a model directory (one with
    a config.json)."""
    from llumnix.engine.gguf_model import REAL_MODELS, gguf_path, is_real_model
    from llumnix.engine.model import PRESETS

    if is_real_model(model):
        gguf_path(model)  # raises, naming the pip command, when its package is not installed
        return
    if is_preset(model) or (Path(model) / "config.json").is_file():
        return
    raise ValueError(
        f"vllm backend: model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}: random weights), a real "
        f"model ({', '.join(REAL_MODELS)}) nor a Hugging Face model directory with a config.json"
    )


def write_real_llama(path: Path | str, name: str) -> Path:
    """Save real model ``name`` (the same dequantised fp32 weights as the torch engine's, ``gguf_model``) as a Hugging
    Face ``LlamaForCausalLM`` directory: vLLM 0.32's CPU build has no GGUF loader, so it serves this instead."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from llumnix.engine import gguf_model

    model = gguf_model.load_model(name)
    cfg = model.config
    meta = json.loads((gguf_model.prepare(name) / "config.json").read_text())
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=meta["tie_word_embeddings"], eos_token_id=sorted(meta["stop_token_ids"]),
        torch_dtype=torch.float32,
    )  # fmt: skip
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_cfg.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in gguf_model.to_hf_state_dict(model).items()}, path / "model.safetensors")
    (path / RECIPE_FILE).write_text(json.dumps({"version": RECIPE_VERSION, "real_model": name}, indent=2) + "\n")
    return path


def _recipe(preset: str, seed: int) -> dict:
    from dataclasses import asdict

    from llumnix.engine.model import PRESETS

    return {
        "version": RECIPE_VERSION,
        "preset": preset,
        "seed": seed,
        "initializer_range": INITIALIZER_RANGE,
        **asdict(PRESETS[preset]),
    }


def write_random_llama(path: Path | str, preset: str = "tiny", seed: int = 0) -> Path:
    """Save a ``LlamaForCausalLM`` of the preset's shape with random weights (float32) from ``seed`` into ``path``."""
    import torch
    import transformers

    recipe = _recipe(preset, seed)
    cfg = transformers.LlamaConfig(
        vocab_size=recipe["vocab_size"],
        hidden_size=recipe["hidden_size"],
        intermediate_size=recipe["intermediate_size"],
        num_hidden_layers=recipe["num_layers"],
        num_attention_heads=recipe["num_heads"],
        num_key_value_heads=recipe["num_kv_heads"],
        max_position_embeddings=recipe["max_position"],
        rope_theta=recipe["rope_theta"],
        rms_norm_eps=recipe["rms_norm_eps"],
        initializer_range=INITIALIZER_RANGE,
        tie_word_embeddings=False,
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    (path / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    return path


def ensure_model_dir(model: str, seed: int = 0, cache_dir: Path | None = None) -> str:
    """The directory vLLM loads for ``model``: itself if it is a model directory, else the preset's random LLaMA with
    ``seed``, written under ``cache_dir`` (default :func:`model_cache_dir`) unless an identical one is there, or a real
    model's weights, written into its GGUF cache directory (``gguf_model.prepare``; ``cache_dir`` and ``seed`` unused).
    Concurrent callers are safe: each writes a private directory and renames it into place; the first rename wins."""
    from llumnix.engine import gguf_model

    check_model(model)
    real = gguf_model.is_real_model(model)
    if not (real or is_preset(model)):
        return str(Path(model))
    if real:  # beside the torch engine's cache of the same GGUF (its directory name carries the file's hash)
        target = gguf_model.prepare(model) / f"hf-v{RECIPE_VERSION}"
        root = target.parent
        recipe = {"version": RECIPE_VERSION, "real_model": model}
    else:
        root = Path(cache_dir) if cache_dir is not None else model_cache_dir()
        target = root / f"{model}-llama-seed{seed}-v{RECIPE_VERSION}"
        recipe = _recipe(model, seed)
    if _complete(target, recipe):
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        if real:
            write_real_llama(tmp, model)
        else:
            write_random_llama(tmp, model, seed)
        with contextlib.suppress(OSError):  # another process renamed its copy first
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _complete(target, recipe):
        raise RuntimeError(
            f"could not write the {model} model to {target}: is the directory writable, or does it hold a stale "
            "copy (then delete it)?"
        )
    return str(target)


def max_positions(model_dir: str) -> int | None:
    """The model's ``max_position_embeddings`` (its config.json), or None when it does not say."""
    try:
        value = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return int(value) if value else None


def _complete(path: Path, recipe: dict) -> bool:
    try:
        return json.loads((path / RECIPE_FILE).read_text()) == recipe
    except (OSError, ValueError):
        return False


__all__ = [
    "VLLM_CPU_BLOCK_MULTIPLE",
    "VllmUnavailableError",
    "check_model",
    "ensure_model_dir",
    "is_preset",
    "max_positions",
    "model_cache_dir",
    "require_vllm",
    "write_random_llama",
    "write_real_llama",
]
