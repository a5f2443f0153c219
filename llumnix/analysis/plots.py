"""What every figure shares: the registry of figure kinds and the helpers they draw with.

A figure kind (an experiment's ``figure.kind``) is a function in its own module of :mod:`llumnix.analysis.figures`
that registers itself with ``@FIGURE_KINDS.register(name)``; this module imports none of them, so a kind may import
anything below it (the experiment's own analysis) without a cycle.

Every figure states, under its title, the scale its data ran at (requests per run, seeds, which rates), so a quick
run is never mistaken for the paper-scale one. Spread over seeds is drawn as a min-max band or error bar.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

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


# -- the registry of figure kinds -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FigureKind:
    """``draw(exp, data, out)`` writes ``out`` as .pdf and .png and returns both paths; a kind that
    ``needs_timeline`` is also passed ``timeline=`` (the fragmentation timeline table)."""

    name: str
    draw: Callable[..., list[Path]]
    needs_timeline: bool = False


class FigureKinds:
    """Figure kind name -> how to draw it, so that adding a kind is one function and one decorator."""

    def __init__(self) -> None:
        self._kinds: dict[str, FigureKind] = {}

    def register(self, name: str, needs_timeline: bool = False):
        def deco(draw: Callable[..., list[Path]]) -> Callable[..., list[Path]]:
            if name in self._kinds:
                raise ValueError(f"figure kind {name!r} registered twice")
            self._kinds[name] = FigureKind(name, draw, needs_timeline)
            return draw

        return deco

    def get(self, name: str) -> FigureKind:
        try:
            return self._kinds[name]
        except KeyError:
            raise ValueError(f"unknown figure kind {name!r}; choose one of {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._kinds)


FIGURE_KINDS = FigureKinds()


# -- helpers --------------------------------------------------------------------------------------------------------
def min_max(values):
    """seaborn's ``errorbar``: the band from the smallest to the largest value (over seeds)."""
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
        point = [c for c in ("trace", "rate", "cv", "system") if c in part.columns] or ["scale"]
        per_point = part.groupby(point, dropna=False)["seed"].nunique()
        lo, hi = int(per_point.min()), int(per_point.max())
        n = int(part["num_requests"].iloc[0])
        seeds = f"{hi} seed" + ("s" if hi != 1 else "") if lo == hi else f"{lo}-{hi} seeds per point"
        text = f"{name} scale: {n:,} requests/run, {seeds}"
        spec = exp.scales.get(name)
        if spec is not None:
            text += "".join(f"; {note}" for note in spec.grid_note())
        notes.append(text)
    autoscaled = any(s.autoscale is not None for s in exp.systems.values())
    cluster = f"auto-scaled from {exp.instances} instances" if autoscaled else f"{exp.instances} instances"
    return "; ".join(notes) + f". Simulated with profile {exp.profile} ({profile_origin(exp.profile)}), {cluster}."


def profile_origin(name: str) -> str:
    """How a step-time profile was made, in a few words, for a figure's footnote."""
    from llumnix.profiles import Profile

    try:
        prof = Profile.load(name)
    except (FileNotFoundError, ValueError):
        return "profile not found"
    if prof.provenance.startswith("calibrated"):
        return "reconstructed, calibrated on the paper's INFaaS++ curves"
    return "reconstructed" if prof.reconstructed else f"measured on {prof.device}"


def system_order(exp: Experiment, data: pd.DataFrame) -> list[str]:
    """The labels of the experiment's systems that have data, in the experiment's order."""
    labels = [s.label for s in exp.systems.values()]
    present = set(data["system_label"])
    return [label for label in labels if label in present]


def finish(fig, exp: Experiment, note: str, out: Path) -> list[Path]:
    """Title, the scale note at the bottom, layout; then :func:`save_figure`."""
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
