"""Experiment files (``experiments/<name>.yaml``): what to run for one figure of the paper, at each scale.

An experiment is a grid: traces (a workload, an arrival process and a list of rates) x systems (a policy and its
options, optionally swept over one parameter) x seeds. A *scale* picks how many requests per run, how many seeds
and which part of the grid to run. The workflow expands the grid with :func:`expand_runs` and builds every command
line with :func:`trace_args` / :func:`simulate_args`, so the Snakefile holds no experiment logic.

Experiments of kind ``measurement`` (real-engine and scheduler benchmarks) have no grid: their data is a CSV of
measurements under ``results/<name>/``. Experiments of kind ``real`` have the simulation grid, but each run serves
its trace twice: on a real serving cluster and in the simulator with a profile measured on the same machine
(``llumnix.analysis.realsim``).
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator

from llumnix.fields import default_of, pydantic_field
from llumnix.policies.scaling import ScalingConfig
from llumnix.policies.system import SystemConfig
from llumnix.profiles import DEFAULT_PROFILE
from llumnix.runtime.cpuload import QuietConfig
from llumnix.runtime.serve_config import InstanceSpec
from llumnix.runtime.supervisor import RealClusterConfig
from llumnix.sim.simulator import SimConfig
from llumnix.workload.trace import GENERATED_WORKLOADS

WORKLOADS = ("S-S", "M-M", "L-L", "S-L", "L-S", "sharegpt", "burstgpt")
SYSTEM_POLICIES = ("round-robin", "infaas++", "llumnix")
DEFAULT_SCALE = "quick"
REQUIRED_SCALES = ("quick", "paper")

# Output layout: every path names what it holds. Relative to the workflow's working directory.
TRACE_FILE = "results/traces/{scale}/{experiment}/{trace}/r{rate}_s{seed}.parquet"
RUN_DIR = "results/runs/{scale}/{experiment}/{trace}/r{rate}/{system}/s{seed}"
RUN_FILES = ("summary.json", "requests.parquet", "instances.parquet", "migrations.parquet")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

Workload = Literal["S-S", "M-M", "L-L", "S-L", "L-S", "sharegpt", "burstgpt"]
Policy = Literal["round-robin", "infaas++", "llumnix"]


class ExperimentError(ValueError):
    """An experiment or claims file that does not validate; the message names the file and the bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TraceSpec(_Strict):
    """One workload of the experiment, run at each of ``rates`` (requests per second)."""

    workload: Workload
    rates: list[PositiveFloat] = Field(min_length=1)
    arrival: Literal["poisson", "gamma"] = "poisson"
    cv: PositiveFloat = 1.0
    priority_fraction: float = Field(0.0, ge=0.0, le=1.0)
    migration_threshold: float | None = Field(None, description="Overrides the systems' migration threshold.")
    group: str | None = Field(None, description="Figure row this trace belongs to (default: the trace's own name).")
    label: str | None = None
    lengths: Literal["authors", "table1"] = Field(
        "authors", description="Length source (llumnix trace --lengths): authors' generator / real rows, or Table 1."
    )
    stream: Literal["artifact", "seeded"] = Field(
        "artifact",
        description="Generated workloads: seed 0 replays the artifact's own trace (the one the paper's runs sent), "
        "other seeds draw new traces of the same distributions; seeded: every seed draws its own.",
    )

    @model_validator(mode="after")
    def _check(self) -> TraceSpec:
        if len(set(self.rates)) != len(self.rates):
            raise ValueError(f"rates has duplicates: {self.rates}")
        if self.arrival == "poisson" and self.cv != 1.0:
            raise ValueError("cv only applies to gamma arrivals (Poisson has CV 1)")
        return self


class AutoscaleSpec(_Strict):
    scale_up: float = pydantic_field(ScalingConfig, "scale_up")
    scale_down: float = pydantic_field(ScalingConfig, "scale_down")
    min_instances: PositiveInt = pydantic_field(ScalingConfig, "min_instances")
    max_instances: PositiveInt = pydantic_field(ScalingConfig, "max_instances")
    initial_instances: PositiveInt | None = Field(None, description="Instances at start (default: instances).")
    scale_down_queued: bool = pydantic_field(ScalingConfig, "scale_down_queued")
    rule: Literal["artifact", "mean-freeness"] = pydantic_field(ScalingConfig, "rule")

    @model_validator(mode="after")
    def _check(self) -> AutoscaleSpec:
        if self.scale_up >= self.scale_down:
            raise ValueError(f"scale_up ({self.scale_up}) must be below scale_down ({self.scale_down})")
        if self.min_instances > self.max_instances:
            raise ValueError(f"min_instances ({self.min_instances}) > max_instances ({self.max_instances})")
        if self.initial_instances is not None and not (
            self.min_instances <= self.initial_instances <= self.max_instances
        ):
            raise ValueError("initial_instances must lie within [min_instances, max_instances]")
        return self


class SystemSpec(_Strict):
    """One system of the comparison: a ``llumnix simulate --policy`` and its options."""

    policy: Policy
    label: str
    migration: bool = pydantic_field(SystemConfig, "migration")
    migration_threshold: float = pydantic_field(SystemConfig, "migration_threshold")
    priorities: bool = pydantic_field(SystemConfig, "priorities")
    autoscale: AutoscaleSpec | None = None


class SweepSpec(_Strict):
    """Run every system once per value of one auto-scaling parameter (Fig 15: scale_up x, scale_down x + 50)."""

    param: Literal["scale_up", "scale_down", "migration_threshold"]
    values: list[float] = Field(min_length=1)
    offsets: dict[Literal["scale_up", "scale_down"], float] = Field(
        default_factory=dict, description="Parameters set to the swept value plus an offset, e.g. scale_down: 50."
    )


class ScaleSpec(_Strict):
    """How much of the grid to run: requests per run, seeds, and optionally a subset of rates, traces, sweep values."""

    num_requests: PositiveInt
    seeds: PositiveInt = Field(1, description="Number of seeds: runs use seeds 0 .. seeds-1.")
    rates: Literal["all", "extremes", "highest"] = Field(
        "all",
        description="Rates of each trace: 'all'; 'extremes': the lightest and heaviest; 'highest': the heaviest.",
    )
    trace_rates: dict[str, Annotated[list[PositiveFloat], Field(min_length=1)]] = Field(
        default_factory=dict,
        description="Per trace, the rates to run instead of what 'rates' picks (each one of the trace's rates).",
    )
    traces: list[str] | None = Field(None, description="Subset of the traces (default: all).")
    system_traces: dict[str, Annotated[list[str], Field(min_length=1)]] = Field(
        default_factory=dict,
        description="Per system, the only traces it runs on (default: every system on every trace).",
    )
    sweep_values: list[float] | None = Field(None, description="Subset of the sweep's values (default: all).")

    def describe(self, name: str) -> str:
        seeds = f"{self.seeds} seed" + ("s" if self.seeds > 1 else "")
        return f"{name} scale: {self.num_requests:,} requests/run, {seeds}"

    def grid_note(self) -> list[str]:
        """What part of the grid this scale runs, in words (for the figures' footnotes)."""
        notes = []
        if self.rates == "extremes":
            notes.append("only the lightest and heaviest rate of each trace")
        elif self.rates == "highest":
            notes.append("only the heaviest rate of each trace")
        notes += [f"{t} at {', '.join(map(fmt_number, rates))} req/s only" for t, rates in self.trace_rates.items()]
        if self.traces is not None:
            notes.append(f"traces {', '.join(self.traces)} only")
        notes += [f"{s} on {', '.join(traces)} only" for s, traces in self.system_traces.items()]
        return notes


class RealSpec(_Strict):
    """kind 'real': the instances ``llumnix real-cluster`` serves with, and how the traces' lengths are capped."""

    model: str = pydantic_field(RealClusterConfig, "model")
    device: Literal["cpu", "cuda"] = pydantic_field(RealClusterConfig, "device")
    dtype: Literal["float32", "float16", "bfloat16"] = pydantic_field(RealClusterConfig, "dtype")
    num_blocks: PositiveInt = pydantic_field(RealClusterConfig, "num_blocks")
    torch_threads: PositiveInt = pydantic_field(RealClusterConfig, "torch_threads")
    num_cpus_per_instance: float = pydantic_field(RealClusterConfig, "num_cpus_per_instance", ge=0)
    length_scale: PositiveFloat = Field(1.0, description="prompt and output lengths are multiplied by this")
    max_prompt_tokens: PositiveInt = Field(description="prompt lengths are capped here (after scaling)")
    max_output_tokens: PositiveInt = Field(description="output lengths are capped here (after scaling)")
    block_size: PositiveInt = pydantic_field(InstanceSpec, "block_size")
    max_other_cores: float = pydantic_field(QuietConfig, "max_other_cores", ge=0)
    retry_disturbed: int = pydantic_field(QuietConfig, "retry_disturbed", ge=0)

    @model_validator(mode="after")
    def _check(self) -> RealSpec:
        usable = self.num_blocks - int(default_of(InstanceSpec, "watermark") * self.num_blocks)
        longest = self.max_prompt_tokens + self.max_output_tokens
        if math.ceil(longest / self.block_size) > usable:
            raise ValueError(
                f"max_prompt_tokens + max_output_tokens = {longest} tokens do not fit one instance's "
                f"{usable} usable blocks of {self.block_size}; lower the caps or raise num_blocks"
            )
        return self


class FigureSpec(_Strict):
    """How the figure is laid out: ``kind`` names a figure kind of llumnix.analysis.figures."""

    kind: Literal["lines", "timeline", "tradeoff", "bench", "real_vs_sim"]
    metrics: list[str] = Field(default_factory=list, description="'lines': one column per metric.")
    row_prefixes: list[str] = Field(
        default_factory=list, description="'lines': one row per prefix of the metric columns (e.g. high_, normal_)."
    )
    log_metrics: list[str] = Field(default_factory=list, description="'lines': metrics drawn on a log y axis.")
    x: str | None = Field(None, description="'tradeoff' / 'bench': x column.")
    y: str | None = Field(None, description="'tradeoff' / 'bench': y column.")
    hue: str | None = Field(None, description="'bench': the column that names each line.")
    log_y: bool = False


class Experiment(_Strict):
    name: str
    title: str
    paper: str = Field(description="The paper's result for this figure, in words.")
    kind: Literal["simulation", "measurement", "real"] = "simulation"
    figure: FigureSpec
    profile: str = Field(DEFAULT_PROFILE, description="Step-time profile of the simulations.")
    instances: PositiveInt = pydantic_field(SimConfig, "num_instances")
    traces: dict[str, TraceSpec] = Field(default_factory=dict)
    systems: dict[str, SystemSpec] = Field(default_factory=dict)
    sweep: SweepSpec | None = None
    scales: dict[str, ScaleSpec] = Field(default_factory=dict)
    measurements: str | None = Field(
        None, description="measurement kind: the CSV of measurements, relative to the workdir."
    )
    pending: str | None = Field(
        None, description="measurement kind: what produces the measurements (shown when absent)."
    )
    real: RealSpec | None = Field(None, description="real kind: the real cluster's instances and length caps.")

    @model_validator(mode="after")
    def _check(self) -> Experiment:
        for what, names in (("traces", self.traces), ("systems", self.systems)):
            for key in names:
                if not _NAME.match(key):
                    raise ValueError(f"{what}: name {key!r} must match {_NAME.pattern} (it becomes a path)")
        if self.kind == "measurement":
            if not self.measurements:
                raise ValueError("a measurement experiment needs 'measurements' (the CSV path)")
            return self
        if not self.traces or not self.systems:
            raise ValueError(f"a {self.kind} experiment needs at least one trace and one system")
        if (self.kind == "real") != (self.real is not None):
            raise ValueError("'real' (the real cluster's settings) is required by, and only allowed with, kind real")
        if self.kind == "real" and any(s.autoscale is not None for s in self.systems.values()):
            raise ValueError("kind real: the serving cluster does not auto-scale; remove autoscale from the systems")
        missing = [s for s in REQUIRED_SCALES if s not in self.scales]
        if missing:
            raise ValueError(
                f"scales: missing {', '.join(missing)} (every experiment defines {', '.join(REQUIRED_SCALES)})"
            )
        for scale_name, scale in self.scales.items():
            unknown = sorted(set(scale.traces or ()) - set(self.traces))
            if unknown:
                raise ValueError(
                    f"scales.{scale_name}.traces: unknown trace(s) {unknown}; known: {sorted(self.traces)}"
                )
            for trace, rates in scale.trace_rates.items():
                if trace not in self.traces:
                    raise ValueError(
                        f"scales.{scale_name}.trace_rates: unknown trace {trace!r}; known: {sorted(self.traces)}"
                    )
                extra = sorted(set(rates) - set(self.traces[trace].rates))
                if extra:
                    raise ValueError(
                        f"scales.{scale_name}.trace_rates.{trace}: {extra} not among the trace's rates "
                        f"{self.traces[trace].rates}"
                    )
            for system, traces in scale.system_traces.items():
                if system not in self.systems:
                    raise ValueError(
                        f"scales.{scale_name}.system_traces: unknown system {system!r}; known: {sorted(self.systems)}"
                    )
                unknown = sorted(set(traces) - set(self.traces))
                if unknown:
                    raise ValueError(
                        f"scales.{scale_name}.system_traces.{system}: unknown trace(s) {unknown}; "
                        f"known: {sorted(self.traces)}"
                    )
            if scale.sweep_values is not None:
                if self.sweep is None:
                    raise ValueError(f"scales.{scale_name}.sweep_values given but the experiment has no sweep")
                extra = sorted(set(scale.sweep_values) - set(self.sweep.values))
                if extra:
                    raise ValueError(f"scales.{scale_name}.sweep_values: {extra} not in sweep.values")
        if self.sweep is not None and self.sweep.param != "migration_threshold":
            bad = [k for k, s in self.systems.items() if s.autoscale is None]
            if bad:
                raise ValueError(f"sweep.param {self.sweep.param} needs autoscale on every system; missing on {bad}")
        if self.figure.kind == "timeline" and len(self.traces) != 1:
            raise ValueError("figure.kind 'timeline' takes exactly one trace")
        return self

    # -- the grid --------------------------------------------------------------------------------------------------
    def scale(self, name: str) -> ScaleSpec:
        try:
            return self.scales[name]
        except KeyError:
            raise ExperimentError(
                f"experiment {self.name}: no scale {name!r}; it defines {', '.join(sorted(self.scales))}"
            ) from None

    def system_ids(self, scale: str) -> list[str]:
        """System wildcards: the system names, or ``<name>-<param><value>`` for each value of a sweep."""
        if self.sweep is None:
            return list(self.systems)
        values = self.scale(scale).sweep_values or self.sweep.values
        return [sweep_id(name, self.sweep.param, v) for v in values for name in self.systems]

    def resolve_system(self, system_id: str) -> tuple[str, SystemSpec, float | None]:
        """(family name, spec with the sweep value applied, sweep value) of a system wildcard."""
        if system_id in self.systems:
            return system_id, self.systems[system_id], None
        if self.sweep is not None:
            for name, spec in self.systems.items():
                for v in self.sweep.values:
                    if sweep_id(name, self.sweep.param, v) == system_id:
                        return name, _apply_sweep(spec, self.sweep, v), v
        raise ExperimentError(f"experiment {self.name}: unknown system {system_id!r}")

    def rates(self, trace: str, scale: str) -> list[float]:
        spec = self.scale(scale)
        if trace in spec.trace_rates:
            return sorted(spec.trace_rates[trace])
        rates = sorted(self.traces[trace].rates)
        if spec.rates == "extremes" and len(rates) > 2:
            rates = [rates[0], rates[-1]]
        elif spec.rates == "highest":
            rates = rates[-1:]
        return rates

    def runs_on(self, system_id: str, trace: str, scale: str) -> bool:
        """Whether the scale runs this system (a sweep id counts as its family) on this trace."""
        only = self.scale(scale).system_traces.get(self.resolve_system(system_id)[0])
        return only is None or trace in only

    def group(self, trace: str) -> str:
        return self.traces[trace].group or trace

    def migration_threshold(self, trace: str, system: SystemSpec) -> float:
        override = self.traces[trace].migration_threshold
        return override if override is not None else system.migration_threshold


def sweep_id(system: str, param: str, value: float) -> str:
    return f"{system}-{param.replace('_', '-')}{fmt_number(value)}"


def _apply_sweep(spec: SystemSpec, sweep: SweepSpec, value: float) -> SystemSpec:
    if sweep.param == "migration_threshold":
        return spec.model_copy(update={"migration_threshold": value})
    assert spec.autoscale is not None
    update = {sweep.param: value, **{k: value + off for k, off in sweep.offsets.items()}}
    return spec.model_copy(update={"autoscale": AutoscaleSpec(**{**spec.autoscale.model_dump(), **update})})


def fmt_number(x: float) -> str:
    """The canonical spelling of a rate or parameter in paths: 2.0 -> '2', 7.25 -> '7.25'."""
    return f"{x:g}"


@dataclass(frozen=True, order=True)
class Run:
    """One simulation: the wildcards of its output directory."""

    experiment: str
    trace: str
    rate: float
    system: str
    seed: int

    def wildcards(self, scale: str) -> dict[str, str]:
        return {
            "scale": scale,
            "experiment": self.experiment,
            "trace": self.trace,
            "rate": fmt_number(self.rate),
            "system": self.system,
            "seed": str(self.seed),
        }

    def trace_file(self, scale: str) -> str:
        return TRACE_FILE.format(**self.wildcards(scale))

    def run_dir(self, scale: str) -> str:
        return RUN_DIR.format(**self.wildcards(scale))


def expand_runs(exp: Experiment, scale: str) -> list[Run]:
    """Every run of the experiment at this scale, in a stable order (kind real: each is served real and simulated)."""
    if exp.kind == "measurement":
        return []
    spec = exp.scale(scale)
    traces = spec.traces or list(exp.traces)
    return [
        Run(exp.name, trace, rate, system, seed)
        for trace in traces
        for rate in exp.rates(trace, scale)
        for system in exp.system_ids(scale)
        if exp.runs_on(system, trace, scale)
        for seed in range(spec.seeds)
    ]


def _rate_of(exp: Experiment, trace: str, rate: str) -> float:
    for r in exp.traces[trace].rates:
        if fmt_number(r) == rate:
            return r
    raise ExperimentError(f"experiment {exp.name}: trace {trace} has no rate {rate}")


def trace_args(exp: Experiment, trace: str, rate: str, seed: str, scale: str) -> str:
    """``llumnix trace`` options (without -o) for one trace file."""
    t = exp.traces[trace]
    args = [
        "--workload", t.workload,
        "--rate", fmt_number(_rate_of(exp, trace, rate)),
        "--num-requests", str(exp.scale(scale).num_requests),
        "--arrival", t.arrival,
        "--seed", str(int(seed)),
        "--lengths", t.lengths,
    ]  # fmt: skip
    if t.stream == "artifact" and int(seed) == 0 and t.workload in GENERATED_WORKLOADS and t.lengths == "authors":
        args += ["--stream", "artifact"]
    if t.arrival == "gamma":
        args += ["--cv", fmt_number(t.cv)]
    if t.priority_fraction:
        args += ["--priority-fraction", fmt_number(t.priority_fraction)]
    return shlex.join(args)


def simulate_args(exp: Experiment, trace: str, system_id: str, seed: str) -> str:
    """``llumnix simulate`` options (without --trace / --out) for one run."""
    _, s, _ = exp.resolve_system(system_id)
    args = ["--policy", s.policy, "--instances", str(exp.instances), "--profile", exp.profile, "--seed", str(int(seed))]
    if s.policy == "llumnix" and not s.migration:
        args.append("--no-migration")
    args += ["--migration-threshold", fmt_number(exp.migration_threshold(trace, s))]
    if s.priorities:
        args.append("--priorities")
    if s.autoscale is not None:
        a = s.autoscale
        args += [
            "--autoscale",
            "--scale-up", fmt_number(a.scale_up),
            "--scale-down", fmt_number(a.scale_down),
            "--min-instances", str(a.min_instances),
            "--max-instances", str(a.max_instances),
        ]  # fmt: skip
        if a.initial_instances is not None:
            args += ["--initial-instances", str(a.initial_instances)]
        if not a.scale_down_queued:
            args.append("--no-scale-down-queued")
        if a.rule != "artifact":
            args += ["--scaling-rule", a.rule]
    args.append("--no-progress")
    return shlex.join(args)


def run_metadata(exp: Experiment, run: Run, scale: str) -> dict:
    """The columns that say what a run was, next to its summary in data.csv."""
    t = exp.traces[run.trace]
    family, s, sweep_value = exp.resolve_system(run.system)
    a = s.autoscale
    return {
        "experiment": exp.name,
        "scale": scale,
        "num_requests": exp.scale(scale).num_requests,
        "trace": run.trace,
        "group": exp.group(run.trace),
        "workload": t.workload,
        "arrival": t.arrival,
        "cv": t.cv,
        "priority_fraction": t.priority_fraction,
        "rate": run.rate,
        "system": family,
        "system_label": s.label,
        "system_id": run.system,
        "sweep_param": exp.sweep.param if exp.sweep is not None else "",
        "sweep_value": sweep_value if sweep_value is not None else math.nan,
        "migration_threshold": exp.migration_threshold(run.trace, s),
        "scale_up": a.scale_up if a else math.nan,
        "scale_down": a.scale_down if a else math.nan,
        "seed": run.seed,
    }


# -- loading ---------------------------------------------------------------------------------------------------------
def format_validation_error(path: Path | str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<top level>"
        lines.append(f"  {loc}: {e['msg']}")
    return f"{path}: invalid\n" + "\n".join(lines)


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ExperimentError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise ExperimentError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ExperimentError(f"{path}: expected a mapping at the top level")
    return data


def load_experiment(path: Path | str) -> Experiment:
    path = Path(path)
    data = read_yaml(path)
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as e:
        raise ExperimentError(format_validation_error(path, e)) from None
    if exp.name != path.stem:
        raise ExperimentError(f"{path}: name: {exp.name!r} must equal the file name {path.stem!r}")
    return exp


def experiment_files(directory: Path | str) -> list[Path]:
    """Experiment files of a directory: every ``*.yaml`` except ``claims.yaml``."""
    return sorted(p for p in Path(directory).glob("*.yaml") if p.name != "claims.yaml")


def load_experiments(directory: Path | str) -> dict[str, Experiment]:
    files = experiment_files(directory)
    if not files:
        raise ExperimentError(f"{directory}: no experiment files (*.yaml)")
    return {e.name: e for e in (load_experiment(p) for p in files)}


def scale_names(experiments: Iterable[Experiment]) -> set[str]:
    return {s for e in experiments for s in e.scales}
