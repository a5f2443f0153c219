# Helpers and wildcard constraints (no rules here). Every decision about runs, paths and command lines is made by
# llumnix.analysis; this file only loads the experiments for the chosen scale.
import re
import shlex
import sys
from pathlib import Path

from snakemake.logging import logger

from llumnix.analysis.claims import load_claims
from llumnix.analysis.experiments import (
    RUN_DIR,
    TRACE_FILE,
    ExperimentError,
    load_experiments,
    simulate_args,
    trace_args,
)
from llumnix.analysis.workflow import (
    all_targets,
    caption,
    claims_inputs,
    data_file,
    figure_files,
    has_data_source,
    run_files,
    skipped_message,
    timeline_file,
)

# Rules call the `llumnix` command of the environment snakemake runs in (e.g. .venv/bin), activated or not.
shell.prefix(f"set -euo pipefail; export PATH={shlex.quote(str(Path(sys.executable).parent))}:\"$PATH\"; ")

SCALE = config["scale"]
EXPERIMENTS_DIR = Path(config["experiments_dir"] or Path(workflow.basedir) / "experiments")
REPORT_DIR = Path(workflow.basedir) / "workflow" / "report"
CLAIMS_FILE = EXPERIMENTS_DIR / "claims.yaml"

try:
    EXPERIMENTS = load_experiments(EXPERIMENTS_DIR)
    CLAIMED = {c.experiment for c in load_claims(CLAIMS_FILE)} if CLAIMS_FILE.exists() else set()
except ExperimentError as e:
    raise ValueError(f"experiment files do not validate:\n{e}") from None
_unscaled = sorted(n for n, e in EXPERIMENTS.items() if e.kind == "simulation" and SCALE not in e.scales)
if _unscaled:
    raise ValueError(f"--config scale={SCALE}: not defined by {', '.join(_unscaled)} (see their scales:)")

HAS_CLAIMS = CLAIMS_FILE.exists()
SIMULATED = sorted(n for n, e in EXPERIMENTS.items() if e.kind == "simulation")
TIMELINES = sorted(n for n, e in EXPERIMENTS.items() if e.figure.kind == "timeline")
MEASURED = sorted(n for n, e in EXPERIMENTS.items() if e.kind == "measurement" and has_data_source(e))
for _exp in EXPERIMENTS.values():
    if not has_data_source(_exp):
        logger.warning(skipped_message(_exp))


def _alternatives(names):
    """A wildcard constraint that matches exactly these names (never matches when empty)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


def experiment_file(wildcards):
    return str(EXPERIMENTS_DIR / f"{wildcards.experiment}.yaml")


def summaries(wildcards):
    return run_files(EXPERIMENTS[wildcards.experiment], SCALE)


def instance_tables(wildcards):
    return run_files(EXPERIMENTS[wildcards.experiment], SCALE, "instances.parquet")


def trace_options(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    return trace_args(exp, wildcards.trace, wildcards.rate, wildcards.seed, wildcards.scale)


def simulate_options(wildcards):
    return simulate_args(EXPERIMENTS[wildcards.experiment], wildcards.trace, wildcards.system, wildcards.seed)


def local_bench_args():
    """Fig 10 on this machine: the GPU setting when torch sees one, else the CPU tiny model."""
    import torch

    if torch.cuda.is_available():
        return "--device cuda --model llama-7b --dtype bfloat16 --lengths 256,512,1024,2048,4096,8192"
    return "--device cpu --model tiny --lengths 64,128,256,512,1024 --repeats 3"


def measurements_file(wildcards):
    return EXPERIMENTS[wildcards.experiment].measurements


def plot_inputs(name):
    inputs = {"experiment": str(EXPERIMENTS_DIR / f"{name}.yaml"), "data": data_file(name)}
    if name in TIMELINES:
        inputs["timeline"] = timeline_file(name)
    return inputs


def timeline_option(wildcards, input):
    return f"--timeline {input.timeline} " if "timeline" in input.keys() else ""


wildcard_constraints:
    scale=r"[A-Za-z0-9_-]+",
    experiment=_alternatives(EXPERIMENTS),
    rate=r"[0-9]+(\.[0-9]+)?",
    seed=r"[0-9]+",
    trace=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",
    system=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",
