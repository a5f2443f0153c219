"""Click commands for the workflow's analysis steps (registered on the ``llumnix`` group)."""

from __future__ import annotations

from pathlib import Path

import click

from llumnix.analysis.realsim import VLLM_PYTHON
from llumnix.cli_options import options, trace_options
from llumnix.runtime.cpuload import QuietConfig
from llumnix.runtime.supervisor import RealClusterConfig
from llumnix.sim.simulator import SimConfig

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}

_experiment_option = click.option(
    "--experiment",
    "experiment_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Experiment file (experiments/<name>.yaml).",
)
_scale_option = click.option("--scale", default="quick", help="Scale of the runs (a key of the experiment's scales).")


_root_option = click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    help="Directory that holds results/runs/ (the workflow's working directory).",
)


def _load(path: Path):
    from llumnix.analysis.experiments import ExperimentError, load_experiment

    try:
        return load_experiment(path)
    except ExperimentError as e:
        raise click.ClickException(str(e)) from None


@click.command(context_settings=CONTEXT)
@_experiment_option
@_scale_option
@_root_option
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
@_root_option
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

    from llumnix.analysis.figures import plot_experiment

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
    from llumnix.analysis.claims import (
        claims_table,
        load_claims_file,
        point_tables,
        read_experiment_data,
        render_markdown,
    )
    from llumnix.analysis.experiments import ExperimentError

    try:
        claims_file = load_claims_file(claims_path)
        specs = claims_file.claims
        data = read_experiment_data(results_dir, sorted({s.experiment for s in specs}))
        table = claims_table(specs, data)
        groups, points = point_tables(claims_file, data)
    except (ExperimentError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    for path in (md_path, csv_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv_path, index=False)
    md_path.write_text(render_markdown(table, groups, points))
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


# -- real cluster vs simulator (experiment kind real) ----------------------------------------------------------------
@click.command("capped-trace", context_settings=CONTEXT)
@trace_options
@click.option("--length-scale", type=float, default=1.0, help="Multiply every prompt and output length by this.")
@click.option("--max-prompt-tokens", type=int, required=True, help="Cap of the prompt lengths (after scaling).")
@click.option("--max-output-tokens", type=int, required=True, help="Cap of the output lengths (after scaling).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output file: CSV, or Parquet when it ends in .parquet.")
def capped_trace(length_scale, max_prompt_tokens, max_output_tokens, output, **spec) -> None:
    """A `llumnix trace` (the same options) whose lengths are scaled and capped, for a small real cluster (same
    arrivals)."""
    from llumnix.analysis.realsim import cap_lengths
    from llumnix.workload import make_trace, write_trace

    try:
        df = cap_lengths(make_trace(**spec), length_scale, max_prompt_tokens, max_output_tokens)
        write_trace(df, output)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {len(df)} requests to {output} (mean prompt {df['prompt_tokens'].mean():.0f}, "
               f"mean output {df['output_tokens'].mean():.0f} tokens)", err=True)


@click.command("real-cluster", context_settings=CONTEXT)
@click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Trace file written by `llumnix trace` or `llumnix capped-trace` (CSV or Parquet).")
@options(RealClusterConfig, exclude=["python"])
@click.option("--time-scale", type=float, default=1.0, help="Multiply the trace's arrival times by this.")
@options(SimConfig, ["sample_interval_s"])
@options(QuietConfig)
@click.option("--vllm-python", type=click.Path(dir_okay=False, path_type=Path), default=Path(VLLM_PYTHON),
              help="With --backend vllm: the Python (with vLLM and llumnix installed: make install-vllm) that runs "
                   "`llumnix serve`.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory: the tables of `llumnix simulate`, and serve.log.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def real_cluster(trace_path, time_scale, sample_interval_s, vllm_python, out_dir, progress, **settings) -> None:
    """Serve a trace on a fresh real cluster (`llumnix serve` in a subprocess, replayed, stopped); write its tables."""
    import json
    import sys

    from llumnix.analysis.realrun import run_real_cluster
    from llumnix.fields import settings as fields_of
    from llumnix.runtime.cpuload import Disturbance

    try:
        quiet = QuietConfig(**{s.name: settings.pop(s.name) for s in fields_of(QuietConfig)})
        python = str(vllm_python) if settings["backend"] == "vllm" else None
        config = RealClusterConfig(**settings, python=python)
        summary = run_real_cluster(trace_path, out_dir, config, time_scale, sample_interval_s,
                                   progress=progress and sys.stderr.isatty(), quiet=quiet)
    except (ValueError, RuntimeError, TimeoutError) as e:
        raise click.ClickException(str(e)) from None
    keys = ("requests", "finished", "errors", "prefill_mean_s", "prefill_p99_s", "e2e_mean_s", "e2e_p99_s",
            "preemptions", "migrations", "engine_step_mean_s", "wall_s", "cpu_other_cores", "disturbed", "attempts")
    click.echo(json.dumps({k: summary.get(k) for k in keys}), err=True)
    if summary.get("disturbed"):
        found = Disturbance(summary["cpu_other_cores"], summary["disturbed_bound_cores"], summary["cpu_count"])
        tries = f" ({summary['attempts']} attempts, all disturbed)" if summary.get("attempts", 1) > 1 else ""
        click.echo(f"WARNING: {found.message()}{tries}", err=True)
    if summary["finished"] < summary["requests"]:
        raise click.ClickException(f"{summary['requests'] - summary['finished']} of {summary['requests']} requests "
                                   f"did not finish (see {out_dir / 'serve.log'})")


@click.command("real-vs-sim", context_settings=CONTEXT)
@_experiment_option
@_scale_option
@_root_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output CSV: one row per run and runtime (real, sim), sim rows with the simulator's errors.")
@click.option("--backend", type=click.Choice(["torch", "vllm"]), default="torch",
              help="The real runs' engine: torch (with its simulated twins) or vllm (real runs only).")
def real_vs_sim(experiment_path, scale, root, output, backend) -> None:
    """Put a real-cluster experiment's real and simulated runs side by side, with the simulator's relative errors."""
    from llumnix.analysis.realsim import disturbed_runs, error_summary, real_vs_sim_table

    exp = _load(experiment_path)
    try:
        df = real_vs_sim_table(exp, scale, root, backend)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    output.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(output, index=False)
    if backend == "torch":  # a vLLM run has no simulated twin
        click.echo(error_summary(df).to_string(float_format=lambda x: f"{x:+.1%}"), err=True)
    disturbed = disturbed_runs(df)
    if len(disturbed):
        runs = ", ".join(f"{r.system_label} {r.trace} r{r.rate:g} s{r.seed} ({r.cpu_other_cores:.2f} cores)"
                         for r in disturbed.itertuples())
        left_out = "left out of the errors above" if backend == "torch" else "flagged in the figure"
        click.echo(f"WARNING: {len(disturbed)} disturbed run(s), {left_out} (other processes took more than "
                   f"{disturbed['disturbed_bound_cores'].max():g} cores during the real run): {runs}", err=True)
    click.echo(f"wrote {len(df)} rows to {output}", err=True)


@click.command(context_settings=CONTEXT)
@click.option("--paper", "paper_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("experiments/calibration/fig11-infaas-paper.csv"),
              help="The paper's INFaaS++ points (trace, metric, rate, value_s).")
@click.option("--base", "base_profile", default="a10-llama-7b", help="The profile whose decode cost is fitted.")
@click.option("--traces", "traces_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory of the traces (made there if missing, kept otherwise).")
@click.option("--num-requests", type=int, default=10_000, help="Requests per trace (the paper's 10,000).")
@click.option("--seeds", default="artifact",
              help="Comma list of trace seeds; 'artifact' is the artifact's own trace (generated workloads).")
@click.option("--grid", "grid_specs", multiple=True,
              help="NAME=V1,V2,...: values of one parameter to try (repeat per parameter; the others keep their "
                   "initial values). Parameters: " + ", ".join(
                       f"{p.name} [{p.low:g}, {p.high:g}]" for p in __import__("llumnix.analysis.calibration",
                                                                              fromlist=["PARAMS"]).PARAMS))
@click.option("--traces-only", "traces_only", is_flag=True, help="Only write the traces (e.g. to carry them).")
@click.option("--jobs", type=int, default=None, help="Parallel simulations (default: every core).")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory: grid.csv (every candidate's score), residuals.csv and residuals.png/pdf (the best "
                   "one's points beside the paper's), profile.json (the best one, its fit in its assumptions).")
def calibrate(paper_path, base_profile, traces_dir, num_requests, seeds, grid_specs, traces_only, jobs, out_dir) -> None:
    """Fit the testbed's free parameters on the paper's INFaaS++ points (Fig 11), by simulating INFaaS++ on 16
    instances for every trace and rate of the points with each candidate (llumnix.analysis.calibration)."""
    from tqdm.auto import tqdm

    from llumnix.analysis import calibration as cal
    from llumnix.profiles import Profile

    try:
        points = cal.load_points(paper_path)
        seed_list = [cal.ARTIFACT if s.strip() == "artifact" else int(s) for s in seeds.split(",")]
        values = {}
        for spec in grid_specs:
            name, _, vals = spec.partition("=")
            values[name.strip()] = [float(v) for v in vals.split(",") if v.strip()]
        candidates = cal.grid(values) if values else [{}]
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    cal.make_traces(points, traces_dir, num_requests, seed_list)
    if traces_only:
        return
    base = Profile.load(base_profile)
    n_runs = len(candidates) * len(seed_list) * len(points[["trace", "rate"]].drop_duplicates())
    with tqdm(total=n_runs, desc="calibrating", unit="run") as bar:
        table, residuals = cal.search(base, candidates, points, traces_dir, seed_list, jobs, progress=bar.update)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "grid.csv", index=False)
    best = table.iloc[0]
    res = residuals[int(best["candidate"])]
    res.to_csv(out_dir / "residuals.csv", index=False)
    chosen = {p: float(best[p]) for p in cal.PARAM_NAMES}
    provenance = (f"calibrated with `llumnix calibrate` on {paper_path.name} ({len(points)} points), seeds {seeds}, "
                  f"{num_requests} requests per trace, from {base_profile}")
    cal.calibrated_profile(base, chosen, cal.score(res), provenance).save(out_dir / "profile.json")
    cal.plot_residuals(res, out_dir / "residuals", f"Calibrated {base_profile}: INFaaS++ on 16 simulated instances vs "
                       "the paper's Fig 11 (" + ", ".join(f"{k} = {v:.4g}" for k, v in chosen.items()) + ")")
    click.echo(table.head(10).to_string(index=False), err=True)


COMMANDS: list[click.Command] = [aggregate, timeline, plot, claims, experiments, capped_trace, real_cluster, real_vs_sim,
                                 calibrate]
