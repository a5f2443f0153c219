"""Is greedy decoding on this engine deterministic, and does a sequence's output depend on its batch?

A migrated request keeps decoding on another instance, from a KV cache copied bit for bit, in whatever batch that
instance runs. It yields exactly the tokens it would have produced unmigrated only if (1) the engine's decode is
deterministic run to run (same inputs, same bits out), (2) a sequence's result does not depend on where its KV
blocks lie in the pool, and (3) it does not depend on the other sequences of its batch (batch invariance). This probe
measures the three separately, per decode path (``MODES``: CUDA graphs or eager steps, the Triton paged kernel or
gather + SDPA, with or without the runner's batch-invariant decoding):

* ``alone``: the target sequence decodes alone ``repeats`` times, each time in other blocks of the pool;
  ``tokens_stable`` / ``logits_identical``: every repeat gives the same tokens / bit-equal logits at every step.
* ``batch`` B: the same target decodes beside B-1 other sequences of mixed lengths; ``tokens_match_alone``: the
  target's tokens equal its first alone run's; ``max_logit_diff``: largest difference of its logits from that run's.

Every prefill runs one sequence at a time (a prefill's result never depends on a batch here), so any difference
comes from the decode steps. ``min_top2_gap``: the smallest margin between the best and second-best logit over the
target's alone steps: with random weights the margin is often tiny, so a last-bit difference can flip a greedy
token.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from llumnix.engine.device import device_name
from llumnix.engine.runner import ModelRunner, SeqInput

log = logging.getLogger(__name__)

# name -> ModelRunner options; "invariant": batch-invariant decoding (``invariant_batch`` = the largest probed batch).
MODES: dict[str, dict] = {
    "graphs+kernel": {"cuda_graphs": True, "paged_kernel": True},
    "graphs+kernel+invariant": {"cuda_graphs": True, "paged_kernel": True, "invariant": True},
    "eager+kernel": {"cuda_graphs": False, "paged_kernel": True},
    "eager+kernel+invariant": {"cuda_graphs": False, "paged_kernel": True, "invariant": True},
    "graphs+gather": {"cuda_graphs": True, "paged_kernel": False},
    "eager+gather": {"cuda_graphs": False, "paged_kernel": False},
    "eager+gather+invariant": {"cuda_graphs": False, "paged_kernel": False, "invariant": True},
}


def default_modes(device: str) -> tuple[str, ...]:
    """Every decode path ``device`` runs: graphs need CUDA, the kernel Triton (CUDA, or TRITON_INTERPRET=1)."""
    from llumnix.engine import paged_attention

    dev = torch.device(device)
    return tuple(m for m, opts in MODES.items()
                 if (dev.type == "cuda" or not opts["cuda_graphs"])
                 and (paged_attention.available(dev) or not opts["paged_kernel"]))


@dataclass
class DeterminismConfig:
    model: str = "tiny"
    device: str = "cpu"
    dtype: str = "float32"
    lengths: tuple[int, ...] = (64, 256)  # target prompt tokens
    batches: tuple[int, ...] = (1, 3, 8)  # 1: alone (repeated); B > 1: the target beside B - 1 others
    modes: tuple[str, ...] = ("eager+gather",)
    output_tokens: int = 32
    repeats: int = 3
    max_background_tokens: int = 2048  # other sequences' prompt lengths: uniform in [16, min(length, this)]
    block_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"unknown mode(s) {unknown}; choose from {sorted(MODES)}")
        if 1 not in self.batches:
            raise ValueError("batches must include 1 (the alone runs every batch is compared with)")
        if self.repeats < 2:
            raise ValueError("repeats must be >= 2 (stability compares repeats)")
        if self.output_tokens < 2:
            raise ValueError("output_tokens must be >= 2")


@dataclass
class _Run:
    tokens: list[int]
    logits: list[torch.Tensor] = field(default_factory=list)  # the target's fp32 logits per decode step, on CPU


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def generate(runner: ModelRunner, prompts: list[list[int]], steps: int, first_block: int) -> _Run:
    """Greedy decoding of ``prompts`` as one batch for ``steps`` tokens (each prompt prefilled alone first), blocks
    laid out contiguously from ``first_block``. Returns sequence 0's tokens and logits."""
    bs = runner.kv_cache.block_size
    tables, base = [], first_block
    for p in prompts:
        n = _blocks(len(p) + steps, bs)
        tables.append(list(range(base, base + n)))
        base += n
    last = [runner.prefill([SeqInput(p, 0, t)])[0] for p, t in zip(prompts, tables, strict=True)]
    lens = [len(p) for p in prompts]
    run = _Run([last[0]])
    for _ in range(steps - 1):
        logits = runner.decode_logits([SeqInput([tok], n, t) for tok, n, t in zip(last, lens, tables, strict=True)])
        run.logits.append(logits[0].float().cpu())
        last = logits.argmax(-1).tolist()
        lens = [n + 1 for n in lens]
        run.tokens.append(last[0])
    return run


def _first_mismatch(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), -1)


def _top2_gap(logits: torch.Tensor) -> float:
    top = logits.topk(2).values
    return float(top[0] - top[1])


def probe(cfg: DeterminismConfig, progress: Callable[[Iterable], Iterable] | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(cfg.seed)
    max_batch = max(cfg.batches)
    dtype = getattr(torch, cfg.dtype)
    out = cfg.output_tokens
    # Pool layout: two regions of target_blocks (+1: a repeat may start one block later) for the alone repeats, then
    # the batched run's target and the others.
    target_blocks = _blocks(max(cfg.lengths) + out, cfg.block_size)
    batch_start = 2 * target_blocks + 1
    pool = batch_start + target_blocks + (max_batch - 1) * _blocks(cfg.max_background_tokens + out, cfg.block_size)
    # Per length: the target's prompt and the others' (shared by every mode and batch).
    work = {}
    for length in cfg.lengths:
        target = rng.integers(0, 1 << 30, length).tolist()
        others = [rng.integers(0, 1 << 30, int(rng.integers(16, max(17, min(length, cfg.max_background_tokens) + 1))))
                  .tolist() for _ in range(max_batch - 1)]
        work[length] = (target, others)
    rows = []
    reference: dict[int, list[int]] = {}  # length -> the first mode's alone tokens
    items = [(m, length) for m in cfg.modes for length in cfg.lengths]
    runner, runner_mode = None, None
    for mode, length in progress(items) if progress else items:
        opts = dict(MODES[mode])
        invariant = {"invariant_batch": max_batch} if opts.pop("invariant", False) else {}
        if runner_mode != mode:
            runner = None
            gc.collect()  # the runner and its captured steps refer to each other: free the last mode's GPU memory
            if cfg.device.startswith("cuda"):
                torch.cuda.empty_cache()
            runner = ModelRunner(cfg.model, pool, cfg.block_size, device=cfg.device, dtype=dtype, seed=cfg.seed,
                                 **opts, **invariant)
            runner_mode = mode
        vocab = runner.config.vocab_size
        target, others = work[length]
        target = [t % vocab for t in target]
        others = [[t % vocab for t in o] for o in others]
        # Alone: repeats alternate between two regions of the pool (and shift within them) so block ids differ.
        alone = [generate(runner, [target], out, (r % 2) * target_blocks + (r // 2) % 2) for r in range(cfg.repeats)]
        ref = alone[0]
        reference.setdefault(length, ref.tokens)
        gaps = [_top2_gap(x) for x in ref.logits]
        base = {
            "mode": mode, "device": cfg.device, "device_name": device_name(cfg.device), "model": cfg.model,
            "dtype": cfg.dtype, "torch_version": torch.__version__, "cuda_version": torch.version.cuda or "",
            "length": length, "output_tokens": out, "min_top2_gap": min(gaps),
            "matches_first_mode": ref.tokens == reference[length],
        }
        stable = all(r.tokens == ref.tokens for r in alone)
        bits = all(all(x.equal(y) for x, y in zip(r.logits, ref.logits, strict=True)) for r in alone)
        worst = max(_first_mismatch(r.tokens, ref.tokens) for r in alone)
        rows.append(base | {"batch": 1, "runs": cfg.repeats, "tokens_stable": stable, "logits_identical": bits,
                            "tokens_match_alone": stable, "first_mismatch": worst,
                            "max_logit_diff": max(float((x - y).abs().max()) for r in alone
                                                  for x, y in zip(r.logits, ref.logits, strict=True))})
        for b in cfg.batches:
            if b == 1:
                continue
            run = generate(runner, [target, *others[: b - 1]], out, batch_start)
            diff = max(float((x - y).abs().max()) for x, y in zip(run.logits, ref.logits, strict=True))
            mismatch = _first_mismatch(run.tokens, ref.tokens)
            rows.append(base | {"batch": b, "runs": 1, "tokens_stable": None, "logits_identical": diff == 0.0,
                                "tokens_match_alone": mismatch < 0, "first_mismatch": mismatch,
                                "max_logit_diff": diff})
        log.info("%s length %d: alone stable %s (bit-equal logits %s); batch-invariant %s", mode, length, stable,
                 bits, [r["tokens_match_alone"] for r in rows[-(len(cfg.batches) - 1):]] if len(cfg.batches) > 1
                 else "-")
    return pd.DataFrame(rows)
