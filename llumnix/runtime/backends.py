"""Instance backends by name, imported only when used (the shape of vLLM's KV-connector factory): what an instance
actor runs its requests on. A backend is an actor class and, for the actors that step one of our executors, a function
that builds the executor from an ``InstanceSpec``. Adding one is one ``register_backend`` line here.

- ``torch``: our paged-KV LLaMA (``TorchExecutor``) in ``InstanceActor``;
- ``profile``: no model, steps and migration stages take a step-time profile's time (``ProfileExecutor``);
- ``vllm``: a vLLM engine per instance (``VllmInstanceActor``; its own virtual environment, see docs/vllm.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llumnix.engine.executor import Executor
    from llumnix.runtime.serve_config import InstanceSpec

PROFILE_VOCAB_SIZE = 32_000  # the profile executor's synthetic tokens (llumnix.engine.executor.synthetic_token)


@dataclass(frozen=True)
class Backend:
    actor: str  # "module:Class" of its instance actor
    executor: str | None = None  # "module:function" building (executor, info) from a spec; None: the actor builds it
    check: str | None = None  # "module:function" raising one clear error when the backend cannot run here


_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, backend: Backend) -> None:
    if name in _BACKENDS:
        raise ValueError(f"backend {name!r} registered twice")
    _BACKENDS[name] = backend


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _backend(name: str) -> Backend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(backend_names())}") from None


def actor_class(spec: InstanceSpec) -> type:
    """The instance actor class of ``spec.backend`` (after its check: one clear error if it cannot run here)."""
    backend = _backend(spec.backend)
    if backend.check is not None:
        _load(backend.check)()
    return _load(backend.actor)


def build_executor(spec: InstanceSpec) -> tuple[Executor, dict[str, Any]]:
    """The executor of ``spec`` and what the frontend must know about it (vocabulary, context length, KV size)."""
    backend = _backend(spec.backend)
    if backend.executor is None:
        raise ValueError(f"the {spec.backend} backend's actor builds its own engine")
    return _load(backend.executor)(spec)


def torch_executor(spec: InstanceSpec) -> tuple[Executor, dict[str, Any]]:
    import torch

    from llumnix.engine.executor import TorchExecutor

    torch.set_num_threads(spec.torch_threads)
    ex = TorchExecutor(spec.model, spec.num_blocks or 256, spec.block_size, spec.device, spec.dtype, spec.seed,
                       invariant_batch=spec.invariant_batch)
    cfg = ex.runner.config
    info = {
        "vocab_size": cfg.vocab_size,
        "max_position": cfg.max_position,
        "kv_bytes_per_block": ex.runner.kv_cache.bytes_per_block,
        "model": spec.model,
    }
    return ex, info


def profile_executor(spec: InstanceSpec) -> tuple[Executor, dict[str, Any]]:
    from llumnix.engine.executor import ProfileExecutor
    from llumnix.profiles import Profile

    profile = Profile.load(spec.profile)
    update = {}
    if spec.num_blocks is not None:
        update["total_blocks"] = spec.num_blocks
    if spec.block_size != profile.block_size:
        update["block_size"] = spec.block_size
    if update:
        profile = profile.model_copy(update=update)
    info = {
        "vocab_size": PROFILE_VOCAB_SIZE,
        "max_position": profile.total_blocks * profile.block_size,
        "kv_bytes_per_block": profile.kv_bytes_per_token * profile.block_size,
        "model": f"profile:{profile.name}",
    }
    return ProfileExecutor(profile, speed=spec.speed), info


register_backend("torch", Backend("llumnix.runtime.instance_actor:InstanceActor", f"{__name__}:torch_executor"))
register_backend("profile", Backend("llumnix.runtime.instance_actor:InstanceActor", f"{__name__}:profile_executor"))
register_backend("vllm", Backend("llumnix.runtime.vllm_actor:VllmInstanceActor",
                                 check="llumnix.runtime.vllm_model:require_vllm"))

