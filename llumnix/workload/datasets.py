"""(prompt, output) token-length pairs: the ShareGPT / BurstGPT stand-ins and loaders for the real datasets.

Stand-ins: :func:`sharegpt` and :func:`burstgpt` draw from the Table-1 quantile distributions in
:mod:`llumnix.workload.lengths` (Table 1 gives only marginals: mean and percentiles of request and response tokens).
ShareGPT's stand-in (used only without the real file) draws inputs and outputs independently. BurstGPT's, the
default BurstGPT workload since no offline copy of the log exists, joins them by a Gaussian copula of correlation
:data:`BURSTGPT_RHO`: the real log's longer prompts get longer answers (its paper's Fig 4; rank correlation 0.28 in
its first 400 rows), and independent draws made the paper's INFaaS++ BurstGPT runs too light.

Real files, the authors' way: :func:`load_sharegpt` (first two turns of each conversation, in file order, see
:mod:`llumnix.workload.sharegpt_data`) and :func:`load_burstgpt` (every row, lengths capped at 6,144), then
:func:`head_pairs` (ShareGPT: the first ``n`` rows) or :func:`sample_pairs` (BurstGPT: ``n`` distinct rows at
random). Every pair keeps ``prompt_tokens + output_tokens <= MAX_TOTAL_TOKENS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from llumnix.workload.lengths import (
    BURSTGPT_INPUT,
    BURSTGPT_OUTPUT,
    SHAREGPT_INPUT,
    SHAREGPT_OUTPUT,
    QuantileLengths,
)
from llumnix.workload.sharegpt_data import row_lengths, usable_rows
from llumnix.workload.tokenizer import TokenCounter, token_counter
from llumnix.workload.zipf import AUTHORS_CAP_TOKENS

#: BurstGPT CSV columns this loader needs (the file also has Timestamp, Model, Total tokens, Log Type).
BURSTGPT_REQUEST_COLUMN = "Request tokens"
BURSTGPT_RESPONSE_COLUMN = "Response tokens"


@dataclass(frozen=True)
class LengthPairs:
    """Parallel arrays of prompt and output lengths (int64, tokens); row i is one request."""

    prompt_tokens: np.ndarray
    output_tokens: np.ndarray

    def __post_init__(self) -> None:
        if self.prompt_tokens.shape != self.output_tokens.shape or self.prompt_tokens.ndim != 1:
            raise ValueError("prompt_tokens and output_tokens must be 1-D arrays of the same length")

    def __len__(self) -> int:
        return int(self.prompt_tokens.shape[0])


# -- generators matching Table 1 -----------------------------------------------------------------------------------


def _independent_pairs(
    inputs: QuantileLengths, outputs: QuantileLengths, n: int, rng: np.random.Generator
) -> LengthPairs:
    # Marginals only (module docstring); the knots' maxima keep every sum within MAX_TOTAL_TOKENS (checked in tests).
    return LengthPairs(inputs.sample(n, rng), outputs.sample(n, rng))


def sharegpt(n: int, rng: np.random.Generator) -> LengthPairs:
    """``n`` pairs whose marginals match ShareGPT's Table-1 mean and percentiles."""
    return _independent_pairs(SHAREGPT_INPUT, SHAREGPT_OUTPUT, n, rng)


#: The BurstGPT stand-in's dependence between input and output lengths: the correlation of its Gaussian copula.
#: Fitted on the paper's INFaaS++ BurstGPT points only (35: 5 rates x 7 metrics, the calibrated a10-llama-7b;
#: benchmarks/burstgpt_copula.csv): 0.2 puts 35, 34 and 35 of them within 2x on three draws of the lengths, 0 (the
#: earlier independent stand-in) 31-32, 0.25 30-33, 0.3 23. Bounds from the real log: its first 400 rows
#: (experiments/calibration/burstgpt-1-first400.csv, 383 served) give 0.29, bootstrap 95% interval 0.19-0.39
#: (benchmarks/burstgpt_dependence.csv); the fit sits at that interval's low end, and the log's own dependence
#: (its rank pairs resampled) puts 25-31 within 2x: heavier than the paper's runs (results/calibration/README.md).
BURSTGPT_RHO = 0.2


def burstgpt(n: int, rng: np.random.Generator, rho: float = BURSTGPT_RHO) -> LengthPairs:
    """``n`` pairs whose marginals match BurstGPT's Table-1 mean and percentiles, joined by a Gaussian copula of
    correlation ``rho`` (:data:`BURSTGPT_RHO`: longer prompts with somewhat longer answers); ``rho`` 0 draws them
    independently (the stand-in before the fit)."""
    if rho == 0:
        return _independent_pairs(BURSTGPT_INPUT, BURSTGPT_OUTPUT, n, rng)
    return _copula_pairs(BURSTGPT_INPUT, BURSTGPT_OUTPUT, n, rng, rho)


def _copula_pairs(
    inputs: QuantileLengths, outputs: QuantileLengths, n: int, rng: np.random.Generator, rho: float
) -> LengthPairs:
    """Pairs whose normal scores have correlation ``rho`` (a Gaussian copula), each mapped through its marginal."""
    if not -1 < rho < 1:
        raise ValueError(f"rho must be in (-1, 1), got {rho}")
    z = rng.standard_normal((n, 2))
    z[:, 1] = rho * z[:, 0] + math.sqrt(1 - rho * rho) * z[:, 1]
    u = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))  # the normal CDF
    return LengthPairs(inputs.tokens_at(u[:, 0]), outputs.tokens_at(u[:, 1]))


def copula_rho(pairs: LengthPairs) -> float:
    """The Gaussian copula correlation with the pairs' Spearman rank correlation rho_s (2 sin(pi rho_s / 6)): the
    ``rho`` of :func:`burstgpt` measured on real rows."""
    spearman = pd.Series(pairs.prompt_tokens).rank().corr(pd.Series(pairs.output_tokens).rank())
    return 2 * math.sin(math.pi * spearman / 6)


def copula_rho_interval(pairs: LengthPairs, rng: np.random.Generator, resamples: int = 2000,
                        level: float = 0.95) -> tuple[float, float]:
    """A percentile bootstrap interval of :func:`copula_rho` (rows resampled with replacement)."""
    n = len(pairs)
    draws = [copula_rho(LengthPairs(pairs.prompt_tokens[i], pairs.output_tokens[i]))
             for i in (rng.integers(0, n, n) for _ in range(resamples))]
    tail = (1 - level) / 2 * 100
    return float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))


# -- loaders for the real datasets ---------------------------------------------------------------------------------


def load_sharegpt(path: str | Path, counter: TokenCounter | None = None, require_roles: bool = True) -> LengthPairs:
    """Every usable row of a ShareGPT JSON / JSONL dump, in file order, the authors' way (:mod:`.sharegpt_data`).

    ``counter`` defaults to :func:`~llumnix.workload.tokenizer.token_counter` (LLaMA when installed). Counts are
    cached per file and tokenizer.
    """
    path = Path(path)
    rows = row_lengths(path, counter or token_counter())
    usable = usable_rows(rows, require_roles=require_roles)
    pairs = LengthPairs(usable["prompt_tokens"].to_numpy(np.int64), usable["completion_tokens"].to_numpy(np.int64))
    return _nonempty(pairs, path, "conversations (first turns human -> model, each pair within capacity)")


def load_burstgpt(path: str | Path) -> LengthPairs:
    """Length pairs from a BurstGPT CSV (``Request tokens``, ``Response tokens``), every row, in file order.

    As the artifact does (``sample_burstgpt_request``, ``benchmarks-repo/benchmark_throughput.py`` lines 863-878,
    osdi24ae): each length capped at 6,144 tokens; failed requests (0 response tokens) are kept and, as its server
    sends ``max_tokens = max(len, 1)`` (``vllm/entrypoints/api_server.py`` line 101), become 1-token outputs; an
    empty prompt is its BOS token alone. Two capped lengths always fit one instance (2 x 6,144 <= 12,672).
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, usecols=[BURSTGPT_REQUEST_COLUMN, BURSTGPT_RESPONSE_COLUMN])
    except ValueError as e:
        raise ValueError(
            f"{path}: needs columns '{BURSTGPT_REQUEST_COLUMN}' and '{BURSTGPT_RESPONSE_COLUMN}' ({e}); "
            "--dataset for burstgpt must be a BurstGPT CSV"
        ) from e
    lengths = df.apply(pd.to_numeric, errors="coerce").dropna()
    capped = lengths.clip(lower=1, upper=AUTHORS_CAP_TOKENS).astype(np.int64)
    pairs = LengthPairs(capped[BURSTGPT_REQUEST_COLUMN].to_numpy(), capped[BURSTGPT_RESPONSE_COLUMN].to_numpy())
    return _nonempty(pairs, path, "rows with numeric request and response tokens")


def burstgpt_served(table: pd.DataFrame) -> LengthPairs:
    """The pairs of a BurstGPT table's served requests, as they are (a failure logs 0 request and 0 response
    tokens): for measuring the log's own statistics, e.g. :func:`copula_rho`, where :func:`load_burstgpt` replays
    every row the artifact's way."""
    served = table[(table[BURSTGPT_REQUEST_COLUMN] > 0) & (table[BURSTGPT_RESPONSE_COLUMN] > 0)]
    return LengthPairs(served[BURSTGPT_REQUEST_COLUMN].to_numpy(np.int64),
                       served[BURSTGPT_RESPONSE_COLUMN].to_numpy(np.int64))


def _nonempty(pairs: LengthPairs, path: Path, what: str) -> LengthPairs:
    if len(pairs) == 0:
        raise ValueError(f"{path}: no usable {what}. Fix: check that --dataset is the right file.")
    return pairs


def sample_pairs(pairs: LengthPairs, n: int, rng: np.random.Generator) -> LengthPairs:
    """``n`` distinct rows drawn uniformly without replacement (the artifact's ``random.sample``), in random order.

    With fewer rows than ``n`` a clear error: the artifact would silently send fewer requests.
    """
    if n > len(pairs):
        raise ValueError(
            f"--num-requests {n} exceeds the {len(pairs)} usable rows of the dataset; the authors send each row at "
            "most once. Fix: lower --num-requests."
        )
    index = rng.choice(len(pairs), size=n, replace=False)
    return LengthPairs(pairs.prompt_tokens[index], pairs.output_tokens[index])


def head_pairs(pairs: LengthPairs, n: int, path: str | Path) -> LengthPairs:
    """The first ``n`` rows in file order (the artifact's ShareGPT runs); a clear error when there are fewer."""
    if n > len(pairs):
        raise ValueError(
            f"{path}: only {len(pairs)} usable conversations, fewer than --num-requests {n}; the authors send each "
            "once, in file order. Fix: lower --num-requests or pass a larger ShareGPT file with --dataset."
        )
    return LengthPairs(pairs.prompt_tokens[:n], pairs.output_tokens[:n])
