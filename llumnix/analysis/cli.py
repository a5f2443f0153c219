"""Click commands for the workflow's analysis steps (registered on the ``llumnix`` group)."""

from __future__ import annotations

from pathlib import Path

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}

_experiment_option = click.option(
    "--experiment",
    "experiment_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Experiment file (experiments/<name>.yaml).",
)
_scale_option = click.option("--scale", default="quick", help="Scale of the runs (a key of the experiment's scales).")


def _load(path: Path):
    from llumnix.analysis.experiments import ExperimentError, load_experiment

    try:
        return load_experiment(path)
    except ExperimentError as e:
        raise click.ClickException(str(e)) from None


@click.command(context_settings=CONTEXT)
@_experiment_option
@_scale_option
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    help="Directory that holds results/runs/ (the workflow's working directory).",
)
@click.option(
    "--measurements",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Measurement experiments: the CSV of measurements to normalise instead of simulation runs.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Output CSV: one row per run with its wildcards, trace and system options and summary keys.",
)
def aggregate(experiment_path, scale, root, measurements, output) -> None:
    """Collect an experiment's runs (summary.json of each) into one table."""
    from llumnix.analysis.aggregate import aggregate_runs, load_measurements

    exp = _load(experiment_path)
    try:
        if exp.kind == "measurement":
            if measurements is None:
                raise click.ClickException(f"experiment {exp.name} is a measurement experiment: pass --measurements")
            df = load_measurements(exp, measurements)
        else:
            df = aggregate_runs(exp, scale, root)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    output.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(output, index=False)
    click.echo(f"wrote {len(df)} rows to {output}", err=True)


@click.command(context_settings=CONTEXT)
@_experiment_option
@_scale_option
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    help="Directory that holds results/runs/ (the workflow's working directory).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Output CSV: the cluster's fragmentation and free blocks at every sample of every run.",
)
def timeline(experiment_path, scale, root, output) -> None:
    """Collect the fragmentation-over-time timelines of an experiment's runs (Fig 12)."""
    from llumnix.analysis.aggregate import fragmentation_timeline

    exp = _load(experiment_path)
    try:
        tl = fragmentation_timeline(exp, scale, root)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise click.ClickException(f"{exp.name}: {e}") from None
    output.parent.mkdir(parents=True, exist_ok=True)
    tl.to_csv(output, index=False)
    click.echo(f"wrote {len(tl)} rows to {output}", err=True)


@click.command(context_settings=CONTEXT)
@_experiment_option
@click.option(
    "--data",
    "data_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="The experiment's data.csv (from `llumnix aggregate`).",
)
@click.option(
    "--timeline",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Fragmentation timeline CSV (timeline figures only).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Figure path; written as both .pdf and .png (the suffix given is replaced).",
)
def plot(experiment_path, data_path, timeline, output) -> None:
    """Draw an experiment's figure from its aggregated data."""
    import pandas as pd

    from llumnix.analysis.plots import plot_experiment

    exp = _load(experiment_path)
    data = pd.read_csv(data_path)
    tl = pd.read_csv(timeline) if timeline is not None else None
    try:
        written = plot_experiment(exp, data, output, timeline=tl)
    except (KeyError, ValueError) as e:
        raise click.ClickException(f"{exp.name}: cannot plot {data_path}: {e}") from None
    click.echo("wrote " + ", ".join(map(str, written)), err=True)


@click.command(context_settings=CONTEXT)
@click.option(
    "--claims",
    "claims_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=Path("experiments/claims.yaml"),
    help="Claims and their tolerances.",
)
@click.option(
    "--results",
    "results_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("results"),
    help="Directory holding <experiment>/data.csv.",
)
@click.option(
    "--markdown",
    "md_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("results/claims.md"),
    help="Markdown table to write.",
)
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("results/claims.csv"),
    help="CSV table to write.",
)
def claims(claims_path, results_dir, md_path, csv_path) -> None:
    """Compute every claim of the paper from the aggregated data and judge it against its tolerances."""
    from llumnix.analysis.claims import claims_table, load_claims, read_experiment_data, render_markdown
    from llumnix.analysis.experiments import ExperimentError

    try:
        specs = load_claims(claims_path)
        data = read_experiment_data(results_dir, sorted({s.experiment for s in specs}))
        table = claims_table(specs, data)
    except (ExperimentError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    for path in (md_path, csv_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv_path, index=False)
    md_path.write_text(render_markdown(table))
    counts = table["verdict"].value_counts().to_dict()
    click.echo(f"wrote {md_path} and {csv_path}: {counts}", err=True)


@click.command(context_settings=CONTEXT)
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path), default=Path("experiments"))
@click.option("--scale", default=None, help="Also list the runs of this scale per experiment.")
def experiments(directory, scale) -> None:
    """Validate every experiment file (and claims.yaml) of DIRECTORY and list the runs per scale."""
    from llumnix.analysis.claims import load_claims
    from llumnix.analysis.experiments import ExperimentError, expand_runs, load_experiments

    try:
        exps = load_experiments(directory)
        claims_file = directory / "claims.yaml"
        specs = load_claims(claims_file) if claims_file.exists() else []
    except ExperimentError as e:
        raise click.ClickException(str(e)) from None
    unknown = sorted({s.experiment for s in specs} - set(exps))
    if unknown:
        raise click.ClickException(f"{claims_file}: claims refer to unknown experiment(s) {unknown}")
    for exp in exps.values():
        counts = ", ".join(f"{name} {len(expand_runs(exp, name))}" for name in exp.scales) or exp.kind
        click.echo(f"{exp.name}: {exp.title} [runs: {counts}]")
        if scale is not None and scale in exp.scales:
            for run in expand_runs(exp, scale):
                click.echo(f"  {run.run_dir(scale)}")
    click.echo(f"{len(specs)} claims", err=True)


COMMANDS: list[click.Command] = [aggregate, timeline, plot, claims, experiments]
