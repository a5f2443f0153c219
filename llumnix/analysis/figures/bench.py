"""Figure kind ``bench`` (Fig 10 / 16): a measured quantity against its parameter, one line per method or design."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from llumnix.analysis.experiments import Experiment
from llumnix.analysis.plots import FIGURE_KINDS, finish, min_max, scale_note


@FIGURE_KINDS.register("bench")
def plot_bench(exp: Experiment, data: pd.DataFrame, out: Path) -> list[Path]:
    """Fig 10 / 16: a measured quantity against its parameter, one line per method or design."""
    f = exp.figure
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    sns.lineplot(data=data, x=f.x, y=f.y, hue=f.hue, style=f.hue, markers=True, dashes=False, errorbar=min_max, ax=ax)
    if f.log_y:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    return finish(fig, exp, scale_note(exp, data), out)
