"""Step-time profiles: how long a prefill step, a decode step and a KV migration stage take on one instance.

A profile is a JSON file (format in ``llumnix/profiles/README.md``) holding measurement tables plus scalar costs. At load
the tables are fitted once, by non-negative least squares on relative error, to

    prefill forward(seq_lens)          = a + b * sum(L) + c * sum(L^2)
    decode forward(batch, context)     = d0 + d1 * batch + d2 * context_tokens

and the per-call functions below are plain float arithmetic on the cached coefficients: the simulator calls them once
per step, millions of times per run.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Sequence
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FORMAT_VERSION = 1
_PROFILE_SUFFIX = ".json"


class ProfileError(ValueError):
    """A profile could not be found, parsed or validated; the message names the problem and the fix."""


class PrefillPoint(BaseModel):
    """One measured prefill forward: a batch of whole prompts processed in one step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    total_tokens: int = Field(gt=0, description="sum of the prompt lengths in the batch, tokens")
    sum_sq_tokens: int | None = Field(
        default=None,
        gt=0,
        description="sum of the squared prompt lengths, tokens^2 (drives the attention term); "
        "omitted means a single sequence, i.e. total_tokens^2",
    )
    time_s: float = Field(gt=0, description="model forward time, seconds, excluding step_overhead_s")

    @model_validator(mode="after")
    def _check_sum_sq(self) -> PrefillPoint:
        # Each length L >= 1 gives sum(L) <= sum(L^2) <= sum(L)^2.
        if self.sum_sq_tokens is not None and not (self.total_tokens <= self.sum_sq_tokens <= self.total_tokens**2):
            raise ValueError(
                f"sum_sq_tokens={self.sum_sq_tokens} is impossible for total_tokens={self.total_tokens}: "
                f"it must lie in [total_tokens, total_tokens^2]"
            )
        return self

    @property
    def effective_sum_sq_tokens(self) -> int:
        return self.total_tokens**2 if self.sum_sq_tokens is None else self.sum_sq_tokens


class DecodePoint(BaseModel):
    """One measured decode forward: every running sequence generates one token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(gt=0, description="number of sequences decoded in the step")
    total_context_tokens: int = Field(gt=0, description="sum over the batch of tokens already in the KV cache")
    time_s: float = Field(gt=0, description="model forward time, seconds, excluding step_overhead_s")

    @model_validator(mode="after")
    def _check_context(self) -> DecodePoint:
        if self.total_context_tokens < self.batch_size:
            raise ValueError(
                f"total_context_tokens={self.total_context_tokens} is below batch_size={self.batch_size}: "
                "every sequence holds at least one token"
            )
        return self


class BlockingCopyPoint(BaseModel):
    """One measured stop-the-world copy of a request's whole KV cache to another instance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_tokens: int = Field(gt=0, description="tokens whose KV was copied")
    time_s: float = Field(gt=0, description="wall time of the copy, seconds")


class PrefillFit(NamedTuple):
    """prefill forward time = fixed_s + per_token_s * sum(L) + per_sq_token_s * sum(L^2)."""

    fixed_s: float
    per_token_s: float
    per_sq_token_s: float


class DecodeFit(NamedTuple):
    """decode forward time = fixed_s + per_seq_s * batch_size + per_context_token_s * total_context_tokens."""

    fixed_s: float
    per_seq_s: float
    per_context_token_s: float


class BlockingCopyFit(NamedTuple):
    """blocking copy time = fixed_s + per_token_s * num_tokens."""

    fixed_s: float
    per_token_s: float


class StepTimeModel:
    """Fitted costs of one instance, as plain floats: each call is a few float operations (no numpy, no pydantic).

    Times of steps include step_overhead_s; fits (prefill, decode) describe the forward alone.
    """

    __slots__ = (
        "prefill",
        "decode",
        "blocking_copy",
        "step_overhead_s",
        "migration_stage_overhead_s",
        "migration_s_per_block",
        "prefill_floor_s",
        "_pa",
        "_pb",
        "_pc",
        "_d0",
        "_d1",
        "_d2",
    )

    def __init__(
        self,
        *,
        prefill: PrefillFit,
        decode: DecodeFit,
        blocking_copy: BlockingCopyFit,
        step_overhead_s: float,
        migration_stage_overhead_s: float,
        migration_s_per_block: float,
        prefill_floor_s: float = 0.0,
    ) -> None:
        self.prefill = prefill
        self.decode = decode
        self.blocking_copy = blocking_copy
        self.step_overhead_s = step_overhead_s
        self.migration_stage_overhead_s = migration_stage_overhead_s
        self.migration_s_per_block = migration_s_per_block
        self.prefill_floor_s = prefill_floor_s
        self._pa = step_overhead_s + prefill.fixed_s
        self._pb = prefill.per_token_s
        self._pc = prefill.per_sq_token_s
        self._d0 = step_overhead_s + decode.fixed_s
        self._d1 = decode.per_seq_s
        self._d2 = decode.per_context_token_s

    def prefill_time_s(self, seq_lens: Iterable[int]) -> float:
        total = 0
        sum_sq = 0
        for n in seq_lens:
            total += n
            sum_sq += n * n
        if total == 0:
            return 0.0
        t = self._pa + self._pb * total + self._pc * sum_sq
        floor = self.step_overhead_s + self.prefill_floor_s
        return t if t >= floor else floor

    def decode_time_s(self, batch_size: int, total_context_tokens: int) -> float:
        if batch_size <= 0:
            return 0.0
        return self._d0 + self._d1 * batch_size + self._d2 * total_context_tokens

    def migration_stage_time_s(self, num_blocks: int) -> float:
        return self.migration_stage_overhead_s + num_blocks * self.migration_s_per_block

    def blocking_copy_time_s(self, num_tokens: int) -> float:
        fit = self.blocking_copy
        return fit.fixed_s + fit.per_token_s * num_tokens

    def __getstate__(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setstate__(self, state: tuple) -> None:
        for name, value in zip(self.__slots__, state, strict=True):
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"StepTimeModel(prefill={self.prefill}, decode={self.decode}, blocking_copy={self.blocking_copy})"


class Profile(BaseModel):
    """Costs of one LLM instance (one model on one device); see the module docstring and README.md.

    ``prefill_time_s`` and ``decode_time_s`` return the whole step's wall time, *including* ``step_overhead_s``:
    callers must not add the overhead again. Immutable: the tables are fitted once, at construction; build a changed
    profile with ``model_copy(update=...)`` (re-validated and re-fitted) or ``Profile(**fields)``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = Field(default=FORMAT_VERSION, description="version of this file format")
    name: str = Field(min_length=1, description="short identifier, e.g. a10-llama-7b")
    description: str = Field(description="what this profile models, in a sentence or two")
    provenance: str = Field(
        min_length=1,
        description="'reconstructed from the paper's published numbers: ...' or 'measured: <command>, <device>, <date>'",
    )
    reconstructed: bool = Field(description="true when the tables were derived from published numbers, not measured")
    assumptions: list[str] = Field(default_factory=list, description="every assumption behind the numbers, one a line")
    device: str = Field(min_length=1, description="accelerator, e.g. 'NVIDIA A10 24GB'")
    model: str = Field(min_length=1, description="model served, e.g. 'LLaMA-7B fp16'")

    num_layers: int = Field(gt=0, description="transformer layers")
    hidden_size: int = Field(gt=0, description="model width")
    num_kv_heads: int = Field(gt=0, description="key/value heads per layer")
    head_dim: int = Field(gt=0, description="width of one head")
    dtype_bytes: int = Field(gt=0, description="bytes per KV element (2 for fp16)")

    block_size: int = Field(gt=0, description="tokens per KV block")
    total_blocks: int = Field(gt=0, description="KV blocks of one instance")
    kv_bytes_per_token: int = Field(gt=0, description="KV bytes of one token: 2 * layers * kv_heads * head_dim * dtype")
    watermark: float = Field(
        ge=0, lt=1, description="fraction of total_blocks kept free when admitting prefills (avoids instant preemption)"
    )
    max_batched_tokens: int = Field(gt=0, description="most prompt tokens in one prefill step")
    max_num_seqs: int = Field(gt=0, description="most sequences running at once")

    step_overhead_s: float = Field(ge=0, description="fixed CPU cost of every step (scheduling, sampling), seconds")
    prefill_floor_s: float = Field(
        default=0.0, ge=0,
        description="the shortest prefill forward: a step reads every weight once, however few tokens it computes "
        "(0: the prefill table alone), seconds",
    )
    migration_bandwidth_bytes_per_s: float = Field(gt=0, description="KV transfer rate of a migration stage, bytes/s")
    migration_stage_overhead_s: float = Field(
        ge=0, description="fixed cost of one migration stage (pre-alloc handshake, RPC, sync), seconds"
    )

    concurrency_slowdown: list[float] = Field(
        default_factory=list,
        description="instances sharing one machine's cores (a CPU cluster): a step started while n instances step "
        "(itself included) takes entry n-1 times the tables' time (the last entry for more); empty: every instance "
        "has its device to itself",
    )

    prefill: list[PrefillPoint] = Field(min_length=1, description="measured prefill forwards")
    decode: list[DecodePoint] = Field(min_length=1, description="measured decode forwards")
    blocking_copy: list[BlockingCopyPoint] = Field(
        default_factory=list,
        description="optional stop-the-world copies of a whole KV cache; empty means one migration stage",
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> Profile:
        if any(not (math.isfinite(f) and f > 0) for f in self.concurrency_slowdown):
            raise ValueError(f"concurrency_slowdown={self.concurrency_slowdown}: every factor must be a positive number")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"format_version={self.format_version} is not supported: this llumnix reads version {FORMAT_VERSION}"
            )
        expected = 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes
        if self.kv_bytes_per_token != expected:
            raise ValueError(
                f"kv_bytes_per_token={self.kv_bytes_per_token} disagrees with the model shape: "
                f"2 * num_layers * num_kv_heads * head_dim * dtype_bytes = {expected}; fix one of them"
            )
        return self

    def model_post_init(self, context: Any, /) -> None:
        _ = self.step_time_model  # fit now, so a bad table fails at load rather than mid-simulation

    @cached_property
    def step_time_model(self) -> StepTimeModel:
        """The fitted cost functions as a plain slotted object; hot loops may hold it and call it directly."""
        if self.blocking_copy:
            copy_fit = _fit_blocking_copy(self.blocking_copy)
        else:
            copy_fit = BlockingCopyFit(
                self.migration_stage_overhead_s, self.kv_bytes_per_token / self.migration_bandwidth_bytes_per_s
            )
        return StepTimeModel(
            prefill=_fit_prefill(self.prefill),
            decode=_fit_decode(self.decode),
            blocking_copy=copy_fit,
            step_overhead_s=self.step_overhead_s,
            migration_stage_overhead_s=self.migration_stage_overhead_s,
            migration_s_per_block=self.block_size * self.kv_bytes_per_token / self.migration_bandwidth_bytes_per_s,
            prefill_floor_s=self.prefill_floor_s,
        )

    # ------------------------------------------------------------------ cost functions

    def prefill_time_s(self, seq_lens: Iterable[int]) -> float:
        """Wall time of a prefill step over whole prompts of these lengths, step overhead included; 0 for none."""
        return self.step_time_model.prefill_time_s(seq_lens)

    def decode_time_s(self, batch_size: int, total_context_tokens: int) -> float:
        """Wall time of a decode step, step overhead included; 0 for an empty batch."""
        return self.step_time_model.decode_time_s(batch_size, total_context_tokens)

    def migration_stage_time_s(self, num_blocks: int) -> float:
        """Time of one migration stage moving num_blocks KV blocks: handshake overhead plus bytes over bandwidth."""
        return self.step_time_model.migration_stage_time_s(num_blocks)

    def concurrency_factor(self, busy_instances: int) -> float:
        """How much longer a step takes when ``busy_instances`` instances (itself included) step at once."""
        factors = self.concurrency_slowdown
        if not factors or busy_instances < 1:
            return 1.0
        return factors[min(busy_instances, len(factors)) - 1]

    def blocking_copy_time_s(self, num_tokens: int) -> float:
        """Time to copy a whole KV cache while the request is stopped (the naive alternative to live migration)."""
        return self.step_time_model.blocking_copy_time_s(num_tokens)

    # ------------------------------------------------------------------ derived values

    @property
    def prefill_fit(self) -> PrefillFit:
        """Fitted forward-time coefficients of a prefill step (step overhead not included)."""
        return self.step_time_model.prefill

    @property
    def decode_fit(self) -> DecodeFit:
        """Fitted forward-time coefficients of a decode step (step overhead not included)."""
        return self.step_time_model.decode

    @property
    def blocking_copy_fit(self) -> BlockingCopyFit:
        """Fitted blocking-copy line; without a blocking_copy table it is one migration stage over all tokens."""
        return self.step_time_model.blocking_copy

    @property
    def blocking_copy_bandwidth_bytes_per_s(self) -> float:
        """Effective bandwidth of the blocking copy (inf if the fit has no per-token cost)."""
        per_token_s = self.blocking_copy_fit.per_token_s
        return math.inf if per_token_s == 0 else self.kv_bytes_per_token / per_token_s

    @property
    def kv_capacity_tokens(self) -> int:
        return self.total_blocks * self.block_size

    def __repr__(self) -> str:
        kind = "reconstructed" if self.reconstructed else "measured"
        return (
            f"Profile(name={self.name!r}, device={self.device!r}, model={self.model!r}, {kind}, "
            f"{len(self.prefill)} prefill / {len(self.decode)} decode points, {self.step_time_model!r})"
        )

    # ------------------------------------------------------------------ I/O

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Profile:
        """Copy; with ``update`` the result is re-validated and re-fitted (pydantic's copy would keep a stale fit)."""
        if not update:
            return super().model_copy(deep=deep)
        return type(self).model_validate({**self.model_dump(), **update})

    @classmethod
    def load(cls, name_or_path: str | Path) -> Profile:
        """Load a packaged profile by bare name (``"a10-llama-7b"``) or a profile JSON file by path.

        A string with a path separator or a ``.json`` suffix is a path; anything else is a packaged name.
        """
        text = str(name_or_path)
        if isinstance(name_or_path, Path) or "/" in text or "\\" in text or text.endswith(_PROFILE_SUFFIX):
            path = Path(name_or_path)
            if not path.is_file():
                raise ProfileError(
                    f"profile file not found: {path}; check the path, or pass a packaged profile name "
                    f"({_available_text()})"
                )
            source = str(path)
            raw = path.read_text(encoding="utf-8")
        else:
            resource = resources.files(__package__).joinpath(text + _PROFILE_SUFFIX)
            if not resource.is_file():
                raise ProfileError(
                    f"unknown profile {text!r}: available profiles are {_available_text()}; "
                    "pass one of these names or a path to a profile .json file"
                )
            source = f"packaged profile {text!r}"
            raw = resource.read_text(encoding="utf-8")
        return cls.from_json_text(raw, source=source)

    @classmethod
    def from_json_text(cls, raw: str, *, source: str = "profile") -> Profile:
        """Parse and validate profile JSON; errors become one ProfileError naming the source and each bad field."""
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ProfileError(
                f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}; fix the syntax there"
            ) from None
        if not isinstance(data, dict):
            raise ProfileError(f"{source} must hold a JSON object of profile fields, not {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ProfileError(_validation_message(source, exc)) from None

    def save(self, path: str | Path) -> Path:
        """Write the profile as indented JSON (tables included, fits recomputed at load); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json_text(), encoding="utf-8")
        return path

    def to_json_text(self) -> str:
        """Indented JSON with one table point (or assumption) per line, so tables stay readable and diffable."""
        lines = []
        for key, value in self.model_dump(mode="json", exclude_none=True).items():
            if key == "concurrency_slowdown" and not value:  # optional; absent from profiles of one device each
                continue
            if key == "prefill_floor_s" and not value:  # optional; absent where the prefill table alone holds
                continue
            if isinstance(value, list) and value:
                items = ",\n".join("    " + json.dumps(item) for item in value)
                lines.append(f"  {json.dumps(key)}: [\n{items}\n  ]")
            else:
                lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
        return "{\n" + ",\n".join(lines) + "\n}\n"


def list_profiles() -> list[str]:
    """Names of the packaged profiles, sorted; each loads with ``Profile.load(name)``."""
    return sorted(
        entry.name[: -len(_PROFILE_SUFFIX)]
        for entry in resources.files(__package__).iterdir()
        if entry.name.endswith(_PROFILE_SUFFIX) and entry.is_file()
    )


def _available_text() -> str:
    names = list_profiles()
    return ", ".join(names) if names else "(none packaged)"


def _validation_message(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(part) if isinstance(part, str) else f"[{part}]" for part in err["loc"]).replace(".[", "[")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg += "; remove it or fix its spelling"
        elif err["type"] == "missing":
            msg += "; add it (see llumnix/profiles/README.md)"
        lines.append(f"  field '{loc or '(profile)'}': {msg}")
    return f"{source} has {len(lines)} invalid field(s); fix them:\n" + "\n".join(lines)


def _nnls_relative(columns: Sequence[Sequence[float]], times_s: Sequence[float]) -> list[float]:
    """Non-negative least squares of times on the columns, weighting each point by 1/time (relative error).

    Exact for the 2-3 unknowns used here: solve every subset of free coefficients and keep the best feasible one,
    preferring fewer coefficients on ties so under-determined tables give the simplest model.
    """
    y = np.asarray(times_s, dtype=float)
    x = np.asarray(columns, dtype=float).T / y[:, None]
    target = np.ones_like(y)
    k = x.shape[1]
    best_coef = np.zeros(k)
    best_resid = float(target @ target)
    for size in range(1, k + 1):
        for subset in itertools.combinations(range(k), size):
            sol, *_ = np.linalg.lstsq(x[:, subset], target, rcond=None)
            if (sol < 0).any():
                continue
            coef = np.zeros(k)
            coef[list(subset)] = sol
            resid = float(np.sum((x @ coef - target) ** 2))
            if resid < best_resid * (1 - 1e-9) - 1e-15:
                best_coef, best_resid = coef, resid
    return [float(c) for c in best_coef]


def _fit_prefill(points: Sequence[PrefillPoint]) -> PrefillFit:
    cols = (
        [1.0] * len(points),
        [p.total_tokens for p in points],
        [p.effective_sum_sq_tokens for p in points],
    )
    return PrefillFit(*_nnls_relative(cols, [p.time_s for p in points]))


def _fit_decode(points: Sequence[DecodePoint]) -> DecodeFit:
    cols = ([1.0] * len(points), [p.batch_size for p in points], [p.total_context_tokens for p in points])
    return DecodeFit(*_nnls_relative(cols, [p.time_s for p in points]))


def _fit_blocking_copy(points: Sequence[BlockingCopyPoint]) -> BlockingCopyFit:
    cols = ([1.0] * len(points), [p.num_tokens for p in points])
    return BlockingCopyFit(*_nnls_relative(cols, [p.time_s for p in points]))
