"""Figures laid out like the paper's, from ``data.csv`` (and ``timeline.csv`` for Fig 12).

Every figure states, under its title, the scale its data ran at (requests per run, seeds, which rates), so a quick
run is never mistaken for the paper-scale one. Spread over seeds is drawn as a min-max band or error bar.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from llumnix.analysis.experiments import Experiment  # noqa: E402

METRIC_LABELS = {
    "prefill_mean_s": "Prefill mean (s)",
    "prefill_p99_s": "Prefill P99 (s)",
    "decode_mean_s": "Decode mean (s/token)",
    "decode_p99_s": "Decode P99 (s/token)",
    "e2e_mean_s": "Request mean (s)",
    "e2e_p99_s": "Request P99 (s)",
    "preemption_loss_s": "Preemption loss (s)",
    "avg_instances": "Avg instances",
    "fragmentation_mean": "Fragmentation (mean)",
    "migrations": "Migrations",
}
ROW_PREFIX_LABELS = {"high_": "High priority", "normal_": "Normal priority"}
SMOOTH_S = 30.0  # Fig 12: window of the rolling mean drawn over the raw samples
X_LABELS = {"rate": "Request rate (req/s)", "cv": "CV of inter-arrival times"}


def _min_max(values):
    return values.min(), values.max()


def metric_label(metric: str, prefix: str = "") -> str:
    base = metric[len(prefix) :] if prefix and metric.startswith(prefix) else metric
    return METRIC_LABELS.get(base, base)


def scale_note(exp: Experiment, data: pd.DataFrame) -> str:
    """'quick scale: 2,000 requests/run, 1 seed; lightest and heaviest rate per trace' from the data itself."""
    scales = sorted(map(str, data["scale"].dropna().unique())) if "scale" in data.columns else []
    if exp.kind == "measurement" or not scales:
        return "measured on real hardware (see the measurement CSV for the setup)"
    notes = []
    for name in scales:
        part = data[data["scale"] == name]
        seeds = part["seed"].nunique()
        n = int(part["num_requests"].iloc[0])
        text = f"{name} scale: {n:,} requests/run, {seeds} seed" + ("s" if seeds != 1 else "")
        spec = exp.scales.get(name)
        if spec is not None and spec.rates == "extremes":
            text += "; only the lightest and heaviest rate of each trace"
        if spec is not None and spec.traces is not None:
            text += f"; traces {', '.join(spec.traces)} only"
        notes.append(text)
    autoscaled = any(s.autoscale is not None for s in exp.systems.values())
    cluster = f"auto-scaled from {exp.instances} instances" if autoscaled else f"{exp.instances} instances"
    return "; ".join(notes) + f". Simulated with profile {exp.profile} (reconstructed), {cluster}."


def _system_order(exp: Experiment, data: pd.DataFrame) -> list[str]:
    labels = [s.label for s in exp.systems.values()]
    present = set(data["system_label"])
    return [label for label in labels if label in present]


def _group_label(exp: Experiment, group: str) -> str:
    trace = exp.traces.get(group)
    return trace.label or group if trace is not None and trace.group is None else group


def _x_for(group: pd.DataFrame) -> str:
    if group["rate"].nunique() > 1 or group["cv"].nunique() <= 1:
        return "rate"
    return "cv"


def _finish(fig, exp: Experiment, note: str, out: Path) -> list[Path]:
    fig.suptitle(f"{exp.title}", fontsize=12)
    fig.text(0.5, 0.001, note, ha="center", va="bottom", fontsize=8, style="italic", wrap=True)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    return save_figure(fig, out)


def save_figure(fig, out: Path) -> list[Path]:
    """Write ``out``.pdf and ``out``.png and close the figure."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in (".pdf", ".png"):
        path = out.with_suffix(suffix)
        fig.savefig(path, dpi=150)
        written.append(path)
    plt.close(fig)
    return written


def plot_lines(exp: Experiment, data: pd.DataFrame, out: Path) -> list[Path]:
    """Fig 11 / 13 / 14: a grid of rows (trace groups, or priority classes) x metrics, one line per system."""
    metrics = exp.figure.metrics
    prefixes = exp.figure.row_prefixes or [""]
    groups = [g for g in dict.fromkeys(exp.group(t) for t in exp.traces) if g in set(data["group"])]
    rows = [(g, p) for g in groups for p in prefixes]
    order = _system_order(exp, data)
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
                style_order=order, markers=True, dashes=False, errorbar=_min_max, ax=ax, legend=(i == 0 and j == 0),
            )  # fmt: skip
            if metric in exp.figure.log_metrics:
                ax.set_yscale("log")
                ax.yaxis.set_minor_formatter(NullFormatter())
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
    return _finish(fig, exp, scale_note(exp, data), out)


def plot_timeline(exp: Experiment, data: pd.DataFrame, timeline: pd.DataFrame, out: Path) -> list[Path]:
    """Fig 12: the cluster's fragmentation over time, one line per system (first seed): each sample faintly, a
    rolling mean over ``SMOOTH_S`` seconds on top; the legend gives each system's time-averaged value."""
    order = _system_order(exp, data)
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
    return _finish(fig, exp, note, out)


def plot_tradeoff(exp: Experiment, data: pd.DataFrame, out: Path) -> list[Path]:
    """Fig 15: latency against cost, one point per threshold, one line per system; bars: min-max over seeds."""
    xcol, ycol = exp.figure.x or "avg_instances", exp.figure.y or "prefill_p99_s"
    order = _system_order(exp, data)
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
    return _finish(fig, exp, scale_note(exp, data), out)


def plot_bench(exp: Experiment, data: pd.DataFrame, out: Path) -> list[Path]:
    """Fig 10 / 16: a measured quantity against its parameter, one line per method or design."""
    f = exp.figure
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    sns.lineplot(data=data, x=f.x, y=f.y, hue=f.hue, style=f.hue, markers=True, dashes=False, errorbar=_min_max, ax=ax)
    if f.log_y:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    return _finish(fig, exp, scale_note(exp, data), out)


def plot_experiment(exp: Experiment, data: pd.DataFrame, out: Path, timeline: pd.DataFrame | None = None) -> list[Path]:
    """Draw the experiment's figure; writes ``out`` with suffixes .pdf and .png and returns both paths."""
    kind = exp.figure.kind
    if kind == "lines":
        return plot_lines(exp, data, out)
    if kind == "timeline":
        if timeline is None:
            raise ValueError(f"experiment {exp.name}: a timeline figure needs the timeline table")
        return plot_timeline(exp, data, timeline, out)
    if kind == "tradeoff":
        return plot_tradeoff(exp, data, out)
    if kind == "real_vs_sim":
        from llumnix.analysis.realsim import plot_real_vs_sim

        return plot_real_vs_sim(exp, data, out)
    return plot_bench(exp, data, out)
