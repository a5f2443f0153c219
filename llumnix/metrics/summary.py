"""Metrics as the paper defines them.

- prefill latency: arrival to first token (queueing included);
- decode latency: a request's mean time per output token after the first;
- end-to-end latency: arrival to last token;
- preemption loss: per request, for each preemption, the time from being preempted to finishing its next prefill
  (the wait plus the recompute), summed; averaged over *all* requests.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SUMMARY_LATENCY_KEYS = (
    "prefill_mean_s",
    "prefill_p50_s",
    "prefill_p99_s",
    "decode_mean_s",
    "decode_p50_s",
    "decode_p99_s",
    "e2e_mean_s",
    "e2e_p50_s",
    "e2e_p99_s",
)


def _latency_stats(df: pd.DataFrame) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, col in (("prefill", "prefill_latency_s"), ("decode", "decode_latency_s"), ("e2e", "e2e_latency_s")):
        v = df[col].dropna().to_numpy()
        out[f"{name}_mean_s"] = float(v.mean()) if v.size else float("nan")
        out[f"{name}_p50_s"] = float(np.percentile(v, 50)) if v.size else float("nan")
        out[f"{name}_p99_s"] = float(np.percentile(v, 99)) if v.size else float("nan")
    return out


def summarize(
    requests_df: pd.DataFrame,
    instances_df: pd.DataFrame | None = None,
    *,
    avg_instances: float | None = None,
    migrations: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """The run's summary: the keys the workflow and its checks read (see README)."""
    finished = requests_df["finish_s"].notna()
    summary: dict = {
        "requests": int(len(requests_df)),
        "finished": int(finished.sum()),
        **_latency_stats(requests_df),
        "preemptions": int(requests_df["num_preemptions"].sum()),
        "preemption_loss_s": float(requests_df["preemption_loss_s"].mean()) if len(requests_df) else 0.0,
        "migrations": int(requests_df["num_migrations"].sum()),
        "avg_instances": float(avg_instances) if avg_instances is not None else float("nan"),
    }
    if migrations:
        summary.update(migrations)
    if instances_df is not None and len(instances_df):
        per_time = instances_df.groupby("time_s")["fragmentation"].first()
        summary["fragmentation_mean"] = float(per_time.mean())
    if requests_df["priority"].nunique() > 1:
        for name, value in (("high", 1), ("normal", 0)):
            sub = requests_df[requests_df["priority"] == value]
            summary[name] = {"requests": int(len(sub)), **_latency_stats(sub)}
    if extra:
        summary.update(extra)
    return summary
