"""Click commands of this subpackage, registered on the ``llumnix`` group by ``llumnix.cli``:
``serve`` (the Ray cluster + HTTP frontend) and ``replay`` (a trace against a frontend).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from click.core import ParameterSource

COMMANDS: list[click.Command] = []
CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"], "max_content_width": 110}


def _explicit(ctx: click.Context, names: list[str]) -> dict:
    """The options the user set on the command line (they override the YAML file)."""
    return {
        name: ctx.params[name]
        for name in names
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }


# -- serve --------------------------------------------------------------------------------------------------------
SERVE_FIELDS = [
    "address", "backend", "model", "profile", "speed", "instances", "policy", "host", "port", "num_blocks",
    "block_size", "device", "dtype", "seed", "torch_threads", "invariant_batch", "migration_threshold", "pairing_interval_s",
    "last_stage_blocks", "max_num_seqs", "max_batched_tokens", "priorities", "num_cpus_per_instance",
    "num_gpus_per_instance", "autoscale", "scale_up", "scale_down", "min_instances", "max_instances",
    "initial_instances", "scale_interval_s", "startup_delay_s", "vllm_migration", "kv_transport", "kv_timeout_s",
]


@click.command(context_settings=CONTEXT)
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="YAML file of settings (same names as the flags, with underscores); flags given here win.")
@click.option("--address", default=None, help="Ray cluster to join, e.g. 'auto' or 'HOST:6379' (default: start one).")
@click.option("--backend", type=click.Choice(["torch", "profile", "vllm"]), default="torch",
              help="torch: the paged-KV LLaMA model; profile: steps only sleep for profiled times; vllm: one vLLM "
                   "engine per instance (needs the vLLM venv: make install-vllm).")
@click.option("--model", default="tiny",
              help="Model preset (random weights); with --backend vllm also a Hugging Face model directory (a preset "
                   "is written once as a random-weight LLaMA to $LLUMNIX_MODEL_CACHE or ~/.cache/llumnix/models).")
@click.option("--profile", default="a10-llama-7b", help="Step-time profile of the profile backend (name or JSON).")
@click.option("--speed", type=float, default=1.0, help="Profile backend: run steps this many times faster.")
@click.option("--instances", type=int, default=2,
              help="Number of instance actors (with --autoscale: the initial number unless --initial-instances).")
@click.option("--policy", type=click.Choice(["round-robin", "infaas++", "llumnix"]), default="llumnix",
              help="Dispatch / migration system (the same policies as the simulator).")
@click.option("--host", default="127.0.0.1", help="HTTP bind address.")
@click.option("--port", type=int, default=8000, help="HTTP port.")
@click.option("--num-blocks", type=int, default=None,
              help="KV blocks per instance (default: 256 for torch, the profile's own for profile, what "
                   "VLLM_CPU_KVCACHE_SPACE holds for vllm).")
@click.option("--block-size", type=int, default=None,
              help="Tokens per KV block (default: 16; 32 for vllm, whose CPU attention needs a multiple of 32).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", help="Torch backend device.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              help="Torch backend dtype.")
@click.option("--seed", type=int, default=0, help="Weight seed (every instance serves the same weights).")
@click.option("--torch-threads", type=int, default=1, help="Intra-op CPU threads of each instance's torch.")
@click.option("--invariant-batch", type=int, default=None,
              help="Torch backend: batch-invariant decoding. Every decode step runs as chunks of exactly this many "
                   "rows (padded), so a request's tokens are the same bits whatever shares its steps, and a migrated "
                   "request yields exactly its unmigrated tokens; costs the padding (default: off).")
@click.option("--migration-threshold", type=float, default=3.0,
              help="Freeness below which an instance is a migration source and above which a destination.")
@click.option("--no-migration", is_flag=True, help="Disable migration (llumnix policy: dispatch only).")
@click.option("--pairing-interval", "pairing_interval_s", type=float, default=0.1,
              help="Seconds between migration pairing rounds.")
@click.option("--kv-transport", type=click.Choice(["object-store", "gloo", "nccl"]), default="object-store",
              help="How migrating KV travels between instances: Ray's object store, or a torch.distributed channel "
                   "per instance pair opened on their first migration (gloo: through host memory; nccl: GPU to GPU, "
                   "needs --device cuda).")
@click.option("--kv-timeout", "kv_timeout_s", type=float, default=60.0,
              help="gloo / nccl: seconds after which opening a channel or one stage's transfer fails (the migration "
                   "aborts and the request stays on its source).")
@click.option("--last-stage-blocks", type=int, default=2, help="Blocks left at which a migration stops and copies.")
@click.option("--max-num-seqs", type=int, default=256, help="Most running sequences per instance.")
@click.option("--max-batched-tokens", type=int, default=12_288, help="Most prompt tokens in one prefill step.")
@click.option("--priorities", is_flag=True, help="Honour request priorities (the 'priority' request field).")
@click.option("--num-cpus-per-instance", type=float, default=1.0, help="Ray CPUs reserved by each instance actor.")
@click.option("--num-gpus-per-instance", type=float, default=None,
              help="Ray GPUs per instance actor, fractions allowed (default: 1 with --device cuda, else 0).")
@click.option("--autoscale", is_flag=True,
              help="Auto-scale on the instances' average freeness (the simulator's scaler): start an instance below "
                   "--scale-up, drain the least-loaded one above --scale-down (its requests migrate away or finish, "
                   "queued ones are re-dispatched) and stop it once empty. Cost: /metrics llumnix_instance_seconds.")
@click.option("--scale-up", type=float, default=10.0,
              help="With --autoscale: start an instance when the average freeness drops below this.")
@click.option("--scale-down", type=float, default=60.0,
              help="With --autoscale: drain an instance when the average freeness exceeds this.")
@click.option("--min-instances", type=int, default=1, help="With --autoscale: fewest instances.")
@click.option("--max-instances", type=int, default=16,
              help="With --autoscale: most instances (the Ray cluster must have the CPUs / GPUs for this many).")
@click.option("--initial-instances", type=int, default=None,
              help="With --autoscale: instances at start (default: --instances).")
@click.option("--scale-interval", "scale_interval_s", type=float, default=10.0,
              help="With --autoscale: seconds between scaling decisions.")
@click.option("--vllm-migration", type=click.Choice(["recompute", "kv"]), default="recompute",
              help="With --backend vllm: a migrated request's destination recomputes its tokens so far, or loads "
                   "their KV copied from the source (both stop the request while it moves).")
@click.option("--startup-delay", "startup_delay_s", type=float, default=0.0,
              help="Extra seconds a started instance waits, once its engine is up, before taking requests (emulates "
                   "a model load; the simulator's --startup-delay).")
@click.pass_context
def serve(ctx: click.Context, config_path: Path | None, no_migration: bool, **_: object) -> None:
    """Serve an OpenAI-style completions API from a Ray cluster of engine instances with live migration and,
    with --autoscale, the simulator's auto-scaling (cost in /metrics and GET /admin/scaling)."""
    from llumnix.runtime.frontend import serve as run
    from llumnix.runtime.serve_config import ServeConfigError, build_serve_config, load_yaml

    overrides = _explicit(ctx, SERVE_FIELDS)
    if no_migration:
        overrides["migration"] = False
    try:
        file_values = load_yaml(config_path) if config_path else {}
        config = build_serve_config(file_values, overrides)
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
    run(config)


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
def replay(url, trace_path, out_dir, time_scale, seed, sample_interval, request_timeout, progress) -> None:
    """Send a trace's requests to a frontend at their arrival times; write the same tables as `llumnix simulate`
    (summary.json's avg_instances: the frontend's instance-seconds over the replay, as the simulator counts cost)."""
    from llumnix.runtime.replay import run_replay

    try:
        summary = run_replay(url, trace_path, out_dir, time_scale, seed, sample_interval, request_timeout,
                             progress=progress and sys.stderr.isatty())
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    keys = ("requests", "finished", "errors", "prefill_mean_s", "prefill_p99_s", "e2e_mean_s", "e2e_p99_s",
            "migrations", "preemptions", "avg_instances")
    click.echo(json.dumps({k: summary.get(k) for k in keys}), err=True)
    if summary["finished"] < summary["requests"]:
        raise click.ClickException(f"{summary['requests'] - summary['finished']} requests did not finish")


COMMANDS.append(replay)
