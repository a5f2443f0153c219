"""The claims table: each headline claim of the paper, computed from the aggregated data and judged against
tolerances stated in ``experiments/claims.yaml``. Nothing in the table is typed by hand except the paper's numbers.

A claim's value is computed once per seed (paired runs share a seed, hence the same trace), then reported as the
mean over seeds with its min-max and std. The verdict compares the mean with two bands: ``reproduced`` and
``partly``; anything else is ``not reproduced``; a claim whose experiment has no data is ``not run``.

Kinds of claim (``baseline`` and ``system`` are values of the ``compare`` column, ``system`` by default):

- ``speedup``: baseline / system of ``metric`` at each point (trace, rate, sweep value), e.g. 14.8x lower P99;
- ``reduction``: 1 - system / baseline (a share, e.g. 0.70 for -70 %);
- ``overhead``: system / baseline - 1 (a share, e.g. 0.045 for +4.5 %);
- ``value``: the system's own ``metric`` (e.g. migration downtime in ms);
- ``matched_cost``: 1 - system cost / baseline cost at the same ``metric`` (Fig 15: instances needed for the same
  P99 prefill latency), the baseline's cost interpolated linearly along its latency-cost curve. Where the system is
  faster than any baseline point, the baseline's cost at its own fastest point is used (a lower bound on the saving).

``over`` reduces the per-point values of one seed to one number: ``max`` for the paper's "up to", ``mean`` for its
"on average", ``min`` for "at least".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llumnix.analysis.experiments import ExperimentError, format_validation_error, read_yaml

VERDICTS = ("reproduced", "partly", "not reproduced", "not run")
DEFAULT_PAIR_ON = ("trace", "rate", "sweep_value")
_STATS = {"max": np.max, "mean": np.mean, "min": np.min}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Band(_Strict):
    """Closed interval; a missing end is unbounded."""

    min: float | None = None
    max: float | None = None

    def contains(self, value: float) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def describe(self, unit: str) -> str:
        lo = format_value(self.min, unit) if self.min is not None else None
        hi = format_value(self.max, unit) if self.max is not None else None
        if lo is not None and hi is not None:
            return f"{lo} to {hi}"
        if lo is not None:
            return f">= {lo}"
        if hi is not None:
            return f"<= {hi}"
        return "any value"


class ClaimSpec(_Strict):
    id: str
    figure: str
    claim: str = Field(description="The claim in words, as the paper makes it.")
    experiment: str
    kind: Literal["speedup", "reduction", "overhead", "value", "matched_cost"]
    metric: str
    cost: str = Field("avg_instances", description="matched_cost: the cost column.")
    compare: str = "system"
    baseline: str | None = None
    system: str | None = None
    where: dict[str, list[Any]] = Field(default_factory=dict, description="Keep rows whose column is in the list.")
    pair_on: list[str] | None = Field(
        None, description="Columns that identify a point (default: trace, rate, sweep_value)."
    )
    over: Literal["max", "mean", "min"] = "max"
    paper: float | None = Field(description="The paper's number (null for a qualitative claim).")
    paper_text: str
    unit: Literal["x", "%", "s", "ms", ""] = "x"
    reproduced: Band
    partly: Band
    note: str = ""

    @model_validator(mode="after")
    def _check(self) -> ClaimSpec:
        needs_baseline = self.kind != "value"
        if needs_baseline and (self.baseline is None or self.system is None):
            raise ValueError(f"kind {self.kind} needs both baseline and system")
        if self.paper is not None and not self.reproduced.contains(self.paper):
            raise ValueError(f"the paper's own value {self.paper} lies outside the 'reproduced' band")
        return self

    def how(self) -> str:
        m = self.metric
        what = {
            "speedup": f"{self.baseline} / {self.system} of {m}",
            "reduction": f"1 - {self.system} / {self.baseline} of {m}",
            "overhead": f"{self.system} / {self.baseline} - 1 of {m}",
            "value": f"{m} of {self.system}" if self.system else m,
            "matched_cost": f"1 - {self.cost} of {self.system} / {self.cost} of {self.baseline} at equal {m}",
        }[self.kind]
        where = "; ".join(f"{k} in {', '.join(map(str, v))}" for k, v in self.where.items())
        return f"{self.over} over points of {what}" + (f" ({where})" if where else "")


class ClaimsFile(_Strict):
    claims: list[ClaimSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> ClaimsFile:
        ids = [c.id for c in self.claims]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"duplicate claim ids: {dup}")
        return self


def load_claims(path: Path | str) -> list[ClaimSpec]:
    data = read_yaml(Path(path))
    try:
        return ClaimsFile.model_validate(data).claims
    except ValidationError as e:
        raise ExperimentError(format_validation_error(path, e)) from None


# -- computing -------------------------------------------------------------------------------------------------------
def _filter(df: pd.DataFrame, where: dict[str, list[Any]]) -> pd.DataFrame:
    for col, values in where.items():
        if col not in df.columns:
            raise ValueError(f"where: no column {col!r} in the data")
        df = df[df[col].isin(values)]
    return df


def _pair_columns(df: pd.DataFrame, spec: ClaimSpec) -> list[str]:
    cols = spec.pair_on if spec.pair_on is not None else [c for c in DEFAULT_PAIR_ON if c in df.columns]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"pair_on: no column(s) {missing} in the data")
    return cols


def _side(df: pd.DataFrame, spec: ClaimSpec, name: str, keys: list[str], columns: list[str]) -> pd.DataFrame:
    side = df[df[spec.compare] == name]
    if keys:
        side = side.groupby(keys, dropna=False)[columns].mean()
    return side[columns]


def point_values(df: pd.DataFrame, spec: ClaimSpec) -> pd.Series:
    """The claim's value at every point of one seed's data (index: the pair_on columns)."""
    keys = _pair_columns(df, spec)
    m = spec.metric
    if m not in df.columns:
        raise ValueError(f"metric {m!r} not in the data")
    if spec.kind == "value":
        rows = df if spec.system is None else df[df[spec.compare] == spec.system]
        vals = rows.groupby(keys, dropna=False)[m].mean() if keys else rows[m]
        return vals.astype(float)
    if spec.kind == "matched_cost":
        return _matched_cost(df, spec, keys)
    b = _side(df, spec, spec.baseline, keys, [m])[m].astype(float)
    s = _side(df, spec, spec.system, keys, [m])[m].astype(float)
    b, s = b.align(s, join="inner")
    with np.errstate(divide="ignore", invalid="ignore"):
        if spec.kind == "speedup":
            v = b / s
        elif spec.kind == "reduction":
            v = 1.0 - s / b
        else:  # overhead
            v = s / b - 1.0
    return v.replace([np.inf, -np.inf], np.nan).dropna()


def _matched_cost(df: pd.DataFrame, spec: ClaimSpec, keys: list[str]) -> pd.Series:
    cols = [spec.metric, spec.cost]
    if spec.cost not in df.columns:
        raise ValueError(f"cost column {spec.cost!r} not in the data")
    base = _side(df, spec, spec.baseline, keys, cols).sort_values(spec.metric)
    sys = _side(df, spec, spec.system, keys, cols)
    if base.empty or sys.empty:
        return pd.Series(dtype=float)
    lat, cost = base[spec.metric].to_numpy(float), base[spec.cost].to_numpy(float)
    out = {}
    for key, row in sys.iterrows():
        latency = row[spec.metric]
        if latency > lat.max():
            continue  # slower than every baseline point: the baseline's cost there is unknown
        needed = float(np.interp(latency, lat, cost))  # below lat.min(): clamps to the fastest baseline point
        out[key] = 1.0 - row[spec.cost] / needed
    return pd.Series(out, dtype=float)


def per_seed_values(df: pd.DataFrame, spec: ClaimSpec) -> pd.Series:
    """One value of the claim per seed (index: seed); NaN where a seed has no comparable points."""
    df = _filter(df, spec.where)
    if "seed" not in df.columns:
        df = df.assign(seed=0)
    stat = _STATS[spec.over]
    values = {}
    for seed, part in df.groupby("seed"):
        points = point_values(part, spec)
        values[seed] = float(stat(points.to_numpy())) if len(points) else math.nan
    return pd.Series(values, dtype=float, name=spec.id)


def verdict(value: float, spec: ClaimSpec) -> str:
    if value is None or not math.isfinite(value):
        return "not reproduced"
    if spec.reproduced.contains(value):
        return "reproduced"
    if spec.partly.contains(value):
        return "partly"
    return "not reproduced"


def describe_scale(df: pd.DataFrame) -> str:
    if df.empty:
        return ""
    scales = ", ".join(sorted(map(str, df["scale"].dropna().unique()))) if "scale" in df.columns else "?"
    parts = [scales]
    if "num_requests" in df.columns and df["num_requests"].notna().any():
        n = sorted(int(x) for x in df["num_requests"].dropna().unique())
        parts.append(f"{'/'.join(f'{x:,}' for x in n)} req/run")
    if "seed" in df.columns:
        k = df["seed"].nunique()
        parts.append(f"{k} seed" + ("s" if k != 1 else ""))
    return ", ".join(parts)


def evaluate(spec: ClaimSpec, data: pd.DataFrame | None) -> dict:
    """One row of the claims table."""
    row: dict = {
        "id": spec.id,
        "figure": spec.figure,
        "claim": spec.claim,
        "paper": spec.paper_text,
        "paper_value": spec.paper,
        "unit": spec.unit,
        "ours_mean": math.nan,
        "ours_min": math.nan,
        "ours_max": math.nan,
        "ours_std": math.nan,
        "seeds": 0,
        "scale": "",
        "verdict": "not run",
        "reproduced_if": spec.reproduced.describe(spec.unit),
        "partly_if": spec.partly.describe(spec.unit),
        "how": spec.how(),
        "note": spec.note,
    }
    if data is None or data.empty:
        row["note"] = (spec.note + " " if spec.note else "") + f"No data for {spec.experiment}."
        return row
    try:
        values = per_seed_values(data, spec)
        row["scale"] = describe_scale(_filter(data, spec.where))
    except ValueError as e:
        row["note"] = (spec.note + " " if spec.note else "") + f"Cannot compute from {spec.experiment}'s data: {e}."
        return row
    finite = values.dropna()
    row["seeds"] = int(len(finite))
    if len(finite):
        row.update(
            ours_mean=float(finite.mean()),
            ours_min=float(finite.min()),
            ours_max=float(finite.max()),
            ours_std=float(finite.std(ddof=0)),
        )
    else:
        row["note"] = (spec.note + " " if spec.note else "") + "No comparable points in the data."
    row["verdict"] = verdict(row["ours_mean"], spec)
    return row


def claims_table(specs: list[ClaimSpec], data: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The claims table from each experiment's data (``data[experiment]``; a missing experiment is 'not run')."""
    return pd.DataFrame([evaluate(s, data.get(s.experiment)) for s in specs])


# -- rendering -------------------------------------------------------------------------------------------------------
def format_value(value: float | None, unit: str) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    if unit == "x":
        return f"{value:.2f}x" if abs(value) < 10 else f"{value:.1f}x"
    if unit == "%":
        return f"{100 * value:.1f}%"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "s":
        return f"{value:.3g} s"
    return f"{value:.3g}"


def format_ours(row: pd.Series) -> str:
    if not math.isfinite(row["ours_mean"]):
        return "n/a"
    text = format_value(row["ours_mean"], row["unit"])
    if row["seeds"] > 1:
        text += f" ({format_value(row['ours_min'], row['unit'])} to {format_value(row['ours_max'], row['unit'])})"
    return text


def render_markdown(table: pd.DataFrame) -> str:
    counts = table["verdict"].value_counts()
    tally = ", ".join(f"{counts.get(v, 0)} {v}" for v in VERDICTS)
    lines = [
        "# Claims of the paper and what this reproduction measures",
        "",
        "Generated by `llumnix claims` from `results/<experiment>/data.csv` and `experiments/claims.yaml`;",
        "do not edit. *Ours* is the mean over seeds of the claim computed per seed, with the min to max over seeds",
        "when there are several. The verdict compares the mean with the tolerances in `experiments/claims.yaml`.",
        "Simulated experiments use the reconstructed `a10-llama-7b` step-time profile, not real A10 GPUs.",
        "",
        f"**{tally}.**",
        "",
        "| claim | fig | paper | ours | scale | verdict | reproduced if | partly if |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        cells = [
            r["claim"], r["figure"], r["paper"], format_ours(r), r["scale"] or "-", f"**{r['verdict']}**",
            r["reproduced_if"], r["partly_if"],
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines += ["", "## How each value is computed", ""]
    for _, r in table.iterrows():
        note = f" {r['note']}" if r["note"] else ""
        lines.append(f"- `{r['id']}`: {r['how']}.{note}")
    return "\n".join(lines) + "\n"


def read_experiment_data(results_dir: Path | str, experiments: list[str]) -> dict[str, pd.DataFrame]:
    """``results/<experiment>/data.csv`` of each experiment that has one."""
    out = {}
    for name in experiments:
        path = Path(results_dir) / name / "data.csv"
        if path.exists():
            out[name] = pd.read_csv(path)
    return out
