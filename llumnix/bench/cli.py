"""Click commands of this subpackage, registered on the ``llumnix`` group by ``llumnix.cli``."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from llumnix.profiles import DEFAULT_PROFILE

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}
DTYPES = click.Choice(["float32", "bfloat16", "float16"])


def _ints(text: str | None) -> tuple[int, ...] | None:
    """'256,512,1k' -> (256, 512, 1024); None stays None."""
    if text is None:
        return None
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        scale = 1024 if part.endswith("k") else 1
        try:
            out.append(int(part.rstrip("k")) * scale)
        except ValueError:
            raise click.BadParameter(f"{part!r} is not an integer (comma-separated integers, e.g. 256,512,1k)") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"expected positive integers, got {text!r}")
    return tuple(out)


def _names(text: str) -> tuple[str, ...]:
    """'a, b,' -> ('a', 'b')."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _write_csv(df, output: Path, summary_columns: list[str]) -> None:
    """Write a benchmark's table and echo its main columns (stderr)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(output, index=False)
    click.echo(df[summary_columns].to_string(index=False), err=True)
    click.echo(f"wrote {len(df)} rows to {output}", err=True)


def _chunk_blocks_default() -> int:
    from llumnix.engine.kv_transfer import CHUNK_BLOCKS

    return CHUNK_BLOCKS


def _progress():
    from tqdm import tqdm

    return tqdm if sys.stderr.isatty() else None


def _command_line(name: str, params: dict) -> str:
    """The command as a user would type it, for provenance (options in a fixed order, values quoted)."""
    parts = ["llumnix", *name.split()]
    for key, value in params.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


@click.group(context_settings=CONTEXT)
def bench() -> None:
    """Benchmarks of the real engine (Fig 10 migration; decode step vs the bandwidth floor; greedy determinism) and
    of global scheduling (Fig 16)."""


@bench.command(context_settings=CONTEXT)
@click.option("--device", default="cpu", help="torch device: cpu or cuda (cuda:N).")
@click.option("--model", default="tiny", help="Model preset (tiny, small, llama-7b, llama-30b: random weights) or smollm2-135m (real).")
@click.option("--dtype", type=DTYPES, default="float32", help="Weights and KV cache dtype.")
@click.option("--lengths", default="64,128,256,512,1024",
              help="Comma-separated sequence lengths (prompt + output tokens of the migrated request).")
@click.option("--num-blocks", type=int, default=None,
              help="KV blocks of each instance (default: just enough for the longest length and the batch).")
@click.option("--repeats", type=int, default=3, help="Measured repeats per length (medians are reported).")
@click.option("--warmup", type=int, default=1, help="Discarded warm-up repeats per length.")
@click.option("--batch", type=int, default=1,
              help="Decode batch on the source: the migrated request plus batch-1 background requests "
                   "(the destination holds batch-1 background requests too).")
@click.option("--background-tokens", type=int, default=64, help="Prompt tokens of each background request.")
@click.option("--output-tokens", type=int, default=None,
              help="Output tokens of the migrated request (default: 8, or as many as its migrations need).")
@click.option("--steps-before", type=int, default=2, help="Decode steps on the source before the migration starts.")
@click.option("--steps-per-stage", type=int, default=1, help="Source decode steps at least per non-final stage.")
@click.option("--migrations", type=int, default=1,
              help="Live migrations per repeat: the request moves there and back this many times (more samples).")
@click.option("--steps-between", type=int, default=2, help="Decode steps on the new owner between two migrations.")
@click.option("--transports", "--transport", "transports", default="device",
              help="Comma-separated KV transports: device (within the GPU) and/or host (staged through pinned host "
                   "memory, CUDA only), both instances in this process; or one of gloo / nccl: the destination in a "
                   "child process (nccl: on the next GPU, two needed), KV over a torch.distributed channel.")
@click.option("--chunk-blocks", type=click.IntRange(min=0), default=lambda: _chunk_blocks_default(),
              help="Blocks a non-final stage copies per source decode step, on every transport (0: each stage in "
                   "one go; default: the engine's kv_transfer.CHUNK_BLOCKS).")
@click.option("--channel-timeout", type=float, default=120.0,
              help="gloo / nccl: seconds a KV transfer or the child process's answer may take before the run fails.")
@click.option("--seed", type=int, default=0, help="Seed of the weights and prompts.")
@click.option("--threads", type=int, default=1,
              help="torch intra-op threads on CPU (0: torch's default); 1 keeps timings stable on a busy machine.")
@click.option("--invariant-batch", type=int, default=None,
              help="Both engines decode batch-invariantly, in chunks of exactly this many rows (default: off).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output CSV, one row per (sequence length, transport).")
def migration(device, model, dtype, lengths, num_blocks, repeats, warmup, batch, background_tokens, output_tokens,
              steps_before, steps_per_stage, migrations, steps_between, transports, chunk_blocks, channel_timeout, seed,
              threads, invariant_batch, output) -> None:
    """Fig 10: migration downtime vs recompute and blocking copy over sequence length, on two real instances."""
    from llumnix.bench.migration import MigrationBenchConfig, run_migration_bench
    from llumnix.engine.device import check_device

    try:
        cfg = MigrationBenchConfig(
            device=check_device(device), model=model, dtype=dtype, lengths=_ints(lengths), num_blocks=num_blocks,
            repeats=repeats, warmup=warmup, batch=batch, background_tokens=background_tokens,
            output_tokens=output_tokens, steps_before=steps_before, steps_per_stage=steps_per_stage,
            migrations=migrations, steps_between=steps_between,
            transports=_names(transports), chunk_blocks=chunk_blocks or None,
            channel_timeout_s=channel_timeout, seed=seed,
            cpu_threads=threads or None, invariant_batch=invariant_batch)
        df = run_migration_bench(cfg, progress=_progress())
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    _write_csv(df, output, ["transport", "seq_len", "recompute_s", "blocking_copy_s", "downtime_s", "stages",
                            "migrations", "decode_step_s", "decode_step_migrating_s", "token_identical",
                            "kv_identical"])
    for _, row in df[df["aborted"] != ""].iterrows():
        click.echo(f"warning: seq_len {row['seq_len']}: {row['migrations']} of {row['migrations_asked']} timed "
                   f"migrations committed; {row['aborted']}", err=True)


@bench.command("decode-floor", context_settings=CONTEXT)
@click.option("--device", default="cuda", help="torch device: cpu or cuda (cuda:N).")
@click.option("--model", default="llama-7b", help="Model preset (random weights) or smollm2-135m (real).")
@click.option("--dtype", type=DTYPES, default="bfloat16", help="Weights and KV cache dtype.")
@click.option("--batch", "batches", default="32", help="Sequences in the decode step (comma-separated: a grid).")
@click.option("--context", "contexts", default="1024",
              help="Context tokens of each sequence (comma-separated: a grid; cells that do not fit are listed).")
@click.option("--repeats", type=int, default=10, help="Timed steps (median reported).")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="Replay decode steps as CUDA graphs (default: on CUDA) or run them eagerly.")
@click.option("--paged-kernel/--no-paged-kernel", default=None,
              help="Decode attention by the Triton paged kernel (default: where Triton runs) or gather + SDPA.")
@click.option("--fused-ops/--no-fused-ops", default=None,
              help="Residual add + norm, rotary and SiLU-times-up as one Triton kernel each (default: on CUDA).")
@click.option("--kernel-configs", default=None,
              help="Comma-separated paged-kernel constants to compare, each PARTITION[/TILE[/WARPS[/PROGRAMS_PER_SM"
                   "[/FULL[/FULL_WARPS]]]]] (e.g. 512,8192/64/4/1; default: the engine's).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output: JSON with the step time, the floor and their ratio (one cell), or a CSV of every cell "
                   "(an output named *.csv; a grid).")
def decode_floor_cmd(device, model, dtype, batches, contexts, repeats, cuda_graphs, paged_kernel, fused_ops,
                     kernel_configs, output) -> None:
    """Decode step time vs the memory-bandwidth floor: (weights + KV bytes) / measured device copy bandwidth."""
    from llumnix.bench.profiler import KernelConfig, decode_floor, decode_floor_grid
    from llumnix.engine.device import check_device

    batch_list, context_list = list(_ints(batches)), list(_ints(contexts))
    grid = output.suffix == ".csv"
    if not grid and (len(batch_list) > 1 or len(context_list) > 1 or kernel_configs):
        raise click.BadParameter("a grid (several batches, contexts or kernel configs) writes a CSV: name the "
                                 "output *.csv", param_hint="--output")
    try:
        configs = [KernelConfig.parse(c) for c in _names(kernel_configs)] if kernel_configs else None
        if grid:
            rows = decode_floor_grid(check_device(device), model, dtype, batch_list, context_list, repeats,
                                     cuda_graphs=cuda_graphs, paged_kernel=paged_kernel, kernel_configs=configs,
                                     fused_ops=fused_ops)
        else:
            rows = [decode_floor(check_device(device), model, dtype, batch_list[0], context_list[0], repeats,
                                 cuda_graphs=cuda_graphs, paged_kernel=paged_kernel, fused_ops=fused_ops)]
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    graphs = {None: {}, True: {"cuda_graphs": True}, False: {"no_cuda_graphs": True}}[cuda_graphs]
    graphs |= {None: {}, True: {"paged_kernel": True}, False: {"no_paged_kernel": True}}[paged_kernel]
    graphs |= {None: {}, True: {"fused_ops": True}, False: {"no_fused_ops": True}}[fused_ops]
    command = _command_line("bench decode-floor", {
        "device": device, "model": model, "dtype": dtype, "batch": batches, "context": contexts,
        "repeats": repeats, **graphs, "kernel_configs": kernel_configs, "output": output})
    output.parent.mkdir(parents=True, exist_ok=True)
    if not grid:
        result = rows[0] | {"command": command}
        output.write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"decode step {result['decode_step_s'] * 1e3:.2f} ms vs floor {result['floor_s'] * 1e3:.2f} ms "
                   f"({result['step_over_floor']:.1f}x); wrote {output}", err=True)
        return
    import pandas as pd

    df = pd.DataFrame(rows).assign(command=command)
    df["decode_step_ms"], df["floor_ms"] = df["decode_step_s"] * 1e3, df["floor_s"] * 1e3
    summary = [c for c in ("partition", "tile", "num_warps", "programs_per_sm") if c in df]
    _write_csv(df, output, [*summary, "batch", "context_tokens_per_seq", "fits", "decode_step_ms", "floor_ms",
                            "step_over_floor"])


@bench.command("prefill-floor", context_settings=CONTEXT)
@click.option("--device", default="cuda", help="torch device: cpu or cuda (cuda:N).")
@click.option("--model", default="llama-7b", help="Model preset (random weights) or smollm2-135m (real).")
@click.option("--dtype", type=DTYPES, default="bfloat16", help="Weights and KV cache dtype.")
@click.option("--lengths", default="256,512,1024,2048,4096,8192", help="Prompt lengths, one sequence each.")
@click.option("--repeats", type=int, default=5, help="Timed prefills per length (median reported).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output CSV.")
def prefill_floor_cmd(device, model, dtype, lengths, repeats, output) -> None:
    """Prefill time vs the compute floor: the prefill's FLOPs over the measured dense matmul rate."""
    import pandas as pd

    from llumnix.bench.profiler import prefill_floor
    from llumnix.engine.device import check_device

    try:
        rows = prefill_floor(check_device(device), model, dtype, list(_ints(lengths)), repeats)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    command = _command_line("bench prefill-floor", {"device": device, "model": model, "dtype": dtype,
                                                    "lengths": lengths, "repeats": repeats, "output": output})
    df = pd.DataFrame(rows).assign(command=command)
    df["prefill_ms"], df["floor_ms"] = df["prefill_s"] * 1e3, df["floor_s"] * 1e3
    _write_csv(df, output, ["tokens", "prefill_ms", "floor_ms", "prefill_over_floor"])


@bench.command("step-breakdown", context_settings=CONTEXT)
@click.option("--device", default="cuda", help="CUDA device (the profiler reads GPU kernel times).")
@click.option("--model", default="llama-7b", help="Model preset (random weights) or smollm2-135m (real).")
@click.option("--dtype", type=DTYPES, default="bfloat16", help="Weights and KV cache dtype.")
@click.option("--cells", default="1x512,32x2048,256x512", help="Comma-separated BATCHxCONTEXT decode steps.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output CSV: one row per kernel and cell (kernel time per step, its kind).")
def step_breakdown_cmd(device, model, dtype, cells, output) -> None:
    """Where a decode step's time goes: GPU kernel time by kernel and kind, next to the CUDA-graph step."""
    import pandas as pd

    from llumnix.bench.profiler import decode_step_breakdown
    from llumnix.engine.device import check_device

    try:
        pairs = [tuple(int(x) for x in c.lower().split("x")) for c in _names(cells)]
        if any(len(p) != 2 for p in pairs):
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"expected BATCHxCONTEXT[,...], got {cells!r}", param_hint="--cells") from None
    device = check_device(device)
    if not device.startswith("cuda"):
        raise click.BadParameter("the breakdown reads GPU kernel times: it needs --device cuda", param_hint="--device")
    df = pd.DataFrame([r for b, n in pairs for r in decode_step_breakdown(device, model, dtype, b, n)])
    output.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(output, index=False)
    summary = df.groupby(["batch", "context_tokens_per_seq", "kind"]).kernel_s.sum().unstack().mul(1e3).round(3)
    steps = df.groupby(["batch", "context_tokens_per_seq"])[["eager_step_s", "graph_step_s", "kernel_total_s"]].first()
    click.echo(summary.join(steps.mul(1e3).round(3)).to_string(), err=True)
    click.echo(f"wrote {len(df)} rows to {output}", err=True)


@bench.command(context_settings=CONTEXT)
@click.option("--device", default="cpu", help="torch device: cpu or cuda (cuda:N).")
@click.option("--model", default="tiny", help="Model preset (tiny, small, llama-7b, llama-30b: random weights) or smollm2-135m (real).")
@click.option("--dtype", type=DTYPES, default="float32", help="Weights and KV cache dtype.")
@click.option("--lengths", default="64,256", help="Comma-separated prompt lengths of the target sequence.")
@click.option("--batches", default="1,3,8",
              help="Comma-separated batch sizes: 1 = the target alone (repeated), B = beside B-1 other sequences.")
@click.option("--modes", default=None,
              help="Comma-separated decode paths (graphs+kernel, graphs+kernel+fixed, eager+kernel, graphs+gather, "
                   "eager+gather; default: those this device runs).")
@click.option("--output-tokens", type=int, default=32, help="Greedy tokens generated per run.")
@click.option("--repeats", type=int, default=3, help="Alone runs per (mode, length), each in other KV blocks.")
@click.option("--max-background-tokens", type=int, default=2048,
              help="Other sequences' prompts: uniform in [16, min(length, this)] tokens.")
@click.option("--seed", type=int, default=0, help="Seed of the weights and prompts.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output CSV, one row per (mode, length, batch).")
def determinism(device, model, dtype, lengths, batches, modes, output_tokens, repeats, max_background_tokens, seed,
                output) -> None:
    """Greedy decoding run to run, across KV block placement and across batches (what token identity after a
    migration rests on)."""
    from llumnix.bench.determinism import DeterminismConfig, default_modes, probe
    from llumnix.engine.device import check_device

    try:
        device = check_device(device)
        cfg = DeterminismConfig(
            model=model, device=device, dtype=dtype, lengths=_ints(lengths), batches=_ints(batches),
            modes=_names(modes) if modes else default_modes(device),
            output_tokens=output_tokens, repeats=repeats, max_background_tokens=max_background_tokens, seed=seed)
        df = probe(cfg, progress=_progress())
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    _write_csv(df, output, ["mode", "length", "batch", "tokens_stable", "logits_identical", "tokens_match_alone",
                            "first_mismatch", "max_logit_diff", "min_top2_gap"])


@bench.command("scheduler", context_settings=CONTEXT)
@click.option("--instances", default="16,64,256", help="Comma-separated instance counts.")
@click.option("--designs", default="llumlet,centralized",
              help="Comma-separated designs: llumlet (asynchronous load reports), centralized (synchronous consults).")
@click.option("--requests", "num_requests", type=int, default=None,
              help="Requests per run (default: 8 per instance).")
@click.option("--rate-per-instance", type=float, default=1.0, help="Arrival rate per instance, requests/s of real time.")
@click.option("--speed", type=float, default=1.0, help="Steps run this many times faster than the profile says.")
@click.option("--profile", default=DEFAULT_PROFILE, help="Step-time profile (name or JSON path).")
@click.option("--max-wall", "max_wall_s", type=float, default=120.0, help="Stop a run after this many seconds.")
@click.option("--seed", type=int, default=0, help="Seed of arrivals and lengths.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="CSV to write.")
def bench_scheduler(instances, designs, num_requests, rate_per_instance, speed, profile, max_wall_s, seed,
                    output) -> None:
    """Fig 16: per-request dispatch latency and per-step scheduling stall, llumlet vs centralized scheduling."""
    from llumnix.bench.scheduler import BenchConfig, run_benchmark

    try:
        config = BenchConfig(requests=num_requests, rate_per_instance=rate_per_instance, speed=speed,
                             profile=profile, max_wall_s=max_wall_s, seed=seed)
        df = run_benchmark(list(_ints(instances)), list(_names(designs)), config,
                           progress=lambda msg: click.echo(msg, err=True))
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    output.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(output, index=False)
    click.echo(df.to_string(index=False), err=True)


@click.command(context_settings=CONTEXT)
@click.option("--device", default="cpu", help="torch device: cpu or cuda (cuda:N).")
@click.option("--model", default="tiny", help="Model preset (tiny, small, llama-7b, llama-30b: random weights) or smollm2-135m (real).")
@click.option("--dtype", type=DTYPES, default="float32", help="Weights and KV cache dtype.")
@click.option("--num-blocks", type=int, default=792,
              help="KV blocks of the instance, the profile's total_blocks (792 = LLaMA-7B on the paper's A10).")
@click.option("--name", default=None, help="Profile name (default: the output file's stem).")
@click.option("--prefill-lengths", default=None, help="Prompt lengths of the prefill grid (default: by device).")
@click.option("--prefill-batches", default=None, help="Batch sizes of the prefill grid (default: by device).")
@click.option("--decode-batches", default=None, help="Batch sizes of the decode grid (default: by device).")
@click.option("--decode-contexts", default=None,
              help="Total context tokens of the decode grid (default: by device; each batch also gets its largest "
                   "context that fits the pool).")
@click.option("--copy-blocks", default=None, help="Block counts of the KV copy sweep (default: by device).")
@click.option("--transport", type=click.Choice(["device", "host"]), default="device",
              help="How migration copies KV: within the device, or staged through pinned host memory (CUDA).")
@click.option("--repeats", type=int, default=3, help="Timed repeats per point (median).")
@click.option("--warmup", type=int, default=1, help="Warm-up runs per point.")
@click.option("--max-batched-tokens", type=int, default=None,
              help="Profile's max_batched_tokens (default: the pool's capacity in tokens).")
@click.option("--seed", type=int, default=0, help="Seed of the weights, KV contents and tokens.")
@click.option("--threads", type=int, default=1,
              help="torch intra-op threads on CPU (0: torch's default); 1 keeps timings stable on a busy machine.")
@click.option("--concurrent-instances", type=int, default=1,
              help="Measure one instance of this many sharing the machine: the others run decode steps meanwhile "
                   "(a cluster of N instances on fewer cores than N, at full load).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output profile JSON (loadable with Profile.load and `llumnix simulate --profile`).")
def profile(device, model, dtype, num_blocks, name, prefill_lengths, prefill_batches, decode_batches,
            decode_contexts, copy_blocks, transport, repeats, warmup, max_batched_tokens, seed, threads,
            concurrent_instances, output) -> None:
    """Measure a step-time profile of the real engine (prefill, decode, KV copies) for the simulator."""
    from llumnix.bench.profiler import ProfileConfig, measure_profile
    from llumnix.engine.device import check_device

    params = dict(device=device, model=model, dtype=dtype, num_blocks=num_blocks, name=name,
                  prefill_lengths=prefill_lengths, prefill_batches=prefill_batches, decode_batches=decode_batches,
                  decode_contexts=decode_contexts, copy_blocks=copy_blocks, transport=transport, repeats=repeats,
                  warmup=warmup, max_batched_tokens=max_batched_tokens, seed=seed,
                  threads=threads if device == "cpu" else None,
                  concurrent_instances=concurrent_instances if concurrent_instances > 1 else None, output=output)
    try:
        cfg = ProfileConfig(
            device=check_device(device), model=model, dtype=dtype, num_blocks=num_blocks, name=name or output.stem,
            prefill_lengths=_ints(prefill_lengths), prefill_batches=_ints(prefill_batches),
            decode_batches=_ints(decode_batches), decode_contexts=_ints(decode_contexts),
            copy_blocks=_ints(copy_blocks), transport=transport, repeats=repeats, warmup=warmup,
            max_batched_tokens=max_batched_tokens, seed=seed, cpu_threads=threads or None,
            concurrent_instances=concurrent_instances)
        prof = measure_profile(cfg, _command_line("profile", params), progress=_progress())
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    prof.save(output)
    click.echo(f"{_fits(prof)}; migration {prof.migration_bandwidth_bytes_per_s / 1e9:.1f} GB/s; wrote {output}",
               err=True)


def _fits(prof) -> str:
    """The profile's fitted step-time lines, for the commands' last words."""
    p, d = prof.prefill_fit, prof.decode_fit
    return (f"{len(prof.prefill)} prefill / {len(prof.decode)} decode points; prefill {p.fixed_s * 1e3:.2f} ms + "
            f"{p.per_token_s * 1e6:.2f} us/token; decode {d.fixed_s * 1e3:.2f} ms + {d.per_seq_s * 1e6:.1f} us/seq + "
            f"{d.per_context_token_s * 1e9:.1f} ns/context token")


@click.command("plot-migration", context_settings=CONTEXT)
@click.option("--csv", "csv_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="CSV written by `llumnix bench migration`.")
@click.option("-o", "--output", "out_prefix", type=click.Path(path_type=Path), required=True,
              help="Output prefix: writes PREFIX.png and PREFIX.pdf.")
@click.option("--measurements", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the long table (model, seq_len, method, downtime_ms, decode_slowdown) here.")
def plot_migration_cmd(csv_path, out_prefix, measurements) -> None:
    """Draw Fig 10 (migration cost by sequence length, decode step during migration) from a bench CSV."""
    import pandas as pd

    from llumnix.bench.migration import measurements_table, plot_migration

    paths = plot_migration(csv_path, out_prefix)
    if measurements is not None:
        measurements.parent.mkdir(parents=True, exist_ok=True)
        measurements_table(pd.read_csv(csv_path)).to_csv(measurements, index=False)
        paths.append(measurements)
    click.echo("wrote " + ", ".join(map(str, paths)), err=True)


@click.command("insitu-profile", context_settings=CONTEXT)
@click.option("--steps", "steps_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="steps.parquet of a real run (`llumnix real-cluster`): every step its instances ran.")
@click.option("--base", required=True, help="Measured profile of the same engine and KV pool (name or JSON path): "
              "model shape and migration costs.")
@click.option("--name", default=None, help="Profile name (default: the base's name + '-insitu').")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Profile JSON.")
def insitu_profile_cmd(steps_path, base, name, output) -> None:
    """Fit the simulator's step-time profile to the steps a real cluster's instances ran (see llumnix.bench.insitu)."""
    import pandas as pd

    from llumnix.bench.insitu import insitu_profile, steps_table
    from llumnix.profiles import Profile

    try:
        base_profile = Profile.load(base)
        steps = steps_table(pd.read_parquet(steps_path).to_dict("records"))
        prof = insitu_profile(steps, base_profile, name or f"{base_profile.name}-insitu",
                              provenance=f"measured in situ: the steps of {steps_path} on top of {base_profile.name}")
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    prof.save(output)
    slowdown = ", ".join(f"{f:.2f}" for f in prof.concurrency_slowdown)
    click.echo(f"{_fits(prof)}; step overhead {prof.step_overhead_s * 1e3:.2f} ms; slowdown with 1, 2, ... instances "
               f"stepping: {slowdown}; wrote {output}", err=True)


COMMANDS: list[click.Command] = [bench, profile, plot_migration_cmd, insitu_profile_cmd]


if __name__ == "__main__":  # `python -m llumnix.bench.cli bench migration ...`: these commands without the rest of the CLI
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    click.Group("llumnix", commands=COMMANDS, context_settings=CONTEXT)()
