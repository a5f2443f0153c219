"""The figure kinds, one module each, registered by name in :data:`llumnix.analysis.plots.FIGURE_KINDS` when
imported; importing this package imports them all. :func:`plot_experiment` draws an experiment's figure."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import llumnix.analysis.figures.bench  # noqa: F401  (importing a kind's module registers it)
import llumnix.analysis.figures.lines  # noqa: F401
import llumnix.analysis.figures.real_vs_sim  # noqa: F401
import llumnix.analysis.figures.timeline  # noqa: F401
import llumnix.analysis.figures.tradeoff  # noqa: F401
from llumnix.analysis.experiments import Experiment
from llumnix.analysis.plots import FIGURE_KINDS


def plot_experiment(exp: Experiment, data: pd.DataFrame, out: Path, timeline: pd.DataFrame | None = None) -> list[Path]:
    """Draw the experiment's figure (its ``figure.kind``); writes ``out`` with suffixes .pdf and .png and returns both
    paths."""
    kind = FIGURE_KINDS.get(exp.figure.kind)
    if not kind.needs_timeline:
        return kind.draw(exp, data, out)
    if timeline is None:
        raise ValueError(f"experiment {exp.name}: a {kind.name} figure needs the timeline table")
    return kind.draw(exp, data, out, timeline=timeline)


__all__ = ["plot_experiment"]
