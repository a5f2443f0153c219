"""Click commands of this subpackage, registered on the ``llumnix`` group by ``llumnix.cli``:
``serve`` (the Ray cluster + HTTP frontend) and ``replay`` (a trace against a frontend).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from llumnix.cli_options import options
from llumnix.fields import default_of
from llumnix.runtime.serve_config import (
    InstanceSpec,
    ServeConfig,
    ServeConfigError,
    build_serve_config,
    flat_settings,
    load_yaml,
)
from llumnix.runtime.vllm_model import VLLM_CPU_BLOCK_MULTIPLE

COMMANDS: list[click.Command] = []
API_KEY_ENV, ADMIN_KEY_ENV = "LLUMNIX_API_KEY", "LLUMNIX_ADMIN_KEY"
CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"], "max_content_width": 110}


# -- serve --------------------------------------------------------------------------------------------------------
def _load_config_file(ctx: click.Context, param: click.Parameter, path: Path | None) -> Path | None:
    """``--config FILE``: the file's settings become the defaults of the other options, so flags given win."""
    if path is not None:
        try:
            ctx.default_map = {**(ctx.default_map or {}), **flat_settings(load_yaml(path))}
        except ServeConfigError as e:
            raise click.BadParameter(f"{path}: {e}", ctx, param) from None
    return path


@click.command(context_settings=CONTEXT)
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              is_eager=True, callback=_load_config_file,
              help="YAML file of settings (the flags' names with underscores, flat or with an 'instance:' section); "
                   "flags given here win.")
@options(ServeConfig, exclude=["instance"], overrides={
    "api_key": {"envvar": API_KEY_ENV, "show_envvar": True},
    "admin_key": {"envvar": ADMIN_KEY_ENV, "show_envvar": True}})
@options(InstanceSpec, overrides={"block_size": {
    "default": None, "show_default": f"{default_of(InstanceSpec, 'block_size')}; {VLLM_CPU_BLOCK_MULTIPLE} for vllm"}})
def serve(config_path: Path | None, **settings: object) -> None:
    """Serve an OpenAI-style completions API from a Ray cluster of engine instances with live migration and,
    with --autoscale, the simulator's auto-scaling (cost in /metrics and GET /admin/scaling)."""
    from llumnix.runtime.frontend import StartupError
    from llumnix.runtime.frontend import serve as run

    try:  # None: the model's default (block_size: the backend's)
        config = build_serve_config({}, {k: v for k, v in settings.items() if v is not None})
    except ServeConfigError as e:
        raise click.ClickException(str(e)) from None
    if config.instance.backend == "vllm":
        from llumnix.runtime.vllm_model import VllmUnavailableError, require_vllm

        try:
            require_vllm()
        except VllmUnavailableError as e:
            raise click.ClickException(str(e)) from None
    scaling = (f" (autoscale {config.min_instances}-{config.max_instances}, freeness "
               f"[{config.scale_up:g}, {config.scale_down:g}], every {config.scale_interval_s:g} s)"
               if config.autoscale else "")
    click.echo(f"llumnix serve: {config.initial_count} x {config.instance.backend} instances{scaling}, "
               f"policy {config.policy}, http://{config.host}:{config.port}", err=True)
    try:
        run(config)
    except StartupError as e:  # a port taken, too few CPUs / GPUs: checked before any instance starts
        raise click.ClickException(str(e)) from None


COMMANDS.append(serve)


# -- replay -------------------------------------------------------------------------------------------------------
@click.command(context_settings=CONTEXT)
@click.option("--url", required=True, help="Frontend base URL, e.g. http://127.0.0.1:8000.")
@click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Trace file written by `llumnix trace` (CSV or Parquet).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory for requests.parquet, instances.parquet, migrations.parquet, summary.json.")
@click.option("--time-scale", type=float, default=1.0,
              help="Multiply the trace's arrival times by this (0.5 replays twice as fast).")
@click.option("--seed", type=int, default=0, help="Seed of the random prompt token ids.")
@click.option("--sample-interval", type=float, default=1.0, help="Seconds between per-instance load samples.")
@click.option("--request-timeout", type=float, default=3600.0, help="Seconds one request may take before it fails.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.option("--api-key", envvar=API_KEY_ENV, show_envvar=True, default=None,
              help="The frontend's API key, if it has one (sent to /v1/*).")
@click.option("--admin-key", envvar=ADMIN_KEY_ENV, show_envvar=True, default=None,
              help="The frontend's admin key: the load samples, migrations and cost come from /admin/* (without it, "
                   "what the responses carry; no load samples).")
def replay(url, trace_path, out_dir, time_scale, seed, sample_interval, request_timeout, progress, api_key,
           admin_key) -> None:
    """Send a trace's requests to a frontend at their arrival times; write the same tables as `llumnix simulate`
    (summary.json's avg_instances: the frontend's instance-seconds over the replay, as the simulator counts cost)."""
    from llumnix.runtime.replay import run_replay

    try:
        summary = run_replay(url, trace_path, out_dir, time_scale, seed, sample_interval, request_timeout,
                             progress=progress and sys.stderr.isatty(), api_key=api_key, admin_key=admin_key)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    keys = ("requests", "finished", "errors", "prefill_mean_s", "prefill_p99_s", "e2e_mean_s", "e2e_p99_s",
            "migrations", "preemptions", "avg_instances")
    click.echo(json.dumps({k: summary.get(k) for k in keys}), err=True)
    if summary["finished"] < summary["requests"]:
        raise click.ClickException(f"{summary['requests'] - summary['finished']} requests did not finish")


COMMANDS.append(replay)
