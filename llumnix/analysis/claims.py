"""The claims table: each headline claim of the paper, computed from the aggregated data and judged against
tolerances stated in ``experiments/claims.yaml``. Nothing in the table is typed by hand except the paper's numbers
and where the paper's numbers sit.

A claim's value is computed once per seed (paired runs share a seed, hence the same trace), then reported as the
mean over seeds with its min-max and std. The verdict compares the mean with two bands: ``reproduced`` and
``partly``; anything else is ``not reproduced``. A claim is ``not measured`` when the data lack what it needs (a
column, e.g. ``avg_instances_per_step`` in runs made before it existed, or comparable points, e.g. two cost-latency
curves that do not overlap) and ``not run`` when its experiment has no data.

Where the maximum sits: for an "up to" claim (``over: max``; ``min`` likewise) each seed's value comes from one
point (trace, rate, swept value); the table records those points, and where the paper's number sits
(``paper_where``). When the paper's location names a trace (``workload``, ``trace`` or ``group``) and our maximum
sits on another trace in most seeds, the claim is at most ``partly``: the same number from a different place is not
the paper's result.

Kinds of claim (``baseline`` and ``system`` are values of the ``compare`` column, ``system`` by default):

- ``speedup``: baseline / system of ``metric`` at each point (trace, rate, sweep value), e.g. 14.8x lower P99;
- ``reduction``: 1 - system / baseline (a share, e.g. 0.70 for -70 %);
- ``overhead``: system / baseline - 1 (a share, e.g. 0.045 for +4.5 %);
- ``saving``: baseline / system - 1 at each point: the authors' arithmetic for a cost saving ("resource_save",
  osdi24ae ``artifact/65_auto_scaling/plot/plot.py:179``); 1 - system / baseline would be smaller;
- ``value``: the system's own ``metric`` (e.g. migration downtime in ms);
- ``matched_cost``: baseline / system - 1 of ``cost`` at equal ``metric`` (Fig 15: instances needed for the same
  P99 prefill latency). Each system's points, in the order of ``pair_on`` (the swept threshold), form a curve; the
  cost needed to reach a latency L is the least cost on that curve at which the latency is <= L, interpolated
  between neighbouring points on log(metric) (``interpolate: linear`` for a linear scale). The saving is evaluated
  at every latency level both curves cover (the overlap of their ranges: its ends and each point inside); curves
  that do not overlap give no value, and the claim says so;
- ``cross_saving``: baseline / system - 1 of ``cost`` between two chosen points (``baseline_at``, ``system_at``),
  e.g. the paper's "36.49 %": INFaaS++ at x=65 over Llumnix at x=5; both points' ``metric`` is shown, since a
  cost ratio of points with different latencies is not a saving at equal service. Without ``*_at`` every pair.

``over`` reduces the per-point values of one seed to one number: ``max`` for the paper's "up to", ``mean`` for its
"on average", ``min`` for "at least".

``point_tables`` in the claims file list claims (sharing their points, e.g. Fig 11's) whose per-point values are
tabulated in ``claims.md``: the mean over seeds and min-max at each trace and rate.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llumnix.analysis.experiments import ExperimentError, format_validation_error, read_yaml

VERDICTS = ("reproduced", "partly", "not reproduced", "not measured", "not run")
DEFAULT_PAIR_ON = ("trace", "rate", "sweep_value")
TRACE_COLUMNS = ("workload", "trace", "group")  # "a different trace than the paper's" is judged on these
LOCATION_COLUMNS = (*TRACE_COLUMNS, "cv", "sweep_param")  # recorded with each point besides its pair_on columns
_STATS = {"max": np.max, "mean": np.mean, "min": np.min}
_ARG = {"max": "idxmax", "min": "idxmin"}
RATIO_KINDS = ("speedup", "reduction", "overhead", "saving")


class MissingMeasurement(ValueError):
    """The data do not carry a column the claim needs (e.g. a metric added after the runs were made)."""


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


class PaperWhere(_Strict):
    """Where the paper's number sits: ``at`` the columns of that point (empty when not known), ``text`` in words
    with its source."""

    at: dict[str, Any] = Field(default_factory=dict)
    text: str

    def trace_columns(self) -> list[str]:
        return [c for c in TRACE_COLUMNS if c in self.at]

    def trace(self) -> str:
        return "/".join(str(self.at[c]) for c in self.trace_columns())


class ClaimSpec(_Strict):
    id: str
    figure: str
    claim: str = Field(description="The claim in words, as the paper makes it.")
    experiment: str
    kind: Literal["speedup", "reduction", "overhead", "saving", "value", "matched_cost", "cross_saving"]
    metric: str
    cost: str = Field("avg_instances", description="matched_cost, cross_saving: the cost column.")
    compare: str = "system"
    baseline: str | None = None
    system: str | None = None
    where: dict[str, list[Any]] = Field(default_factory=dict, description="Keep rows whose column is in the list.")
    pair_on: list[str] | None = Field(
        None, description="Columns that identify a point (default: trace, rate, sweep_value)."
    )
    over: Literal["max", "mean", "min"] = "max"
    interpolate: Literal["log", "linear"] = Field("log", description="matched_cost: scale of the metric axis.")
    baseline_at: dict[str, Any] = Field(default_factory=dict, description="cross_saving: the baseline's point.")
    system_at: dict[str, Any] = Field(default_factory=dict, description="cross_saving: the system's point.")
    paper: float | None = Field(description="The paper's number (null for a qualitative claim).")
    paper_text: str
    paper_where: PaperWhere | None = Field(None, description="Where the paper's number sits (trace, rate, ...).")
    unit: Literal["x", "%", "s", "ms", ""] = "x"
    reproduced: Band
    partly: Band
    note: str = ""

    @model_validator(mode="after")
    def _check(self) -> ClaimSpec:
        needs_baseline = self.kind != "value"
        if needs_baseline and (self.baseline is None or self.system is None):
            raise ValueError(f"kind {self.kind} needs both baseline and system")
        if (self.baseline_at or self.system_at) and self.kind != "cross_saving":
            raise ValueError("baseline_at / system_at are for kind cross_saving only")
        if self.paper is not None and not self.reproduced.contains(self.paper):
            raise ValueError(f"the paper's own value {self.paper} lies outside the 'reproduced' band")
        return self

    def how(self) -> str:
        m, b, s, c = self.metric, self.baseline, self.system, self.cost
        where = "; ".join(f"{k} in {', '.join(map(str, v))}" for k, v in self.where.items())
        where = f" ({where})" if where else ""
        if self.kind == "matched_cost":
            keys = ", ".join(self.pair_on or DEFAULT_PAIR_ON)
            return (
                f"{self.over} over the {m} levels both curves cover of {b} / {s} - 1 of {c} at equal {m}; each "
                f"system's ({c}, {m}) points over {keys} form a curve, the cost to reach a level is the least cost "
                f"on it with {m} <= the level, interpolated on {self.interpolate} {m}{where}"
            )
        if self.kind == "cross_saving":
            pinned = self.baseline_at and self.system_at
            pair = f"{c} of {b} at {_describe_at_spec(self.baseline_at)} / {c} of {s} at {_describe_at_spec(self.system_at)} - 1"
            return ("" if pinned else f"{self.over} over pairs of ") + f"{pair} (the two points' {m} shown){where}"
        what = {
            "speedup": f"{b} / {s} of {m}",
            "reduction": f"1 - {s} / {b} of {m}",
            "overhead": f"{s} / {b} - 1 of {m}",
            "saving": f"{b} / {s} - 1 of {m}",
            "value": f"{m} of {s}" if s else m,
        }[self.kind]
        return f"{self.over} over points of {what}{where}"


class PointTable(_Strict):
    """Claims whose values at each point are tabulated together (they must share their points' columns)."""

    title: str
    claims: list[str] = Field(min_length=1)


class ClaimsFile(_Strict):
    claims: list[ClaimSpec] = Field(min_length=1)
    point_tables: list[PointTable] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> ClaimsFile:
        ids = [c.id for c in self.claims]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"duplicate claim ids: {dup}")
        unknown = sorted({i for t in self.point_tables for i in t.claims} - set(ids))
        if unknown:
            raise ValueError(f"point_tables name unknown claims: {unknown}")
        for t in self.point_tables:
            kinds = {c.kind for c in self.claims if c.id in t.claims}
            if kinds & {"matched_cost", "cross_saving"}:
                raise ValueError(f"point table {t.title!r}: only per-point claims can be tabulated, not {kinds}")
        return self


def load_claims_file(path: Path | str) -> ClaimsFile:
    data = read_yaml(Path(path))
    try:
        return ClaimsFile.model_validate(data)
    except ValidationError as e:
        raise ExperimentError(format_validation_error(path, e)) from None


def load_claims(path: Path | str) -> list[ClaimSpec]:
    return load_claims_file(path).claims


# -- points ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    """One point's value of a claim: where it is in words, the numbers behind it (``detail``) and its columns
    (pair_on and trace columns)."""

    value: float
    where: str
    at: dict[str, Any] = field(default_factory=dict)
    detail: str = ""

    def describe(self) -> str:
        return f"{self.where} ({self.detail})" if self.detail else self.where


@dataclass(frozen=True)
class SeedResult:
    seed: Any
    value: float
    point: Point | None = None  # the point the value comes from (over: max / min)
    note: str = ""  # why there is no value (e.g. curves that do not overlap)


def _filter(df: pd.DataFrame, where: dict[str, list[Any]]) -> pd.DataFrame:
    for col, values in where.items():
        if col not in df.columns:
            raise ValueError(f"where: no column {col!r} in the data")
        df = df[df[col].isin(values)]
    return df


def _matches(series: pd.Series, value: Any) -> pd.Series:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and pd.api.types.is_numeric_dtype(series):
        return pd.Series(np.isclose(series.to_numpy(float), float(value)), index=series.index)
    return series.astype(str) == str(value)


def _select(df: pd.DataFrame, at: dict[str, Any]) -> pd.DataFrame:
    for col, value in at.items():
        if col not in df.columns:
            raise ValueError(f"no column {col!r} in the data")
        df = df[_matches(df[col], value)]
    return df


def _measured_columns(spec: ClaimSpec) -> list[str]:
    return [spec.metric, spec.cost] if spec.kind in ("matched_cost", "cross_saving") else [spec.metric]


def _require(df: pd.DataFrame, columns: list[str], all_missing: bool = True) -> None:
    """Raise MissingMeasurement for a column the data lack (or, with ``all_missing``, hold no value of)."""
    for col in columns:
        if col not in df.columns or (all_missing and df[col].isna().all()):
            raise MissingMeasurement(f"{col} is not measured in this data")


def _pair_columns(df: pd.DataFrame, spec: ClaimSpec) -> list[str]:
    cols = spec.pair_on if spec.pair_on is not None else [c for c in DEFAULT_PAIR_ON if c in df.columns]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"pair_on: no column(s) {missing} in the data")
    return cols


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def describe_at(at: dict[str, Any], keys: list[str]) -> str:
    """A point in words: 'L-L, 3 req/s', 'gamma-cv2, 2 req/s, scale_up=65', 'model=7b, seq_len=8192'."""
    parts = []
    for k in keys:
        v = at.get(k)
        if _is_missing(v):
            continue
        if k == "rate":
            parts.append(f"{_num(v)} req/s")
        elif k == "sweep_value":
            param = at.get("sweep_param")
            parts.append(f"{'x' if _is_missing(param) else param}={_num(v)}")
        elif k in ("trace", "workload", "group"):
            parts.append(str(v))
        else:
            parts.append(f"{k}={_num(v)}")
    return ", ".join(parts) or "all runs"


def _describe_at_spec(at: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_num(v)}" for k, v in at.items()) or "every point"


def _grouped(rows: pd.DataFrame, keys: list[str], columns: list[str]) -> pd.DataFrame:
    """Mean of ``columns`` per point (keys as columns), with the point's location columns alongside."""
    extras = [c for c in LOCATION_COLUMNS if c in rows.columns and c not in keys]
    if not keys:
        out = rows[columns].mean().to_frame().T
        for c in extras:
            out[c] = rows[c].iloc[0] if len(rows) else math.nan
        return out
    how = {**{c: "mean" for c in columns}, **{c: "first" for c in extras}}
    return rows.groupby(keys, dropna=False, sort=True).agg(how).reset_index()


def _at(row: pd.Series, keys: list[str]) -> dict[str, Any]:
    cols = list(dict.fromkeys([*keys, *[c for c in LOCATION_COLUMNS if c in row.index]]))
    return {c: row[c] for c in cols}


def _ratio_points(df: pd.DataFrame, spec: ClaimSpec, keys: list[str]) -> list[Point]:
    m = spec.metric
    b = _grouped(df[df[spec.compare] == spec.baseline], keys, [m]).rename(columns={m: "_b"})
    s = _grouped(df[df[spec.compare] == spec.system], keys, [m]).rename(columns={m: "_s"})
    if b.empty or s.empty:
        return []
    both = s.merge(b[[*keys, "_b"]], on=keys, how="inner") if keys else s.assign(_b=b["_b"].iloc[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        bv, sv = both["_b"].to_numpy(float), both["_s"].to_numpy(float)
        values = {
            "speedup": bv / sv,
            "reduction": 1.0 - sv / bv,
            "overhead": sv / bv - 1.0,
            "saving": bv / sv - 1.0,
        }[spec.kind]
    points = []
    for value, (_, row) in zip(values, both.iterrows(), strict=True):
        if math.isfinite(value):
            at = _at(row, keys)
            points.append(Point(float(value), describe_at(at, keys), at))
    return points


def _value_points(df: pd.DataFrame, spec: ClaimSpec, keys: list[str]) -> list[Point]:
    rows = df if spec.system is None else df[df[spec.compare] == spec.system]
    if not keys:  # every run is a point
        return [Point(float(v), f"run {i}", {}) for i, v in rows[spec.metric].items() if math.isfinite(v)]
    points = []
    for _, row in _grouped(rows, keys, [spec.metric]).iterrows():
        value = float(row[spec.metric])
        if math.isfinite(value):
            at = _at(row, keys)
            points.append(Point(value, describe_at(at, keys), at))
    return points


def cost_to_reach(level: float, latency: np.ndarray, cost: np.ndarray, log: bool = True) -> float:
    """The least cost at which a curve of (latency, cost) points, in sweep order, has latency <= ``level``:
    a point's own cost, or the cost where a segment crosses ``level`` (interpolated on log or linear latency)."""
    lat = np.asarray(latency, float)
    cost = np.asarray(cost, float)
    tr = np.log if log else (lambda x: np.asarray(x, float))
    t, tl = tr(lat), float(tr(level))
    candidates = list(cost[lat <= level * (1 + 1e-12)])
    for i in range(len(lat) - 1):
        a, b = t[i] - tl, t[i + 1] - tl
        if a * b < 0:  # the segment crosses the level strictly inside
            frac = (tl - t[i]) / (t[i + 1] - t[i])
            candidates.append(cost[i] + frac * (cost[i + 1] - cost[i]))
    return float(min(candidates)) if candidates else math.nan


def _curve(df: pd.DataFrame, spec: ClaimSpec, name: str, keys: list[str]) -> pd.DataFrame:
    rows = df[df[spec.compare] == name]
    return _grouped(rows, keys, [spec.metric, spec.cost]).dropna(subset=[spec.metric, spec.cost])


def _matched_cost(df: pd.DataFrame, spec: ClaimSpec, keys: list[str]) -> tuple[list[Point], str]:
    m, c = spec.metric, spec.cost
    base, sys_ = _curve(df, spec, spec.baseline, keys), _curve(df, spec, spec.system, keys)
    if base.empty or sys_.empty:
        return [], ""
    pb, cb = base[m].to_numpy(float), base[c].to_numpy(float)
    ps, cs = sys_[m].to_numpy(float), sys_[c].to_numpy(float)
    log = spec.interpolate == "log"
    if log and (np.any(pb <= 0) or np.any(ps <= 0)):
        raise ValueError(f"{m} must be positive to interpolate on its log")
    lo, hi = max(pb.min(), ps.min()), min(pb.max(), ps.max())
    ranges = (
        f"{spec.system} {m} {ps.min():.3g} to {ps.max():.3g}, {spec.baseline} {pb.min():.3g} to {pb.max():.3g}"
    )
    if lo > hi:
        return [], f"the curves do not overlap in {m} ({ranges}): no saving at equal {m}"
    levels = sorted({lo, hi, *[p for p in np.concatenate([pb, ps]) if lo <= p <= hi]})
    owners: dict[float, list[str]] = {}  # the measured points whose latency is a level
    for name, curve in ((spec.baseline, base), (spec.system, sys_)):
        for _, row in curve.iterrows():
            owners.setdefault(float(row[m]), []).append(f"{name} at {describe_at(_at(row, keys), keys)}")
    points = []
    for level in levels:
        need_b, need_s = cost_to_reach(level, pb, cb, log), cost_to_reach(level, ps, cs, log)
        value = need_b / need_s - 1.0
        if math.isfinite(value):
            where = f"{m} {level:.3g}" + (f" ({', '.join(owners[level])})" if level in owners else "")
            detail = f"{spec.baseline} {need_b:.3g} vs {spec.system} {need_s:.3g} {c}; both cover {lo:.3g} to {hi:.3g}"
            points.append(Point(float(value), where, {m: float(level)}, detail))
    return points, ""


def _cross_saving(df: pd.DataFrame, spec: ClaimSpec, keys: list[str]) -> list[Point]:
    m, c = spec.metric, spec.cost
    base = _grouped(_select(df[df[spec.compare] == spec.baseline], spec.baseline_at), keys, [m, c])
    sys_ = _grouped(_select(df[df[spec.compare] == spec.system], spec.system_at), keys, [m, c])
    points = []
    for _, brow in base.iterrows():
        for _, srow in sys_.iterrows():
            value = float(brow[c]) / float(srow[c]) - 1.0
            if not math.isfinite(value):
                continue
            bat, sat = _at(brow, keys), _at(srow, keys)
            numbers = {"baseline_cost": brow[c], "baseline_metric": brow[m], "system_cost": srow[c],
                       "system_metric": srow[m]}  # fmt: skip
            where = f"{spec.baseline} at {describe_at(bat, keys)} / {spec.system} at {describe_at(sat, keys)}"
            at = {**{f"baseline_{k}": v for k, v in bat.items()}, **{f"system_{k}": v for k, v in sat.items()}}
            points.append(Point(value, where, {**at, **numbers}, _cross_detail(spec, numbers)))
    return points


def _cross_detail(spec: ClaimSpec, n: dict[str, float]) -> str:
    return (
        f"{spec.cost} {n['baseline_cost']:.3g} vs {n['system_cost']:.3g}, "
        f"{spec.metric} {n['baseline_metric']:.3g} vs {n['system_metric']:.3g}"
    )


def points(df: pd.DataFrame, spec: ClaimSpec) -> tuple[list[Point], str]:
    """The claim's value at every point of one seed's data, and a note when there are none for a known reason."""
    keys = _pair_columns(df, spec)
    _require(df, _measured_columns(spec), all_missing=False)
    if spec.kind == "value":
        return _value_points(df, spec, keys), ""
    if spec.kind == "matched_cost":
        return _matched_cost(df, spec, keys)
    if spec.kind == "cross_saving":
        return _cross_saving(df, spec, keys), ""
    return _ratio_points(df, spec, keys), ""


def point_values(df: pd.DataFrame, spec: ClaimSpec) -> pd.Series:
    """The claim's value at every point of one seed's data (index: the points in words)."""
    pts, _ = points(df, spec)
    return pd.Series([p.value for p in pts], index=[p.describe() for p in pts], dtype=float)


def _seeds(df: pd.DataFrame, spec: ClaimSpec):
    df = _filter(df, spec.where)
    _require(df, _measured_columns(spec))
    if "seed" not in df.columns:
        df = df.assign(seed=0)
    return df.groupby("seed")


def seed_results(df: pd.DataFrame, spec: ClaimSpec) -> list[SeedResult]:
    """One value of the claim per seed, with the point it comes from for "up to" / "at least" claims."""
    out = []
    for seed, part in _seeds(df, spec):
        pts, note = points(part, spec)
        if not pts:
            out.append(SeedResult(seed, math.nan, None, note))
            continue
        values = pd.Series([p.value for p in pts], dtype=float)
        value = float(_STATS[spec.over](values.to_numpy()))
        point = pts[int(getattr(values, _ARG[spec.over])())] if spec.over in _ARG else None
        out.append(SeedResult(seed, value, point))
    return out


def per_seed_values(df: pd.DataFrame, spec: ClaimSpec) -> pd.Series:
    """One value of the claim per seed (index: seed); NaN where a seed has no comparable points."""
    return pd.Series({r.seed: r.value for r in seed_results(df, spec)}, dtype=float, name=spec.id)


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


def _same(ours: Any, paper: Any) -> bool:
    if _is_missing(ours):
        return False
    try:
        return math.isclose(float(ours), float(paper), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return str(ours) == str(paper)


def summarize_where(results: list[SeedResult], spec: ClaimSpec | None = None) -> str:
    """'L-L, 3 req/s (seeds 0, 2); S-S, 36 req/s (seed 1)'; one location for every seed: '... (all 3 seeds)'. For a
    cross_saving claim the two points' cost and metric, averaged over seeds, follow."""
    located = [r for r in results if r.point is not None]
    if not located:
        return ""
    by_where: dict[str, list] = {}
    for r in located:
        by_where.setdefault(r.point.where, []).append(r.seed)
    if len(by_where) == 1:
        ((where, seeds),) = by_where.items()
        text = where if len(seeds) == 1 else f"{where} (all {len(seeds)} seeds)"
    else:
        parts = []
        for where, seeds in by_where.items():
            label = "seed" if len(seeds) == 1 else "seeds"
            parts.append(f"{where} ({label} {', '.join(map(_num, seeds))})")
        text = "; ".join(parts)
    if spec is not None and spec.kind == "cross_saving":
        names = ("baseline_cost", "baseline_metric", "system_cost", "system_metric")
        mean = {n: float(np.mean([r.point.at[n] for r in located])) for n in names}
        text += (": " if len(located) == 1 else ": mean over seeds ") + _cross_detail(spec, mean)
    return text


def _note(spec: ClaimSpec, extra: str) -> str:
    return (spec.note + " " if spec.note else "") + extra


def evaluate(spec: ClaimSpec, data: pd.DataFrame | None) -> dict:
    """One row of the claims table."""
    pw = spec.paper_where
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
        "ours_where": "",
        "ours_where_seeds": "",
        "paper_where": pw.text if pw else "",
        "ours_trace": "",
        "paper_trace": pw.trace() if pw else "",
        "same_trace": None,
        "verdict_from_bands": "",
        "verdict_reason": "",
    }
    if data is None or data.empty:
        row["note"] = _note(spec, f"No data for {spec.experiment}.")
        return row
    try:
        results = seed_results(data, spec)
        row["scale"] = describe_scale(_filter(data, spec.where))
    except MissingMeasurement as e:
        row.update(verdict="not measured", note=_note(spec, f"Not measured: {e}."))
        return row
    except ValueError as e:
        row["note"] = _note(spec, f"Cannot compute from {spec.experiment}'s data: {e}.")
        return row
    finite = [r for r in results if math.isfinite(r.value)]
    row["seeds"] = len(finite)
    if not finite:
        reasons = sorted({r.note for r in results if r.note})
        row.update(verdict="not measured", note=_note(spec, " ".join(reasons) or "No comparable points in the data."))
        return row
    values = np.array([r.value for r in finite])
    row.update(
        ours_mean=float(values.mean()),
        ours_min=float(values.min()),
        ours_max=float(values.max()),
        ours_std=float(values.std(ddof=0)),
    )
    missing = [r for r in results if not math.isfinite(r.value)]
    if missing:
        row["note"] = _note(spec, f"Seed(s) {', '.join(_num(r.seed) for r in missing)} without a value: "
                                  + " ".join(sorted({r.note or 'no comparable points' for r in missing})) + ".")  # fmt: skip
    row["ours_where"] = summarize_where(finite, spec)
    row["ours_where_seeds"] = "; ".join(f"seed {_num(r.seed)}: {r.point.describe()}" for r in finite if r.point)
    row["verdict"] = row["verdict_from_bands"] = verdict(row["ours_mean"], spec)
    _judge_location(row, spec, data, finite)
    return row


def _judge_location(row: dict, spec: ClaimSpec, data: pd.DataFrame, finite: list[SeedResult]) -> None:
    """At most 'partly' when most seeds' maximum sits on another trace than the paper's."""
    pw = spec.paper_where
    located = [r.point for r in finite if r.point is not None]
    cols = [c for c in (pw.trace_columns() if pw else []) if c in data.columns]
    if not (cols and located):
        return
    labels = ["/".join(str(p.at.get(c)) for c in cols) for p in located]
    counts = Counter(labels)  # ties: every trace holding the most seeds' maxima, in seed order
    row["ours_trace"] = "; ".join(label for label in counts if counts[label] == max(counts.values()))
    hits = sum(all(_same(p.at.get(c), pw.at[c]) for c in cols) for p in located)
    row["same_trace"] = same = hits > len(located) / 2
    if same:
        return
    elsewhere = ", ".join(dict.fromkeys(label for label in labels if label != pw.trace()))
    reason = f"our maximum sits on the paper's {pw.trace()} in {hits} of {len(located)} seeds, else on {elsewhere}"
    if row["verdict"] == "reproduced":
        row["verdict"] = "partly"
        reason += ": at most partly"
    row["verdict_reason"] = reason


def claims_table(specs: list[ClaimSpec], data: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The claims table from each experiment's data (``data[experiment]``; a missing experiment is 'not run')."""
    return pd.DataFrame([evaluate(s, data.get(s.experiment)) for s in specs])


# -- per-point tables ------------------------------------------------------------------------------------------------
def _key(values) -> tuple:
    return tuple(None if _is_missing(v) else v for v in values)


def _data_order(agg: pd.DataFrame, df: pd.DataFrame, keys: list[str]) -> list[int]:
    """Row positions of ``agg`` sorted as the keys first appear in the data (traces in the experiment's order)."""
    rank = {k: {_key([v])[0]: i for i, v in enumerate(pd.unique(df[k]))} for k in keys}
    order = [tuple(rank[k].get(_key([r[k]])[0], -1) for k in keys) for _, r in agg.iterrows()]
    return sorted(range(len(agg)), key=lambda i: order[i])


def point_table(specs: list[ClaimSpec], data: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Each claim's value at each point, one row per claim and point (the point's pair_on and trace columns): the
    mean, min and max over seeds, the number of seeds, whether the point holds the claim's largest mean (smallest
    for ``over: min``), and whether the paper's number sits there. Claims without data are left out."""
    frames = []
    for spec in specs:
        df = data.get(spec.experiment)
        if df is None or df.empty:
            continue
        try:
            keys = _pair_columns(df, spec)
            rows = [{"seed": seed, **p.at, "value": p.value} for seed, part in _seeds(df, spec)
                    for p in points(part, spec)[0]]  # fmt: skip
        except ValueError:  # not measured / cannot compute: the claims table says why
            continue
        if not rows:
            continue
        long = pd.DataFrame(rows)
        extras = [c for c in long.columns if c not in (*keys, "seed", "value")]
        how = {"mean": ("value", "mean"), "min": ("value", "min"), "max": ("value", "max"),
               "seeds": ("value", "count"), **{c: (c, "first") for c in extras}}  # fmt: skip
        agg = long.groupby(keys, dropna=False, sort=False).agg(**how).reset_index()
        agg = agg.iloc[_data_order(agg, df, keys)].reset_index(drop=True)
        agg.insert(0, "claim", spec.id)
        agg["is_max"] = False
        if spec.over in _ARG:
            agg.loc[getattr(agg["mean"], _ARG[spec.over])(), "is_max"] = True
        pw = spec.paper_where
        if pw and pw.at and all(c in agg.columns for c in pw.at):
            agg["is_paper"] = [all(_same(r[c], v) for c, v in pw.at.items()) for _, r in agg.iterrows()]
        else:
            agg["is_paper"] = False
        frames.append(agg)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _compact(value: float, unit: str) -> str:
    return f"{100 * value:.0f}" if unit == "%" else f"{value:.3g}"


def _column_title(spec: ClaimSpec) -> str:
    b, s, m = spec.baseline, spec.system, spec.metric
    return {
        "speedup": f"{m}: {b} / {s}",
        "reduction": f"{m}: 1 - {s} / {b}",
        "overhead": f"{m}: {s} / {b} - 1",
        "saving": f"{m}: {b} / {s} - 1",
        "value": f"{m} of {s}" if s else m,
    }[spec.kind]


_KEY_TITLES = {"rate": "rate (req/s)", "sweep_value": "swept value"}


def render_point_table(title: str, specs: list[ClaimSpec], table: pd.DataFrame) -> list[str]:
    """A markdown table: one row per point, one column per claim."""
    lines = [f"### {title}", ""]
    ids = [s.id for s in specs]
    part = table[table["claim"].isin(ids)] if not table.empty else table
    absent = [i for i in ids if part.empty or i not in set(part["claim"])]
    footer = [f"Not in the data (see the claims table): {', '.join(f'`{i}`' for i in absent)}.", ""] if absent else []
    if part.empty:
        return lines + footer
    by_id = {s.id: s for s in specs}
    pair_cols = [c for c in dict.fromkeys(c for s in specs for c in (s.pair_on or DEFAULT_PAIR_ON)) if c in part.columns]
    keys = [c for c in pair_cols if part[c].notna().any()]
    claims = [c for c in ids if c in set(part["claim"])]
    cells_of = {(r["claim"], _key(r[k] for k in keys)): r for _, r in part.iterrows()}
    header = [_KEY_TITLES.get(k, k) for k in keys] + [_column_title(by_id[c]) for c in claims]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, key_row in part.drop_duplicates(subset=keys)[keys].iterrows():
        key = _key(key_row)
        cells = ["-" if v is None else _num(v) for v in key]
        for cid in claims:
            r = cells_of.get((cid, key))
            if r is None:
                cells.append("-")
                continue
            unit = by_id[cid].unit
            text = format_value(r["mean"], unit)
            if r["seeds"] > 1:
                text += f" ({_compact(r['min'], unit)}-{_compact(r['max'], unit)})"
            text = f"**{text}**" if r["is_max"] else text
            cells.append(text + (" †" if r["is_paper"] else ""))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines + [""] + footer


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


def _verdict_cell(row: pd.Series) -> str:
    text = f"**{row['verdict']}**"
    reason = row.get("verdict_reason", "")
    if isinstance(reason, str) and reason:
        text += f" ({reason})"
    return text


def render_markdown(
    table: pd.DataFrame,
    point_tables: list[tuple[str, list[ClaimSpec]]] | None = None,
    points_data: pd.DataFrame | None = None,
) -> str:
    """The claims table in markdown; ``point_tables`` (title, claims) with ``points_data`` (``point_table``'s frame)
    add a table per group of claims with their value at each point."""
    counts = table["verdict"].value_counts()
    tally = ", ".join(f"{counts.get(v, 0)} {v}" for v in VERDICTS)
    lines = [
        "# Claims of the paper and what this reproduction measures",
        "",
        "Generated by `llumnix claims` from `results/<experiment>/data.csv` and `experiments/claims.yaml`;",
        "do not edit. *Ours* is the mean over seeds of the claim computed per seed, with the min to max over seeds",
        "when there are several. The verdict compares the mean with the tolerances in `experiments/claims.yaml`;",
        "an \"up to\" claim whose maximum sits, in most seeds, on another trace than the paper's is at most *partly*.",
        "*Ours at*: the point (trace, rate, swept value) our per-seed maximum comes from; *paper at*: the paper's.",
        "*Not measured*: the data lack what the claim needs (the note says what).",
        "Simulated experiments use the reconstructed `a10-llama-7b` step-time profile, not real A10 GPUs.",
        "",
        f"**{tally}.**",
        "",
        "| claim | fig | paper | ours | scale | verdict | ours at | paper at | reproduced if | partly if |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        cells = [
            r["claim"], r["figure"], r["paper"], format_ours(r), r["scale"] or "-", _verdict_cell(r),
            r.get("ours_where") or "-", r.get("paper_where") or "-", r["reproduced_if"], r["partly_if"],
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    if point_tables:
        lines += [
            "",
            "## Each claim at each point",
            "",
            "The claim's value at each trace and rate: the mean over seeds, with the min-max over seeds in brackets.",
            "**Bold**: the point with the largest mean (for an \"up to\" claim); †: where the paper's number sits",
            "(`paper_where` in `experiments/claims.yaml`; every rate of its trace when the paper names no rate).",
            "",
        ]
        for title, specs in point_tables:
            lines += render_point_table(title, specs, points_data if points_data is not None else pd.DataFrame())
    lines += ["", "## How each value is computed", ""]
    for _, r in table.iterrows():
        note = f" {r['note']}" if r["note"] else ""
        seeds = r.get("ours_where_seeds")
        at = f" Per seed: {seeds}." if isinstance(seeds, str) and seeds and r["seeds"] > 1 else ""
        lines.append(f"- `{r['id']}`: {r['how']}.{note}{at}")
    return "\n".join(lines) + "\n"


def point_tables(claims: ClaimsFile, data: dict[str, pd.DataFrame]) -> tuple[list[tuple[str, list[ClaimSpec]]], pd.DataFrame]:
    """The claims file's point tables as (title, claims), and every tabulated claim's values at each point."""
    by_id = {c.id: c for c in claims.claims}
    groups = [(t.title, [by_id[i] for i in t.claims]) for t in claims.point_tables]
    specs = list({s.id: s for _, group in groups for s in group}.values())
    return groups, point_table(specs, data)


def read_experiment_data(results_dir: Path | str, experiments: list[str]) -> dict[str, pd.DataFrame]:
    """``results/<experiment>/data.csv`` of each experiment that has one."""
    out = {}
    for name in experiments:
        path = Path(results_dir) / name / "data.csv"
        if path.exists():
            out[name] = pd.read_csv(path)
    return out
