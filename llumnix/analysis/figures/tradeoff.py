"""Figure kind ``tradeoff`` (Fig 15): latency against cost, one point per swept value, one line per system."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from llumnix.analysis.experiments import Experiment
from llumnix.analysis.plots import FIGURE_KINDS, finish, metric_label, scale_note, system_order


@FIGURE_KINDS.register("tradeoff")
def plot_tradeoff(exp: Experiment, data: pd.DataFrame, out: Path) -> list[Path]:
    """Fig 15: latency against cost, one point per threshold, one line per system; bars: min-max over seeds."""
    xcol, ycol = exp.figure.x or "avg_instances", exp.figure.y or "prefill_p99_s"
    order = system_order(exp, data)
    agg = (
        data.groupby(["system_label", "sweep_value"])[[xcol, ycol]]
        .agg(["mean", "min", "max"])
        .reset_index()
        .sort_values(["system_label", "sweep_value"])
    )
    fig, ax = plt.subplots(figsize=(5, 3.6))
    palette = dict(zip(order, sns.color_palette(n_colors=len(order)), strict=True))
    for label in order:
        a = agg[agg["system_label"] == label]
        xm, ym = a[(xcol, "mean")], a[(ycol, "mean")]
        ax.errorbar(
            xm, ym,
            xerr=[xm - a[(xcol, "min")], a[(xcol, "max")] - xm],
            yerr=[ym - a[(ycol, "min")], a[(ycol, "max")] - ym],
            marker="o", ls="-.", color=palette[label], label=label, capsize=2,
        )  # fmt: skip
        for x, y, v in zip(xm, ym, a["sweep_value"], strict=True):
            ax.annotate(f"{v:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7, color=palette[label])
    param = exp.sweep.param if exp.sweep else "threshold"
    ax.set_xlabel(metric_label(xcol))
    ax.set_ylabel(metric_label(ycol))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(title=f"labels: {param}", fontsize=8, title_fontsize=8)
    return finish(fig, exp, scale_note(exp, data), out)
