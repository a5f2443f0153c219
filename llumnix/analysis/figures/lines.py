"""Figure kind ``lines`` (Fig 11 / 13 / 14): a grid of rows (trace groups, or priority classes) x metrics, one line
per system against the request rate (or the CV of inter-arrival times)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import NullFormatter

from llumnix.analysis.experiments import Experiment
from llumnix.analysis.plots import FIGURE_KINDS, finish, metric_label, min_max, scale_note, system_order

ROW_PREFIX_LABELS = {"high_": "High priority", "normal_": "Normal priority"}
X_LABELS = {"rate": "Request rate (req/s)", "cv": "CV of inter-arrival times"}


def _group_label(exp: Experiment, group: str) -> str:
    trace = exp.traces.get(group)
    return trace.label or group if trace is not None and trace.group is None else group


def _x_for(group: pd.DataFrame) -> str:
    if group["rate"].nunique() > 1 or group["cv"].nunique() <= 1:
        return "rate"
    return "cv"


@FIGURE_KINDS.register("lines")
def plot_lines(exp: Experiment, data: pd.DataFrame, out: Path) -> list[Path]:
    """Fig 11 / 13 / 14: a grid of rows (trace groups, or priority classes) x metrics, one line per system."""
    metrics = exp.figure.metrics
    prefixes = exp.figure.row_prefixes or [""]
    groups = [g for g in dict.fromkeys(exp.group(t) for t in exp.traces) if g in set(data["group"])]
    rows = [(g, p) for g in groups for p in prefixes]
    order = system_order(exp, data)
    fig, axes = plt.subplots(
        len(rows), len(metrics), figsize=(2.6 * len(metrics), 2.2 * len(rows) + 0.8), squeeze=False
    )
    for i, (group, prefix) in enumerate(rows):
        part = data[data["group"] == group]
        x = _x_for(part)
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            column = f"{prefix}{metric}"
            sns.lineplot(
                data=part, x=x, y=column, hue="system_label", hue_order=order, style="system_label",
                style_order=order, markers=True, dashes=False, errorbar=min_max, ax=ax, legend=(i == 0 and j == 0),
            )  # fmt: skip
            values = part[column].dropna()
            if metric in exp.figure.log_metrics:
                ax.set_yscale("log")
                ax.yaxis.set_minor_formatter(NullFormatter())
                values = values[values > 0]
                if len(values):  # whole decades around the data: labelled ticks even when it spans less than one
                    ax.set_ylim(10 ** np.floor(np.log10(values.min() / 1.2)), 10 ** np.ceil(np.log10(values.max() * 1.2)))
            elif len(values) and values.max() > 0:
                ax.set_ylim(0, values.max() * 1.12)  # headroom: a lone point (one rate) is not drawn on the frame
            else:
                ax.set_ylim(bottom=0)
            ax.set_ylabel("")
            ax.set_xlabel(X_LABELS.get(x, x) if i == len(rows) - 1 or len(groups) > 1 else "")
            ax.set_xticks(sorted(part[x].unique()))
            ax.grid(True, alpha=0.3)
            if i == 0:
                log = " [log]" if metric in exp.figure.log_metrics else ""
                ax.set_title(metric_label(metric) + log, fontsize=10)
            if j == 0:
                names = (_group_label(exp, group) if len(groups) > 1 else "", ROW_PREFIX_LABELS.get(prefix, prefix))
                ax.set_ylabel(" / ".join(n for n in names if n) or _group_label(exp, group))
    handles, labels = axes[0][0].get_legend_handles_labels()
    if axes[0][0].get_legend() is not None:
        axes[0][0].get_legend().remove()
    fig.legend(handles, labels, loc="upper right", ncol=len(order), fontsize=9, frameon=False)
    return finish(fig, exp, scale_note(exp, data), out)
