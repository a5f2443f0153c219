"""The authors' own traces, draw for draw: what the artifact's client sent for a generated workload.

``benchmarks-repo/benchmark_throughput.py`` (osdi24ae, commit 92f6f9d5) seeds Python's and numpy's global generators
with ``0xCADE`` for every run (lines 952-953), so every run of a configuration replays one trace. Its numpy stream
draws the prompts' lengths (one batch), then the outputs' (lines 954-967, ``gen_random_response_lens``), then one
gap after each request is sent (``async_request_gen`` -> ``get_wait_time``, lines 25-58: ``np.random.exponential(1 /
qps)`` for Poisson, ``np.random.gamma(1 / cv**2, cv**2 / qps)`` for Gamma); the first request goes at t = 0. Its
Python stream draws every prompt token (``random.randint(10, vocab_size)`` for each token of each prompt, line 795,
LLaMA's 32,000-token vocabulary), one ``random.random()`` per request for its session id (``--gen_random_session_id``,
lines 821-834), then, per request, ``random.random() < priority_ratio`` for its priority (lines 46-53).

``artifact_trace`` replays both streams (numpy's legacy ``RandomState``, Python's ``random.Random``), so the lengths,
arrival times and priority tags are the ones the paper's runs of S/M/L workloads sent (up to the client's timing
jitter). The paper's P99 values come from that one trace; ``make_trace`` with a seed draws other traces of the same
distributions, for the spread the paper does not show.
"""

from __future__ import annotations

import random

import numpy as np
import pandas as pd

from llumnix.workload.zipf import ZIPF_BY_LETTER

ARTIFACT_SEED = 0xCADE  # random.seed / np.random.seed in benchmark_throughput.py lines 952-953
LLAMA_VOCAB_SIZE = 32_000  # the LLaMA-7B tokenizer's vocabulary (random prompt tokens, line 795)


def artifact_gaps(rs: np.random.RandomState, rate: float, n: int, arrival: str, cv: float) -> np.ndarray:
    """The gaps ``get_wait_time`` draws, one after each of the ``n`` requests (the last one unused)."""
    mean = 1.0 / rate
    if arrival == "poisson":
        return np.array([rs.exponential(mean) for _ in range(n)])
    variance = (cv * mean) ** 2
    return np.array([rs.gamma(mean**2 / variance, variance / mean) for _ in range(n)])


def artifact_priorities(prompt_tokens: np.ndarray, fraction: float) -> np.ndarray:
    """The priority tags of the artifact's client: Python's stream after every prompt token and session id."""
    n = len(prompt_tokens)
    if fraction <= 0:
        return np.zeros(n, dtype=np.int64)
    py = random.Random(ARTIFACT_SEED)
    for length in prompt_tokens:
        for _ in range(int(length)):
            py.randint(10, LLAMA_VOCAB_SIZE)
    for _ in range(n):
        py.random()  # the session id (--new_session_ratio 1.0: always a fresh uuid)
    return np.array([1 if py.random() < fraction else 0 for _ in range(n)], dtype=np.int64)


def artifact_trace(workload: str, rate: float, num_requests: int, arrival: str = "poisson", cv: float = 1.0,
                   priority_fraction: float = 0.0) -> pd.DataFrame:
    """The artifact's trace of a generated workload (``S-S`` ... ``L-S``): its lengths, arrivals and priorities."""
    from llumnix.workload.trace import TRACE_COLUMNS

    prompt_letter, output_letter = workload.split("-")
    rs = np.random.RandomState(ARTIFACT_SEED)
    prompt = ZIPF_BY_LETTER[prompt_letter].sample(num_requests, rs)
    output = ZIPF_BY_LETTER[output_letter].sample(num_requests, rs)
    gaps = artifact_gaps(rs, float(rate), num_requests, arrival, float(cv))
    arrivals = np.concatenate([[0.0], np.cumsum(gaps[:-1])])
    return pd.DataFrame(
        {
            "request_id": np.arange(num_requests, dtype=np.int64),
            "arrival_s": arrivals,
            "prompt_tokens": prompt.astype(np.int64),
            "output_tokens": output.astype(np.int64),
            "priority": artifact_priorities(prompt, float(priority_fraction)),
        },
        columns=list(TRACE_COLUMNS),
    )
