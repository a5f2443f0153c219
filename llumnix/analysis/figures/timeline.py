"""Figure kind ``timeline`` (Fig 12): the cluster's fragmentation over time, one line per system."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from llumnix.analysis.experiments import Experiment
from llumnix.analysis.plots import FIGURE_KINDS, finish, scale_note, system_order

SMOOTH_S = 30.0  # window of the rolling mean drawn over the raw samples


@FIGURE_KINDS.register("timeline", needs_timeline=True)
def plot_timeline(exp: Experiment, data: pd.DataFrame, out: Path, timeline: pd.DataFrame) -> list[Path]:
    """Fig 12: the cluster's fragmentation over time, one line per system (first seed): each sample faintly, a
    rolling mean over ``SMOOTH_S`` seconds on top; the legend gives each system's time-averaged value."""
    order = system_order(exp, data)
    seed = sorted(timeline["seed"].unique())[0]
    part = timeline[timeline["seed"] == seed].sort_values("time_s").copy()
    part["fragmentation_pct"] = 100 * part["fragmentation"]
    step = part["time_s"].diff().median()
    window = max(1, int(round(SMOOTH_S / step))) if step and step > 0 else 1
    part["smoothed_pct"] = part.groupby("system_label")["fragmentation_pct"].transform(
        lambda s: s.rolling(window, min_periods=1, center=True).mean()
    )
    palette = dict(zip(order, sns.color_palette(n_colors=len(order)), strict=True))
    means = data.groupby("system_label")["fragmentation_mean"].mean()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for label in order:
        one = part[part["system_label"] == label]
        ax.plot(one["time_s"], one["fragmentation_pct"], color=palette[label], lw=0.5, alpha=0.25)
        mean = f" (time-averaged {100 * means[label]:.1f}%)" if label in means.index else ""
        ax.plot(one["time_s"], one["smoothed_pct"], color=palette[label], lw=1.4, label=f"{label}{mean}")
    ax.legend(fontsize=8)
    ax.set_xlabel("Time (s)")
    ax.set_ylabel("Fragmented free KV memory (%)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    trace = exp.traces[part["trace"].iloc[0]]
    note = (
        scale_note(exp, data)
        + f" Trace {trace.workload} at {part['rate'].iloc[0]:g} req/s, seed {seed};"
        + f" thick lines: {SMOOTH_S:g} s rolling mean."
    )
    return finish(fig, exp, note, out)
