"""The model a vLLM instance serves: a Hugging Face model directory, or a random-weight LLaMA written to one.

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
    return Path(os.environ.get("LLUMNIX_MODEL_CACHE") or Path.home() / ".cache" / "llumnix" / "models")


def is_preset(model: str) -> bool:
    from llumnix.engine.model import PRESETS

    return model in PRESETS


def check_model(model: str) -> None:
    """Raise ValueError unless ``model`` is a preset name or a model directory (one with a config.json)."""
    from llumnix.engine.model import PRESETS

    if is_preset(model) or (Path(model) / "config.json").is_file():
        return
    raise ValueError(
        f"vllm backend: model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}: random weights) nor a "
        "Hugging Face model directory with a config.json"
    )


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
    ``seed``, written under ``cache_dir`` (default :func:`model_cache_dir`) unless an identical one is there.
    Concurrent callers are safe: each writes a private directory and renames it into place; the first rename wins."""
    check_model(model)
    if not is_preset(model):
        return str(Path(model))
    root = Path(cache_dir) if cache_dir is not None else model_cache_dir()
    target = root / f"{model}-llama-seed{seed}-v{RECIPE_VERSION}"
    if _complete(target, model, seed):
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        write_random_llama(tmp, model, seed)
        with contextlib.suppress(OSError):  # another process renamed its copy first
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _complete(target, model, seed):
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


def _complete(path: Path, preset: str, seed: int) -> bool:
    try:
        return json.loads((path / RECIPE_FILE).read_text()) == _recipe(preset, seed)
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
]
