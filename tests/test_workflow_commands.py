"""Every command line the workflow's rules build parses with the `llumnix` command it goes to, for every experiment
of the repository at every scale it defines: an option one command lost or another never had fails here, not in the
middle of `make reproduce` (`capped-trace` once lacked `trace`'s --lengths / --stream, which trace_args passes).

Only the parsing runs (click's checks of names, types, choices and required options), not the commands."""

from __future__ import annotations

import shlex
from pathlib import Path

import click
import pytest

from llumnix.analysis.experiments import expand_runs, load_experiments, simulate_args, trace_args
from llumnix.analysis.realsim import (
    SIM_PROFILES,
    capped_trace_args,
    profile_args,
    real_cluster_args,
    twin_simulate_args,
)
from llumnix.cli import main

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = load_experiments(REPO / "experiments")


def parse(command: str, line: str) -> dict:
    """``llumnix <command> <line>``'s parameters as click parses them (UsageError / BadParameter on a bad line)."""
    cmd = main.commands[command]
    with cmd.make_context(command, shlex.split(line)) as ctx:
        return ctx.params


def command_lines(tmp_path: Path) -> list[tuple[str, str, str]]:
    """(what, command, options) for every rule's command line of every run of every repository experiment."""
    trace, profile, python = tmp_path / "trace.parquet", tmp_path / "profile.json", tmp_path / "python"
    trace.touch()
    python.touch()
    profile.write_text("{}")
    out = f"-o {tmp_path / 'out'}"
    lines = []
    for name, exp in sorted(EXPERIMENTS.items()):
        for scale in exp.scales:
            for run in expand_runs(exp, scale):
                w = run.wildcards(scale)
                where = f"{name} {scale} {run.trace} r{w['rate']} {run.system} s{run.seed}"
                if exp.kind == "real":
                    lines += [
                        (where, "capped-trace", f"{capped_trace_args(exp, run.trace, w['rate'], w['seed'], scale)} {out}"),
                        (where, "real-cluster", f"--trace {trace} {real_cluster_args(exp, run.trace, run.system, w['seed'])} "
                                                f"--out {tmp_path}"),
                        (where, "real-cluster", f"--trace {trace} {real_cluster_args(exp, run.trace, run.system, w['seed'], backend='vllm', vllm_python=str(python))} "
                                                f"--out {tmp_path}"),
                        (where, "simulate", f"--trace {trace} "
                                            f"{twin_simulate_args(exp, run.trace, run.system, w['seed'], str(profile))} "
                                            f"--latencies-from {profile} --out {tmp_path}"),
                    ]  # fmt: skip
                else:
                    lines += [
                        (where, "trace", f"{trace_args(exp, run.trace, w['rate'], w['seed'], scale)} {out}"),
                        (where, "simulate", f"--trace {trace} {simulate_args(exp, run.trace, run.system, w['seed'])} "
                                            f"--out {tmp_path}"),
                    ]  # fmt: skip
        if exp.kind == "real":
            lines += [(f"{name} {sharing}", "profile", f"{profile_args(exp, sharing)} {out}")
                      for sharing in SIM_PROFILES.values()]
    return lines


def test_every_command_line_of_the_workflow_parses(tmp_path: Path):
    lines = command_lines(tmp_path)
    commands = {command for _, command, _ in lines}
    assert commands == {"trace", "simulate", "capped-trace", "real-cluster", "profile"}, commands  # all rules seen
    failures = []
    for where, command, line in lines:
        try:
            parse(command, line)
        except click.ClickException as e:
            failures.append(f"{where}: llumnix {command}: {e.format_message()}")
    assert not failures, "\n".join(sorted(set(failures))[:20])


def test_capped_trace_takes_trace_options_with_the_same_defaults(tmp_path: Path):
    """`capped-trace` is `trace` plus its caps: every option of `trace` (but -o) is there, with trace's default."""
    trace = {p.name: p for p in main.commands["trace"].params}
    capped = {p.name: p for p in main.commands["capped-trace"].params}
    shared = set(trace) - {"output"}
    assert shared <= set(capped), shared - set(capped)
    for name in shared:
        assert (capped[name].default, capped[name].required) == (trace[name].default, trace[name].required), name


def test_a_bad_option_fails_the_parse():
    """The check itself: an option `trace` does not have is refused."""
    with pytest.raises(click.NoSuchOption):
        parse("trace", "--workload S-S --rate 1 --seed 0 --no-such-option 1 -o x.csv")
