"""Executors turn a ``StepPlan`` into one next token per request. Everything above them does not care which:

- ``TorchExecutor``: the paged-KV LLaMA model (CPU or CUDA);
- ``ProfileExecutor``: no model, the step takes its profiled time (sleeping), tokens are a deterministic function
  of (request, position) so that continuity across migrations stays checkable. Used by the scheduler benchmark
  and by tests of the real runtime that need no torch work.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from llumnix.core.local_scheduler import StepKind, StepPlan
from llumnix.core.request import Request


def prompt_ids_for(req: Request, vocab_size: int) -> list[int]:
    """The request's prompt tokens; a trace gives only lengths, so draw them deterministically from its id."""
    if req.prompt_token_ids is None:
        rng = np.random.default_rng(req.request_id)
        req.prompt_token_ids = rng.integers(0, vocab_size, req.prompt_tokens).tolist()
    return req.prompt_token_ids


def seq_inputs(plan: StepPlan, vocab_size: int, tables: Callable[[int], list[int]]) -> list:
    """The model runner's inputs for ``plan``: whole sequences for a prefill, the last token for a decode."""
    from llumnix.engine.runner import SeqInput

    if plan.kind is StepKind.PREFILL:
        return [
            SeqInput(prompt_ids_for(r, vocab_size) + r.output_token_ids, 0, tables(r.request_id))
            for r in plan.requests
        ]
    return [SeqInput([r.output_token_ids[-1]], r.seq_len - 1, tables(r.request_id)) for r in plan.requests]


class Executor(ABC):
    block_size: int
    num_blocks: int
    moves_kv = True  # read_blocks returns the KV itself (a modelled engine's: only a block count)

    @abstractmethod
    def execute(self, plan: StepPlan) -> list[int]:
        """Run the step; return the next token of each request in ``plan.requests`` (same order)."""

    @abstractmethod
    def read_blocks(self, block_ids: list[int]) -> Any:
        """The KV payload of these blocks (all layers), for a migration stage."""

    @abstractmethod
    def write_blocks(self, block_ids: list[int], payload: Any) -> None:
        """Write a payload read from another executor into these blocks."""

    def copy_time_s(self, num_blocks: int) -> float:
        """Time a migration stage of ``num_blocks`` takes beyond the real copy (a modelled engine's modelled copy)."""
        return 0.0


class TorchExecutor(Executor):
    def __init__(self, model: str = "tiny", num_blocks: int = 256, block_size: int = 16, device: str = "cpu",
                 dtype: str = "float32", seed: int = 0, invariant_batch: int | None = None) -> None:
        import torch

        from llumnix.engine.runner import ModelRunner

        self.torch = torch
        self.num_blocks, self.block_size = num_blocks, block_size
        self.runner = ModelRunner(model, num_blocks, block_size, device=device, dtype=getattr(torch, dtype), seed=seed,
                                  invariant_batch=invariant_batch)
        self.vocab_size = self.runner.config.vocab_size

    def execute(self, plan: StepPlan) -> list[int]:
        return self.run(plan.kind, seq_inputs(plan, self.vocab_size, self._tables))

    def run(self, kind: StepKind, seqs: list) -> list[int]:
        """One prefill or decode step of these ``SeqInput``s; their next tokens."""
        return self.runner.prefill(seqs) if kind is StepKind.PREFILL else self.runner.decode(seqs)

    def block_tables(self, request_id: int) -> list[int]:
        return self._tables(request_id)

    def bind(self, block_manager) -> None:
        """Block tables live in the instance's BlockManager; the executor only reads them."""
        self._tables = block_manager.table

    def weights_fingerprint(self) -> list[float]:
        """One float64 sum per parameter: equal for two models built from the same seed on the same kind of device."""
        return [float(p.sum(dtype=self.torch.float64)) for p in self.runner.model.parameters()]

    @property
    def device(self):
        """The torch device of the model and its KV pool."""
        return self.runner.device

    def read_blocks(self, block_ids: list[int]) -> Any:
        return self.runner.kv_cache.read_blocks(block_ids)

    def write_blocks(self, block_ids: list[int], payload: Any) -> None:
        self.runner.kv_cache.write_blocks(block_ids, payload)

    def synchronize(self) -> None:
        if self.runner.device.type == "cuda":
            self.torch.cuda.synchronize(self.runner.device)


def synthetic_token(request_id: int, position: int, vocab_size: int = 32_000) -> int:
    return (request_id * 1_000_003 + position * 7_919) % vocab_size


class ProfileExecutor(Executor):
    """Steps take the profile's time (``speed`` > 1 runs faster than real time); no KV data moves."""

    moves_kv = False

    def __init__(self, profile, speed: float = 1.0, sleep=time.sleep) -> None:
        self.profile = profile
        self.num_blocks, self.block_size = profile.total_blocks, profile.block_size
        self.speed = speed
        self.sleep = sleep

    def step_time_s(self, plan: StepPlan) -> float:
        if plan.kind is StepKind.PREFILL:
            return self.profile.prefill_time_s(plan.prefill_tokens)
        return self.profile.decode_time_s(len(plan.requests), plan.context_tokens)

    def execute(self, plan: StepPlan) -> list[int]:
        self.sleep(self.step_time_s(plan) / self.speed)
        return self.tokens(plan)

    async def execute_async(self, plan: StepPlan) -> list[int]:
        """``execute`` for an asyncio caller: the step's time passes on the event loop's clock (a virtual one too)."""
        await asyncio.sleep(self.step_time_s(plan) / self.speed)
        return self.tokens(plan)

    @staticmethod
    def tokens(plan: StepPlan) -> list[int]:
        return [synthetic_token(r.request_id, r.seq_len) for r in plan.requests]

    def copy_time_s(self, num_blocks: int) -> float:
        return self.profile.migration_stage_time_s(num_blocks) / self.speed

    def bind(self, block_manager) -> None:
        pass

    def read_blocks(self, block_ids: list[int]) -> Any:
        return len(block_ids)

    def write_blocks(self, block_ids: list[int], payload: Any) -> None:
        pass
