"""Request traces: generate (:func:`make_trace`), write and read back with validation (:func:`read_trace`).

A trace is a table with one row per request and exactly the columns of :data:`TRACE_COLUMNS`, sorted by arrival.
"""

from __future__ import annotations

from numbers import Integral, Real
from pathlib import Path

import numpy as np
import pandas as pd

from llumnix.workload.arrivals import ARRIVAL_PROCESSES, arrival_times, check_cv, check_rate
from llumnix.workload.datasets import LengthPairs, burstgpt, load_burstgpt, load_sharegpt, sample_pairs, sharegpt
from llumnix.workload.lengths import POWER_LAW_BY_LETTER

#: Generated input-output traces (S = Short, M = Medium, L = Long), then the two dataset workloads.
GENERATED_WORKLOADS: tuple[str, ...] = ("S-S", "M-M", "L-L", "S-L", "L-S")
DATASET_WORKLOADS: tuple[str, ...] = ("sharegpt", "burstgpt")
WORKLOADS: tuple[str, ...] = GENERATED_WORKLOADS + DATASET_WORKLOADS

TRACE_COLUMNS: tuple[str, ...] = ("request_id", "arrival_s", "prompt_tokens", "output_tokens", "priority")
TRACE_EXTENSIONS: tuple[str, ...] = (".csv", ".parquet")

_INT_COLUMNS = ("request_id", "prompt_tokens", "output_tokens", "priority")


class TraceError(ValueError):
    """A trace file that cannot be used; the message names the file, the problem and the fix."""


# -- generation ----------------------------------------------------------------------------------------------------


def _check_args(workload: str, rate: float, num_requests: int, seed: int, arrival: str, cv: float,
                priority_fraction: float, dataset_path: str | Path | None) -> None:
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


def _lengths(workload: str, n: int, rng: np.random.Generator, dataset_path: str | Path | None) -> LengthPairs:
    if workload in GENERATED_WORKLOADS:
        prompt_letter, output_letter = workload.split("-")
        prompt = POWER_LAW_BY_LETTER[prompt_letter].sample(n, rng)
        return LengthPairs(prompt, POWER_LAW_BY_LETTER[output_letter].sample(n, rng))
    if dataset_path is None:
        return sharegpt(n, rng) if workload == "sharegpt" else burstgpt(n, rng)
    loaded = load_sharegpt(dataset_path) if workload == "sharegpt" else load_burstgpt(dataset_path)
    return sample_pairs(loaded, n, rng)


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
) -> pd.DataFrame:
    """A trace of ``num_requests`` requests; the same arguments always give the same table.

    Arrivals, lengths and priorities use independent child streams of ``seed``, so changing the rate, the arrival
    process or the priority fraction leaves the other columns unchanged: sweeps compare like with like.
    """
    _check_args(workload, rate, num_requests, seed, arrival, cv, priority_fraction, dataset_path)
    arrival_rng, length_rng, priority_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    pairs = _lengths(workload, num_requests, length_rng, dataset_path)
    return pd.DataFrame(
        {
            "request_id": np.arange(num_requests, dtype=np.int64),
            "arrival_s": arrival_times(arrival, float(rate), num_requests, arrival_rng, cv=float(cv)),
            "prompt_tokens": pairs.prompt_tokens.astype(np.int64),
            "output_tokens": pairs.output_tokens.astype(np.int64),
            "priority": high_priority_mask(num_requests, float(priority_fraction), priority_rng),
        },
        columns=list(TRACE_COLUMNS),
    )


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
