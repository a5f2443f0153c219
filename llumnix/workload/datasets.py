"""(prompt, output) token-length pairs: the ShareGPT / BurstGPT stand-ins and loaders for the real datasets.

Without files, :func:`sharegpt` and :func:`burstgpt` draw inputs and outputs independently from the Table-1 quantile
distributions in :mod:`llumnix.workload.lengths`. With a file, :func:`load_sharegpt` / :func:`load_burstgpt` read the
real pairs and :func:`sample_pairs` draws requests from them with the seeded generator (with replacement, so a
trace may be longer than the dataset). Every pair keeps ``prompt_tokens + output_tokens <= MAX_TOTAL_TOKENS``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from llumnix.workload.lengths import (
    BURSTGPT_INPUT,
    BURSTGPT_OUTPUT,
    MAX_TOTAL_TOKENS,
    SHAREGPT_INPUT,
    SHAREGPT_OUTPUT,
    QuantileLengths,
)

#: Conversation roles treated as the user / the model in ShareGPT dumps (the common dumps use human / gpt).
HUMAN_ROLES = frozenset({"human", "user"})
MODEL_ROLES = frozenset({"gpt", "chatgpt", "assistant", "bard", "bing"})

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


def _pairs_from(prompt_tokens: np.ndarray, output_tokens: np.ndarray) -> LengthPairs:
    """Keep pairs a single instance can serve: both lengths >= 1 and their sum within the KV capacity.

    Pairs over capacity are dropped rather than truncated: truncation would pile mass at the cap and distort the
    tail, and such a request could never run on one instance anyway.
    """
    prompt = np.asarray(prompt_tokens, dtype=np.int64)
    output = np.asarray(output_tokens, dtype=np.int64)
    keep = (prompt >= 1) & (output >= 1) & (prompt + output <= MAX_TOTAL_TOKENS)
    return LengthPairs(prompt[keep], output[keep])


# -- generators matching Table 1 -----------------------------------------------------------------------------------


def _independent_pairs(
    inputs: QuantileLengths, outputs: QuantileLengths, n: int, rng: np.random.Generator
) -> LengthPairs:
    # Table 1 gives only marginals, so inputs and outputs are drawn independently; the knots' maxima already keep
    # every sum within MAX_TOTAL_TOKENS (checked in tests), so nothing is dropped and exactly n pairs come back.
    return LengthPairs(inputs.sample(n, rng), outputs.sample(n, rng))


def sharegpt(n: int, rng: np.random.Generator) -> LengthPairs:
    """``n`` pairs whose marginals match ShareGPT's Table-1 mean and percentiles."""
    return _independent_pairs(SHAREGPT_INPUT, SHAREGPT_OUTPUT, n, rng)


def burstgpt(n: int, rng: np.random.Generator) -> LengthPairs:
    """``n`` pairs whose marginals match BurstGPT's Table-1 mean and percentiles."""
    return _independent_pairs(BURSTGPT_INPUT, BURSTGPT_OUTPUT, n, rng)


# -- loaders for the real datasets ---------------------------------------------------------------------------------

# Pieces of text that a LLaMA-style BPE tokenizer usually turns into about one token each: a run of up to eight ASCII
# letters (common English words are one token, long words split into several), a single digit (LLaMA splits numbers
# into digits), or any other single non-space character (punctuation, CJK characters, symbols).
_TOKEN_PIECE = re.compile(r"[A-Za-z]{1,8}|\d|[^\sA-Za-z\d]")


def approx_token_count(text: str) -> int:
    """Approximate LLaMA token count of ``text`` (no tokenizer can be downloaded here); at least 1.

    A regex piece count rather than characters / 4: it counts code, numbers and non-English text more sensibly, and
    it is deterministic and dependency-free. It is an approximation; absolute lengths may differ from a real
    tokenizer's by tens of percent on unusual text.
    """
    return max(1, len(_TOKEN_PIECE.findall(text)))


def _conversation_pairs(conversation: list[dict]) -> list[tuple[str, str]]:
    """Consecutive (human turn, model turn) pairs of one conversation; other turns are skipped."""
    pairs = []
    for turn, reply in zip(conversation, conversation[1:], strict=False):
        if turn.get("from") in HUMAN_ROLES and reply.get("from") in MODEL_ROLES:
            pairs.append((str(turn.get("value", "")), str(reply.get("value", ""))))
    return pairs


def load_sharegpt(path: str | Path) -> LengthPairs:
    """Length pairs from a ShareGPT JSON dump (a list of ``{"id", "conversations": [{"from", "value"}, ...]}``).

    Every human -> model turn pair becomes one request; token lengths use :func:`approx_token_count`.
    """
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); --dataset for sharegpt must be a ShareGPT JSON dump") from e
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of conversations, got {type(records).__name__}")
    prompts, outputs = [], []
    for record in records:
        conversation = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(conversation, list):
            continue
        for human, model in _conversation_pairs(conversation):
            prompts.append(approx_token_count(human))
            outputs.append(approx_token_count(model) if model.strip() else 0)
    return _nonempty(_pairs_from(np.array(prompts), np.array(outputs)), path, "human -> gpt turn pairs")


def load_burstgpt(path: str | Path) -> LengthPairs:
    """Length pairs from a BurstGPT CSV (``Request tokens``, ``Response tokens``); failed requests are dropped.

    Rows with 0 response tokens are failures in BurstGPT's logs, not requests that produced nothing.
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
    return _nonempty(
        _pairs_from(lengths[BURSTGPT_REQUEST_COLUMN].to_numpy(), lengths[BURSTGPT_RESPONSE_COLUMN].to_numpy()),
        path,
        "rows with request and response tokens",
    )


def _nonempty(pairs: LengthPairs, path: Path, what: str) -> LengthPairs:
    if len(pairs) == 0:
        raise ValueError(f"{path}: no usable {what} (each needs >= 1 token and <= {MAX_TOTAL_TOKENS} in total)")
    return pairs


def sample_pairs(pairs: LengthPairs, n: int, rng: np.random.Generator) -> LengthPairs:
    """``n`` pairs drawn uniformly with replacement from ``pairs``."""
    index = rng.integers(0, len(pairs), size=n)
    return LengthPairs(pairs.prompt_tokens[index], pairs.output_tokens[index])
