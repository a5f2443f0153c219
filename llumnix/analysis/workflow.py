"""What the Snakefile asks of the experiments: file lists and targets (so the rules stay declarative)."""

from __future__ import annotations

from pathlib import Path

from llumnix.analysis.experiments import Experiment, expand_runs

FIGURES_DIR = "results/figures"
CLAIMS_OUTPUTS = ("results/claims.md", "results/claims.csv")


def run_files(exp: Experiment, scale: str, name: str = "summary.json") -> list[str]:
    return [f"{run.run_dir(scale)}/{name}" for run in expand_runs(exp, scale)]


def data_file(name: str) -> str:
    return f"results/{name}/data.csv"


def timeline_file(name: str) -> str:
    return f"results/{name}/timeline.csv"


def figure_files(name: str) -> list[str]:
    return [f"{FIGURES_DIR}/{name}.pdf", f"{FIGURES_DIR}/{name}.png"]


def has_data_source(exp: Experiment) -> bool:
    """Simulations (and real-cluster runs) can always run; a measurement experiment only once its measurements are
    committed."""
    return exp.kind in ("simulation", "real") or Path(exp.measurements or "").is_file()


def skipped_message(exp: Experiment) -> str:
    return (
        f"{exp.name}: skipped, no measurements at {exp.measurements} "
        f"(they come from {exp.pending or 'a benchmark on real hardware'}; commit them there to draw {exp.name})"
    )


def experiment_targets(exp: Experiment, backend: str = "torch") -> list[str]:
    """Data and figure of an experiment; real-cluster experiments on another engine than torch get its name appended
    (``real_cluster-vllm``)."""
    if not has_data_source(exp):
        return []
    from llumnix.analysis.realsim import backend_experiment

    name = backend_experiment(exp.name, backend) if exp.kind == "real" else exp.name
    out = [data_file(name), *figure_files(name)]
    if exp.figure.kind == "timeline":
        out.append(timeline_file(exp.name))
    return out


def claims_inputs(experiments: dict[str, Experiment], claimed: set[str]) -> list[str]:
    """data.csv of every experiment the claims use and that can produce data now."""
    return [data_file(n) for n, e in experiments.items() if n in claimed and has_data_source(e)]


def all_targets(experiments: dict[str, Experiment], with_claims: bool, backend: str = "torch") -> list[str]:
    out = [t for e in experiments.values() for t in experiment_targets(e, backend)]
    if with_claims:
        out += list(CLAIMS_OUTPUTS)
    return out


def caption(report_dir: Path, name: str) -> str:
    """The experiment's own caption if there is one, else the generic one (paths relative to ``report_dir``)."""
    own = Path(report_dir) / f"{name}.rst"
    return str(own if own.exists() else Path(report_dir) / "figure.rst")
