"""Configuration of the serving cluster (``llumnix serve``): a validated model loaded from YAML, overridden by flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llumnix.policies.scaling import ScalingConfig
from llumnix.policies.system import SYSTEMS


class ServeConfigError(ValueError):
    """A config file or flag combination is invalid; the message names the field and the fix."""


class InstanceSpec(BaseModel):
    """What every instance actor builds: its executor, KV pool and scheduler limits (all instances are alike)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["torch", "profile", "vllm"] = Field(
        "torch", description="torch: the paged-KV LLaMA; profile: timed sleeps; vllm: a vLLM engine per instance"
    )
    model: str = Field(
        "tiny",
        description="model preset (llumnix.engine.model.PRESETS); vllm: also a Hugging Face model directory "
        "(a preset becomes a random-weight LLaMA of its shape, written once to a cache directory)",
    )
    profile: str = Field("a10-llama-7b", description="step-time profile of the profile backend (name or JSON path)")
    speed: float = Field(1.0, gt=0, description="profile backend: steps run this many times faster than profiled")
    num_blocks: int | None = Field(
        None, ge=1, description="KV blocks per instance (torch default 256; profile: its own; vllm: as vLLM sizes it)"
    )
    block_size: int = Field(16, ge=1, description="tokens per KV block (vllm default 32: its CPU attention needs it)")
    device: Literal["cpu", "cuda"] = Field("cpu", description="torch backend device")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="torch backend dtype")
    seed: int = Field(0, description="weight seed: every instance uses the same one, so all serve the same model")
    torch_threads: int = Field(1, ge=1, description="intra-op CPU threads of each instance's torch")
    invariant_batch: int | None = Field(
        None, ge=1,
        description="torch backend: batch-invariant decoding, every decode step run as chunks of exactly this many "
        "rows, so a request's tokens do not depend on the other requests of its steps (nor on a migration)",
    )
    watermark: float = Field(0.01, ge=0, lt=1, description="fraction of KV blocks kept free when admitting prompts")
    max_num_seqs: int = Field(256, ge=1, description="most running sequences per instance")
    max_batched_tokens: int = Field(12_288, ge=1, description="most prompt tokens in one prefill step")
    priorities: bool = Field(False, description="honour request priorities (headroom, queue jumping, no migration)")
    local_priority: Literal["artifact", "strict", "off"] = Field(
        "artifact", description="with priorities: how an instance's own queue treats them (llumnix.core.local_scheduler)"
    )
    candidate: Literal["lcfs", "artifact"] = Field("lcfs", description="which running request a source migrates")
    preemption: Literal["no_free_block", "block_needed"] = Field(
        "no_free_block", description="when a decode pass preempts: vLLM 0.1's rule, or only when a block is needed"
    )
    last_stage_blocks: int = Field(2, ge=0, description="blocks left at which a migration stops and copies")
    max_stages: int = Field(8, ge=1, description="most migration stages before the stop-and-copy stage is forced")
    vllm_migration: Literal["recompute", "kv"] = Field(
        "recompute",
        description="vllm backend: a migrated request's destination recomputes its tokens so far, or loads their KV "
        "copied from the source (both blocking)",
    )

    @model_validator(mode="before")
    @classmethod
    def _vllm_block_size(cls, data: Any) -> Any:
        """vLLM's CPU attention takes multiples of 32 only: that is the vllm backend's default block size."""
        if isinstance(data, dict) and data.get("backend") == "vllm" and "block_size" not in data:
            from llumnix.runtime.vllm_model import VLLM_CPU_BLOCK_MULTIPLE

            data = {**data, "block_size": VLLM_CPU_BLOCK_MULTIPLE}
        return data

    @model_validator(mode="after")
    def _check(self) -> InstanceSpec:
        if self.backend == "torch":
            from llumnix.engine.model import PRESETS

            if self.model not in PRESETS:
                raise ValueError(f"unknown model {self.model!r}; choose one of {sorted(PRESETS)}")
        if self.backend == "profile" and self.device != "cpu":
            raise ValueError("the profile backend runs no model: leave device at cpu")
        if self.backend != "torch" and self.invariant_batch is not None:
            raise ValueError(f"invariant_batch is a torch backend setting; drop it with backend {self.backend}")
        if self.backend == "vllm":
            from llumnix.runtime.vllm_model import VLLM_CPU_BLOCK_MULTIPLE, check_model

            check_model(self.model)
            if self.device == "cpu" and self.block_size % VLLM_CPU_BLOCK_MULTIPLE:
                raise ValueError(
                    f"block_size {self.block_size}: vLLM's CPU attention needs a multiple of "
                    f"{VLLM_CPU_BLOCK_MULTIPLE}; use --block-size {VLLM_CPU_BLOCK_MULTIPLE} (the vllm default)"
                )
        return self

    @property
    def model_name(self) -> str:
        """The model's name in API responses."""
        if self.backend == "profile":
            return f"profile:{self.profile}"
        return f"vllm:{self.model}" if self.backend == "vllm" else self.model


class ServeConfig(BaseModel):
    """``llumnix serve``: one Ray actor per instance, a global scheduler and the HTTP frontend in this process."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = Field(None, description="Ray cluster to join (None: start a local one)")
    instances: int = Field(2, ge=1, description="number of instance actors")
    policy: str = Field("llumnix", description="round-robin, infaas++ or llumnix")
    migration: bool = Field(True, description="migrate requests between instances (llumnix policy only)")
    migration_threshold: float = Field(3.0, description="freeness below which an instance sends, above which it receives")
    pairing_interval_s: float = Field(0.1, gt=0, description="seconds between migration pairing rounds")
    kv_transport: Literal["object-store", "gloo", "nccl"] = Field(
        "object-store", description="how migrating KV travels: Ray's object store, or a torch.distributed channel "
        "per instance pair (gloo: through host memory; nccl: GPU to GPU, --device cuda)"
    )
    kv_timeout_s: float = Field(60.0, gt=0, description="gloo / nccl: a channel's opening or one stage's transfer "
                                "fails (aborting the migration) after this long")
    host: str = Field("127.0.0.1", description="HTTP bind address")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port")
    num_cpus_per_instance: float = Field(1.0, ge=0, description="Ray CPUs reserved by each instance actor")
    num_gpus_per_instance: float | None = Field(
        None, ge=0, description="Ray GPUs of each instance actor, fractions allowed (default: 1 on cuda, else 0)"
    )
    poll_timeout_s: float = Field(0.5, gt=0, description="an idle instance reports its load at least this often")
    startup_timeout_s: float = Field(600.0, gt=0, description="seconds the instance actors may take to start")
    # Auto-scaling (the simulator's Scaler): keep the average freeness of the instances within [scale_up, scale_down].
    autoscale: bool = Field(False, description="start / drain instances on the cluster's average freeness")
    scale_up: float = Field(10.0, description="average freeness below which an instance is started")
    scale_down: float = Field(60.0, description="average freeness above which the least-loaded instance is drained")
    min_instances: int = Field(1, ge=1, description="auto-scaling lower bound")
    max_instances: int = Field(16, ge=1, description="auto-scaling upper bound")
    initial_instances: int | None = Field(None, ge=1, description="instances at start with autoscale (default: instances)")
    scale_interval_s: float = Field(10.0, gt=0, description="seconds between auto-scaling decisions")
    scale_first_check_s: float = Field(110.0, ge=0, description="no auto-scaling decision before this (artifact: 110 s)")
    scale_down_queued: bool = Field(True, description="the scale-down freeness counts queued requests (artifact)")
    requeue_on_drain: bool = Field(False, description="a drained instance hands its queued requests back for "
                                   "re-dispatch (the artifact serves them where they are)")
    scaling_rule: Literal["artifact", "mean-freeness"] = Field("artifact", description="the auto-scaling rule")
    startup_delay_s: float = Field(
        0.0, ge=0, description="extra seconds a new instance waits, once its engine is up, before it takes requests"
    )
    instance: InstanceSpec = Field(default_factory=InstanceSpec)

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.policy not in SYSTEMS:
            raise ValueError(f"policy must be one of {', '.join(SYSTEMS)}, got {self.policy!r}")
        if self.kv_transport == "nccl" and self.instance.device != "cuda":
            raise ValueError("kv_transport nccl sends KV between GPUs: it needs device cuda (gloo works on CPU)")
        if self.instance.backend == "vllm" and self.kv_transport != "object-store":
            raise ValueError(
                "the vllm backend sends a migrating request's KV in the migration call itself (vllm_migration kv): "
                "leave kv_transport at object-store"
            )
        if self.autoscale:
            self.scaling_config()  # raises on an inverted range or bounds
            n = self.initial_count
            if not self.min_instances <= n <= self.max_instances:
                raise ValueError(
                    f"the initial number of instances ({n}) must lie within [min_instances ({self.min_instances}), "
                    f"max_instances ({self.max_instances})]"
                )
        return self

    @property
    def initial_count(self) -> int:
        """Instances started with the cluster."""
        if self.autoscale and self.initial_instances is not None:
            return self.initial_instances
        return self.instances

    def scaling_config(self) -> ScalingConfig | None:
        """The simulator's ``ScalingConfig`` for these settings (None without autoscale)."""
        if not self.autoscale:
            return None
        return ScalingConfig(
            scale_up=self.scale_up,
            scale_down=self.scale_down,
            min_instances=self.min_instances,
            max_instances=self.max_instances,
            check_interval_s=self.scale_interval_s,
            startup_delay_s=self.startup_delay_s,
            first_check_s=self.scale_first_check_s,
            scale_down_queued=self.scale_down_queued,
            requeue_on_drain=self.requeue_on_drain,
            rule=self.scaling_rule,
        )

    @property
    def gpus_per_instance(self) -> float:
        if self.num_gpus_per_instance is not None:
            return self.num_gpus_per_instance
        return 1.0 if self.instance.device == "cuda" else 0.0

    @property
    def migrates(self) -> bool:
        return self.migration and self.policy == "llumnix"


# Flags that belong to the instance spec rather than to the cluster (flat names on the command line and in YAML).
INSTANCE_FIELDS = frozenset(InstanceSpec.model_fields)
# Flag spellings accepted in YAML too, for the fields whose names carry a unit.
ALIASES = {
    "pairing_interval": "pairing_interval_s",
    "scale_interval": "scale_interval_s",
    "startup_delay": "startup_delay_s",
}


def build_serve_config(file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> ServeConfig:
    """Merge a YAML mapping (flat, or with an ``instance:`` section) with flag overrides; flags win."""
    merged: dict[str, Any] = {}
    instance: dict[str, Any] = {}
    for source in (file_values or {}, overrides or {}):
        for key, value in source.items():
            key = key.replace("-", "_")
            key = ALIASES.get(key, key)
            if key == "instance":
                if not isinstance(value, dict):
                    raise ServeConfigError("'instance' must be a mapping of instance settings")
                instance.update({k.replace("-", "_"): v for k, v in value.items()})
            elif key in INSTANCE_FIELDS:
                instance[key] = value
            else:
                merged[key] = value
    try:
        return ServeConfig(**merged, instance=InstanceSpec(**instance))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in e.errors())
        raise ServeConfigError(f"invalid serve config: {problems}") from None


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ServeConfigError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data
