"""Collect runs into tables: one row per run (``data.csv``), and fragmentation timelines (``timeline.csv``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from llumnix.analysis.experiments import Experiment, expand_runs, run_metadata

MEASUREMENT_DEFAULTS = {"scale": "measured", "seed": 0}


def flatten_summary(summary: dict, sep: str = "_") -> dict:
    """``{"high": {"e2e_mean_s": 1}}`` -> ``{"high_e2e_mean_s": 1}``; scalars stay as they are."""
    out: dict = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            for sub, v in flatten_summary(value, sep).items():
                out[f"{key}{sep}{sub}"] = v
        else:
            out[key] = value
    return out


def read_summary(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; run the simulation first (snakemake does)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it and rerun") from None


def aggregate_runs(exp: Experiment, scale: str, root: Path | str = ".") -> pd.DataFrame:
    """One row per run of the experiment at this scale: what the run was (wildcards, trace and system options)
    followed by every key of its summary.json (nested ``high`` / ``normal`` dicts flattened to ``high_*``)."""
    rows = []
    for run in expand_runs(exp, scale):
        summary = flatten_summary(read_summary(Path(root) / run.run_dir(scale) / "summary.json"))
        meta = run_metadata(exp, run, scale)
        # The summary's own 'policy' / 'seed' agree with the metadata; the metadata wins on name clashes.
        rows.append({**meta, **{k: v for k, v in summary.items() if k not in meta}})
    if not rows:
        raise ValueError(f"experiment {exp.name} has no runs at scale {scale}")
    return pd.DataFrame(rows)


def fragmentation_timeline(exp: Experiment, scale: str, root: Path | str = ".") -> pd.DataFrame:
    """The cluster's fragmentation over time for every run: (system, system_label, seed, rate, time_s, fragmentation,
    free_blocks). Fragmentation is a cluster-level quantity repeated on each instance's sample; take it once."""
    frames = []
    for run in expand_runs(exp, scale):
        inst = pd.read_parquet(Path(root) / run.run_dir(scale) / "instances.parquet")
        per_time = inst.groupby("time_s", as_index=False).agg(
            fragmentation=("fragmentation", "first"), free_blocks=("free_blocks", "sum")
        )
        meta = run_metadata(exp, run, scale)
        for key in ("system", "system_label", "seed", "rate", "trace", "scale", "num_requests"):
            per_time[key] = meta[key]
        frames.append(per_time)
    return pd.concat(frames, ignore_index=True)


def load_measurements(exp: Experiment, path: Path | str) -> pd.DataFrame:
    """A committed CSV of real measurements (fig10, fig16), with the columns the figure and claims need."""
    df = pd.read_csv(path)
    needed = [c for c in (exp.figure.x, exp.figure.y, exp.figure.hue) if c]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} that experiment {exp.name}'s figure needs")
    df.insert(0, "experiment", exp.name)
    for key, value in MEASUREMENT_DEFAULTS.items():
        if key not in df.columns:
            df[key] = value
    return df


def seed_spread(df: pd.DataFrame, keys: list[str], metric: str) -> pd.DataFrame:
    """Mean, min, max and std of a metric over seeds for each combination of ``keys``."""
    g = df.groupby(keys, dropna=False)[metric]
    out = g.agg(["mean", "min", "max", "std", "count"]).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
