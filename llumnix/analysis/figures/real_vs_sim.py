"""Figure kind ``real_vs_sim`` (the real-cluster experiment): the real cluster's latencies beside its simulated
twins', with the simulator's relative error; a vLLM run's figure shows the real cluster alone."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from llumnix.analysis.experiments import Experiment
from llumnix.analysis.plots import FIGURE_KINDS, metric_label, save_figure
from llumnix.analysis.realsim import (
    COMPARED_METRICS,
    INSITU,
    REAL_BACKENDS,
    SIM_RUNTIMES,
    VLLM_BLOCK_SIZE,
    backend_blocks,
    backend_of,
    mark_disturbed,
    real_spec,
)

RUNTIME_LABELS = {
    "real": "real cluster",
    INSITU: "simulator, in-situ steps + request latencies",
    "sim": "simulator, offline profile (all instances busy)",
    "sim-alone": "simulator, offline profile of one instance alone",
    "real-vllm": "real cluster, vLLM instances",
}
ERROR_TOLERANCE = 0.15  # relative error of the simulator above which the figure flags a metric
DISTURBED_COLOR = "0.45"  # what a disturbed run's text is written in (its bars: hatched and faded)


@FIGURE_KINDS.register("real_vs_sim")
def plot_real_vs_sim(exp: Experiment, data: pd.DataFrame, out: Path) -> list[Path]:
    """One panel per compared metric; per system a bar per runtime (mean over runs, min-max whiskers), the
    simulator's relative error written above each group (red beyond the tolerance). A system with disturbed runs
    (other processes took more than the bound during its real run) has its bars hatched and faded; its error is the
    mean over its other runs, and where it has none, "disturbed" and the cores other processes took are written
    instead of an error."""
    data = mark_disturbed(data)
    order = [s.label for s in exp.systems.values() if s.label in set(data["system_label"])]
    real_rows = data[data["runtime"].isin(list(REAL_BACKENDS.values()))]
    disturbed = real_rows[real_rows["disturbed"]].groupby("system_label")["cpu_other_cores"].max()
    clean = real_rows[~real_rows["disturbed"]].groupby("system_label").size()
    colors = {"real": "#4c72b0", "real-vllm": "#4c72b0", INSITU: "#55a868", "sim": "#dd8452", "sim-alone": "#c9c9c9"}
    runtimes = [r for r in (*REAL_BACKENDS.values(), *SIM_RUNTIMES) if r in set(data["runtime"])]
    vllm = backend_of(data) == "vllm"
    fig, axes = plt.subplots(1, len(COMPARED_METRICS), figsize=(3.4 * len(COMPARED_METRICS), 3.8), squeeze=False)
    width = 0.8 / len(runtimes)
    for ax, metric in zip(axes[0], COMPARED_METRICS, strict=True):
        stats = data.groupby(["system_label", "runtime"])[metric].agg(["mean", "min", "max"])
        sims = data[(data["runtime"] == INSITU) & ~data["disturbed"]]
        errors = sims.groupby("system_label")[f"rel_error_{metric}"].mean() if len(sims) else pd.Series(dtype=float)
        top = float(stats["max"].max()) if len(stats) else 1.0
        for k, runtime in enumerate(runtimes):
            xs = np.arange(len(order)) + (k - (len(runtimes) - 1) / 2) * width
            s = stats.xs(runtime, level="runtime").reindex(order)
            spread = [s["mean"] - s["min"], s["max"] - s["mean"]] if (s["max"] > s["min"]).any() else None
            bars = ax.bar(xs, s["mean"], width, color=colors[runtime], label=RUNTIME_LABELS[runtime], yerr=spread,
                          capsize=2, ecolor="0.3")
            for bar, label in zip(bars, order, strict=True):
                if label in disturbed.index:
                    bar.set(hatch="////", alpha=0.45, edgecolor="0.2")
        for i, label in enumerate(order):
            if label in disturbed.index and label not in clean.index:  # no undisturbed run: no error to show
                ax.annotate(f"disturbed:\nothers {disturbed[label]:.2f} cores", (i, top * 1.03), ha="center",
                            va="bottom", fontsize=7, color=DISTURBED_COLOR, style="italic")
                continue
            if vllm:  # a vLLM run has no simulated twin to compare
                continue
            err = errors.get(label, math.nan)
            bad = math.isfinite(err) and abs(err) > ERROR_TOLERANCE
            mark = "\u2020" if label in disturbed.index else ""  # some runs left out: disturbed
            ax.annotate(f"{err:+.0%}{mark}" if math.isfinite(err) else "n/a", (i, top * 1.04), ha="center",
                        va="bottom", fontsize=9, color="#c44e52" if bad else "0.2",
                        fontweight="bold" if bad else "normal")
        ax.set_ylim(0, top * (1.3 if len(disturbed.index.difference(clean.index)) else 1.2))
        ax.set_xticks(range(len(order)), order, fontsize=8)
        ax.set_title(metric_label(metric), fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    handles = [Patch(facecolor=colors[r]) for r in runtimes]  # plain patches: a group's bars may be hatched
    labels = [RUNTIME_LABELS[r] for r in runtimes]
    if len(disturbed):
        handles.append(Patch(facecolor="white", edgecolor="0.2", hatch="////", alpha=0.45))
        labels.append("disturbed run")
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.94), ncol=len(handles), fontsize=8,
               frameon=False)
    r = real_spec(exp)
    title = f"Real cluster of {exp.instances} vLLM engines ({r.model} shape, {r.device.upper()})" if vllm else exp.title
    fig.suptitle(title, fontsize=12, y=0.995)
    note = vllm_cluster_note(exp, data) if vllm else real_vs_sim_note(exp, data)
    note += disturbed_note(real_rows, vllm)
    fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=7.5, style="italic",
             wrap=True)
    fig.tight_layout(rect=(0, 0.16, 1, 0.88))
    return save_figure(fig, out)


def disturbed_note(real: pd.DataFrame, vllm: bool = False) -> str:
    """The footnote's sentence on disturbed runs (empty when there is none)."""
    bad = real[real["disturbed"]]
    if not len(bad):
        return ""
    cpus = real["cpu_count"].max() if "cpu_count" in real else math.nan
    left_out = "" if vllm else (
        "; their twins' errors are left out of the errors above the bars (\u2020: the mean of the other runs) and of "
        "the worst errors"
    )  # fmt: skip
    return (
        f" DISTURBED (hatched): {len(bad)} of {len(real)} real runs, during which other processes took up to "
        f"{bad['cpu_other_cores'].max():.2f} of the {cpus:.0f} cores (bound {bad['disturbed_bound_cores'].max():g}): "
        f"their latencies measure the machine's load, not the cluster{left_out}. Rerun them on a quiet machine."
    )


def vllm_cluster_note(exp: Experiment, data: pd.DataFrame) -> str:
    """The footnote of a vLLM run's figure: what served, where, at which scale."""
    r = real_spec(exp)
    real = data[data["runtime"] == REAL_BACKENDS["vllm"]]
    first = real.iloc[0] if len(real) else {}
    traces = "; ".join(f"{t} at {rate:g} req/s" for t, rate in real.groupby(["trace", "rate"]).size().index)
    seeds = int(real["seed"].nunique()) if len(real) else 0
    cpu = real["cpu_cores_used"].mean() if "cpu_cores_used" in real else math.nan
    kv = "--vllm-migration kv" in str(first.get("serve_command", ""))
    return (
        f"{exp.instances} real instances, each a {first.get('engine', 'vLLM')} engine serving a random-weight LLaMA "
        f"of the {r.model} preset's shape ({r.device}, {r.dtype}, {backend_blocks(exp, 'vllm')} KV blocks of "
        f"{VLLM_BLOCK_SIZE} tokens, the torch runs' KV capacity), on {first.get('machine', 'this machine')}; trace "
        f"{traces}, {int(first.get('num_requests', 0)):,} requests, lengths x{r.length_scale:g} capped at "
        f"{r.max_prompt_tokens}/{r.max_output_tokens} tokens, {seeds} seed{'s' if seeds != 1 else ''} "
        f"({first.get('scale', '?')} scale); the cluster used {cpu:.2f} cores on average. Llumnix's dispatch and "
        f"migration pairing over vLLM's own scheduling; migration is blocking (the destination "
        f"{'loads the copied KV' if kv else 'recomputes'}). No simulated twin: the simulator has no step-time "
        "profile of vLLM's engine."
    )


def real_vs_sim_note(exp: Experiment, data: pd.DataFrame) -> str:
    """The footnote: what ran where, the scale, and the known sources of error."""
    r = real_spec(exp)
    real = data[data["runtime"] == "real"]
    runs = real.groupby(["trace", "rate"]).size()
    traces = "; ".join(f"{t} at {rate:g} req/s" for t, rate in runs.index)
    first = real.iloc[0] if len(real) else {}
    seeds = int(real["seed"].nunique()) if len(real) else 0
    cols = [f"rel_error_{m}" for m in COMPARED_METRICS]
    worst = {rt: data.loc[(data["runtime"] == rt) & ~data["disturbed"], cols].abs().max().max() for rt in SIM_RUNTIMES}
    cpu = real["cpu_cores_used"].mean() if "cpu_cores_used" in real else math.nan
    other = real["cpu_other_s"].max() if "cpu_other_s" in real else math.nan
    # Per request, outside any engine step: arrival to dispatch, and the first token's trip back to the client.
    dispatch_ms = 1e3 * real["dispatch_latency_mean_s"].mean() if "dispatch_latency_mean_s" in real else math.nan
    delivery_ms = 1e3 * real["delivery_latency_mean_s"].mean() if "delivery_latency_mean_s" in real else math.nan
    return (
        f"{exp.instances} real {r.model} instances ({r.device}, {r.dtype}, {r.num_blocks} KV blocks and "
        f"{r.torch_threads} torch thread each) on {first.get('machine', 'this machine')}; trace {traces}, "
        f"{int(first.get('num_requests', 0)):,} requests, lengths x{r.length_scale:g} capped at "
        f"{r.max_prompt_tokens}/{r.max_output_tokens} tokens, {seeds} seed{'s' if seeds != 1 else ''} "
        f"({first.get('scale', '?')} scale); the cluster used {cpu:.2f} cores on average, other processes "
        f"{other:.0f} CPU-s at most during a run. Simulators, the same trace and system: green (the errors written "
        f"above the bars) with an in-situ profile fitted to the steps the run's instances ran, with their slowdown "
        f"when several step at once, plus the run's mean per-request latencies outside the engines (arrival to "
        f"dispatch {dispatch_ms:.0f} ms, prefill end to the client {delivery_ms:.0f} ms); orange with an offline "
        f"profile measured beside {exp.instances - 1} busy instances; grey with one of an instance alone. Error "
        f"(sim - real) / real, red beyond {ERROR_TOLERANCE:.0%}; worst {worst[INSITU]:.0%} (offline "
        f"{worst['sim']:.0%}, alone {worst['sim-alone']:.0%}). Left in the in-situ twin's error: step times vary "
        "(other processes, the GIL of each actor) and the simulator takes their mean, so tails (P99) come out short."
    )
