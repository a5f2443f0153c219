"""An in-situ profile: the step-time model fitted to the steps a real cluster's instances ran while serving.

``llumnix profile`` times one instance's forwards on an otherwise quiet machine (or beside busy copies of itself).
On a CPU cluster the instances also share the cores with the HTTP frontend, Ray and the client, and how much they
share varies with the load, so neither profile gives the step times the instances really had. Every instance actor
logs its steps (``GET /admin/steps``: start and end, kind, batch, tokens); :func:`insitu_profile` fits the
simulator's step-time model to those records, keeping everything else (model shape, KV pool, migration costs) from a
measured base profile. With the per-request legs that a real cluster adds around the engines
(:func:`request_legs`: arrival to dispatch, step end to the client), the simulator then models the same instances as
the real run: what remains of its error is the scheduling model's, not the step-time model's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from llumnix.core.request import Request
from llumnix.profiles import Profile
from llumnix.profiles.profile import DecodePoint, PrefillPoint

STEP_COLUMNS = ("instance_id", "start_s", "end_s", "kind", "batch_size", "prefill_tokens", "prefill_sum_sq",
                "context_tokens")  # fmt: skip
# A gap between two steps of one instance longer than this is idleness (the step loop waits up to 50 ms for work),
# not the loop's own overhead between back-to-back steps.
BACK_TO_BACK_GAP_S = 0.02


def steps_table(rows: Iterable[dict]) -> pd.DataFrame:
    """The ``/admin/steps`` rows as a table with ``duration_s``; raises if a column is missing."""
    df = pd.DataFrame(list(rows), columns=list(STEP_COLUMNS))
    df["duration_s"] = df["end_s"] - df["start_s"]
    return df.sort_values(["instance_id", "start_s"], kind="stable").reset_index(drop=True)


def back_to_back_gap_s(steps: pd.DataFrame) -> float:
    """Median time an instance's loop spends between a decode step and its next step when it had work waiting."""
    gaps = []
    for _, one in steps.groupby("instance_id", sort=True):
        start = one["start_s"].to_numpy()
        end = one["end_s"].to_numpy()
        decode = (one["kind"] == "decode").to_numpy()
        gap = start[1:] - end[:-1]
        gaps.append(gap[decode[:-1] & (gap >= 0) & (gap < BACK_TO_BACK_GAP_S)])
    all_gaps = np.concatenate(gaps) if gaps else np.array([])
    return float(np.median(all_gaps)) if all_gaps.size else 0.0


def concurrent_steps(steps: pd.DataFrame) -> np.ndarray:
    """Per step: how many instances (itself included) were mid-step at its start, as the simulator counts them."""
    at = steps["start_s"].to_numpy()
    count = np.zeros(len(steps), dtype=int)
    for _, one in steps.groupby("instance_id", sort=True):
        starts, ends = one["start_s"].to_numpy(), one["end_s"].to_numpy()  # one instance's steps never overlap
        k = np.searchsorted(starts, at, side="right") - 1
        count += (k >= 0) & (ends[np.clip(k, 0, None)] > at)
    return count


def _binned(df: pd.DataFrame, keys: Sequence[str], values: Sequence[str]) -> pd.DataFrame:
    """Mean of ``values`` and ``duration_s`` per bin of ``keys``; the count of steps per bin. Means, not medians:
    durations under CPU sharing are heavy-tailed, and the time a queue waits is their sum."""
    agg = {v: "mean" for v in values} | {"duration_s": "mean", "kind": "size"}
    return df.groupby(list(keys), sort=True).agg(agg).rename(columns={"kind": "steps"}).reset_index()


def insitu_profile(steps: pd.DataFrame, base: Profile, name: str, provenance: str) -> Profile:
    """``base`` with its prefill and decode tables replaced by the means of the logged steps (binned: prefill by
    16 tokens, decode by batch size and 64 context tokens) and its step overhead by the loop's back-to-back gap."""
    steps = steps.copy()
    steps["busy"] = concurrent_steps(steps)
    slowdown = _slowdown(steps, base, max_instances=int(steps["busy"].max()) if len(steps) else 1)
    steps["duration_s"] = steps["duration_s"] / np.asarray(slowdown)[steps["busy"].to_numpy() - 1]
    prefill = steps.loc[steps["kind"] == "prefill"].copy()
    decode = steps.loc[steps["kind"] == "decode"].copy()
    prefill["bin"] = (prefill["prefill_tokens"] + 15) // 16
    decode["bin"] = (decode["context_tokens"] + 63) // 64
    p = _binned(prefill, ["bin"], ["prefill_tokens", "prefill_sum_sq"])
    d = _binned(decode, ["batch_size", "bin"], ["context_tokens"])
    prefill_points = [
        PrefillPoint(total_tokens=int(n), sum_sq_tokens=int(min(max(sq, n), n * n)), time_s=float(t))
        for n, sq, t in zip(p["prefill_tokens"].round(), p["prefill_sum_sq"].round(), p["duration_s"], strict=True)
    ]
    decode_points = [
        DecodePoint(batch_size=int(b), total_context_tokens=int(max(c, b)), time_s=float(t))
        for b, c, t in zip(d["batch_size"], d["context_tokens"].round(), d["duration_s"], strict=True)
    ]
    # The fit weighs relative errors, so a few very slow steps barely move it; rescale each table so that the
    # fitted times of the logged steps add up to their measured total (what the queues behind them wait for).
    fitted = base.model_copy(update={"step_overhead_s": 0.0, "prefill": prefill_points, "decode": decode_points})
    k_prefill = prefill["duration_s"].sum() / sum(
        _prefill_fit_s(fitted, n, sq)
        for n, sq in zip(prefill["prefill_tokens"], prefill["prefill_sum_sq"], strict=True))
    k_decode = decode["duration_s"].sum() / sum(
        fitted.decode_time_s(b, c) for b, c in zip(decode["batch_size"], decode["context_tokens"], strict=True))
    prefill_points = [pt.model_copy(update={"time_s": pt.time_s * k_prefill}) for pt in prefill_points]
    decode_points = [pt.model_copy(update={"time_s": pt.time_s * k_decode}) for pt in decode_points]
    gap = back_to_back_gap_s(steps)
    return base.model_copy(update={
        "name": name,
        "description": f"In-situ step times of a real cluster's instances ({base.model}, {base.total_blocks} blocks "
                       f"each), fitted to {len(prefill)} prefill and {len(decode)} decode steps they ran while serving.",
        "provenance": provenance,
        "assumptions": [
            *base.assumptions,
            f"in situ: prefill and decode tables are means of the steps logged by the real instances (scheduling, "
            f"forward and token emission; {len(p)} prefill and {len(d)} decode bins), rescaled so that the fitted times of "
            f"the logged steps add up to their measured total (prefill x{k_prefill:.2f}, decode x{k_decode:.2f}); "
            f"step_overhead_s = {gap * 1e3:.3f}"
            f" ms is the median gap between back-to-back steps of one instance; migration costs are the base "
            f"profile's ({base.name})",
            "in situ: concurrency_slowdown[n-1] = the steps started while n instances stepped took that many times "
            "the time of those started alone (sum of durations over sum of the base profile's times of the same "
            "steps, relative to n = 1); the tables are the steps' durations divided by their factor: "
            + ", ".join(f"{n + 1}: {f:.2f}" for n, f in enumerate(slowdown)),
        ],
        "step_overhead_s": gap,
        "concurrency_slowdown": slowdown,
        "prefill": prefill_points,
        "decode": decode_points,
    })


def _prefill_fit_s(profile: Profile, total_tokens: int, sum_sq_tokens: int) -> float:
    """The fitted prefill time of a batch given by its token count and sum of squares (step overhead included)."""
    fit = profile.prefill_fit
    return profile.step_overhead_s + fit.fixed_s + fit.per_token_s * total_tokens + fit.per_sq_token_s * sum_sq_tokens


def _slowdown(steps: pd.DataFrame, base: Profile, max_instances: int) -> list[float]:
    """Per number of instances stepping at once: the steps' summed duration over what ``base`` predicts for them,
    relative to the steps that ran alone (a level with no step repeats the one below)."""
    if (steps["kind"] == "prefill").sum() == 0 or (steps["kind"] == "decode").sum() == 0:
        raise ValueError(f"the step log has {(steps['kind'] == 'prefill').sum()} prefill and "
                         f"{(steps['kind'] == 'decode').sum()} decode steps: an in-situ profile needs both "
                         "(serve a trace first)")
    predicted = np.array([
        base.prefill_time_s([n]) if kind == "prefill" else base.decode_time_s(b, c)
        for kind, n, b, c in zip(steps["kind"], steps["prefill_tokens"], steps["batch_size"], steps["context_tokens"],
                                 strict=True)
    ])  # fmt: skip  # a prefill's time from its total tokens (its sum of squares is in the bins below)
    ratios = []
    for n in range(1, max_instances + 1):
        mask = steps["busy"].to_numpy() == n
        ratios.append(float(steps["duration_s"].to_numpy()[mask].sum() / predicted[mask].sum()) if mask.any() else
                      (ratios[-1] if ratios else 1.0))
    return [r / ratios[0] for r in ratios]


def request_legs(requests: Sequence[Request]) -> dict[str, float]:
    """What the real cluster adds around the engines, per request (client clock = engine clock, one machine):
    ``dispatch_latency``: sent -> queued on its first instance; ``delivery_latency``: end of its first prefill on the
    instance -> its first token at the client. Means and medians, seconds (nan when nothing was recorded)."""
    dispatch = [r.dispatch_s - r.arrival_s for r in requests if r.dispatch_s is not None]
    delivery = [r.first_token_s - r.prefill_ends_s[0] for r in requests
                if r.first_token_s is not None and r.prefill_ends_s]  # fmt: skip
    out = {}
    for name, values in (("dispatch_latency", dispatch), ("delivery_latency", delivery)):
        out[f"{name}_mean_s"] = float(np.mean(values)) if values else math.nan
        out[f"{name}_p50_s"] = float(np.median(values)) if values else math.nan
    return out


def load_legs(summary_path: Path) -> tuple[float, float]:
    """The mean dispatch and delivery latencies a real run recorded in its ``summary.json``."""
    import json

    summary = json.loads(Path(summary_path).read_text())
    try:
        legs = summary["dispatch_latency_mean_s"], summary["delivery_latency_mean_s"]
    except KeyError as e:
        raise ValueError(f"{summary_path} has no {e.args[0]}: it is not a summary of `llumnix real-cluster` "
                         "(rerun the real run with this version)") from None
    if not all(math.isfinite(v) and v >= 0 for v in legs):
        raise ValueError(f"{summary_path}: dispatch / delivery latencies {legs} are not usable (no request recorded "
                         "its dispatch or first prefill)")
    return legs
