# Real cluster vs simulator: experiments of kind `real` (experiments/real_cluster.yaml). Each run serves a capped
# trace on a real Ray cluster of torch instances (`llumnix real-cluster`) and simulates the same trace and system with
# profiles measured here (`llumnix profile`, same engine, KV pool and threads): `sim` with one measured beside the
# cluster's other instances (they share the CPU cores), `sim-alone` with one of an instance alone, for reference.
# `llumnix real-vs-sim` puts them side by side (results/<experiment>/data.csv); the generic plot rule draws
# results/figures/<experiment>.{pdf,png}.
# Real runs and the profile measure wall-clock time: they take every core (`threads: workflow.cores`) so that no other
# job of the workflow runs beside them.
from llumnix.analysis.realsim import (
    PROFILE_FILE,
    REAL_RUN_DIR,
    REAL_TRACE_FILE,
    SIM_PROFILES,
    capped_trace_args,
    profile_args,
    real_cluster_args,
    real_run_files,
    twin_simulate_args,
)

REAL = sorted(n for n, e in EXPERIMENTS.items() if e.kind == "real")
_unscaled_real = [n for n in REAL if SCALE not in EXPERIMENTS[n].scales]
if _unscaled_real:
    raise ValueError(f"--config scale={SCALE}: not defined by {', '.join(_unscaled_real)} (see their scales:)")


rule capped_trace:
    output:
        REAL_TRACE_FILE,
    params:
        options=lambda wc: capped_trace_args(EXPERIMENTS[wc.experiment], wc.trace, wc.rate, wc.seed, wc.scale),
    log:
        "results/logs/{scale}/trace/{experiment}/{trace}/r{rate}_s{seed}_capped.log",
    wildcard_constraints:
        experiment=_alternatives(REAL),
    conda:
        "../envs/llumnix.yaml"
    shell:
        "llumnix capped-trace {params.options} -o {output} 2> {log}"


rule real_profile:
    output:
        PROFILE_FILE,
    params:
        options=lambda wc: profile_args(EXPERIMENTS[wc.experiment], wc.sharing),
    threads: workflow.cores
    log:
        "results/logs/profile/{experiment}_{sharing}.log",
    wildcard_constraints:
        experiment=_alternatives(REAL),
        sharing=_alternatives(SIM_PROFILES.values()),
    conda:
        "../envs/llumnix.yaml"
    shell:
        "llumnix profile {params.options} -o {output} 2> {log}"


rule real_cluster:
    input:
        trace=REAL_TRACE_FILE,
    output:
        summary=f"{REAL_RUN_DIR.replace('{runtime}', 'real')}/summary.json",
        requests=f"{REAL_RUN_DIR.replace('{runtime}', 'real')}/requests.parquet",
    params:
        options=lambda wc: real_cluster_args(EXPERIMENTS[wc.experiment], wc.trace, wc.system, wc.seed),
        out_dir=lambda wildcards, output: Path(output.summary).parent,
    threads: workflow.cores
    log:
        "results/logs/{scale}/real_cluster/{experiment}/{trace}/r{rate}/{system}/s{seed}.log",
    wildcard_constraints:
        experiment=_alternatives(REAL),
    conda:
        "../envs/llumnix.yaml"
    shell:
        "llumnix real-cluster --trace {input.trace} {params.options} --out {params.out_dir} 2> {log}"


rule real_twin:
    input:
        trace=REAL_TRACE_FILE,
        profile=lambda wc: PROFILE_FILE.format(experiment=wc.experiment, sharing=SIM_PROFILES[wc.runtime]),
    output:
        summary=f"{REAL_RUN_DIR}/summary.json",
        requests=f"{REAL_RUN_DIR}/requests.parquet",
    params:
        options=lambda wc, input: twin_simulate_args(
            EXPERIMENTS[wc.experiment], wc.trace, wc.system, wc.seed, input.profile
        ),
        out_dir=lambda wildcards, output: Path(output.summary).parent,
    log:
        "results/logs/{scale}/simulate/{experiment}/{trace}/r{rate}/{system}/s{seed}_{runtime}.log",
    wildcard_constraints:
        experiment=_alternatives(REAL),
        runtime=_alternatives(SIM_PROFILES),
    conda:
        "../envs/llumnix.yaml"
    shell:
        "llumnix simulate --trace {input.trace} {params.options} --out {params.out_dir} 2> {log}"


rule real_vs_sim:
    input:
        experiment=experiment_file,
        runs=lambda wc: real_run_files(EXPERIMENTS[wc.experiment], SCALE),
    output:
        "results/{experiment}/data.csv",
    params:
        scale=SCALE,
    log:
        "results/logs/aggregate/{experiment}.log",
    wildcard_constraints:
        experiment=_alternatives(REAL),
    conda:
        "../envs/llumnix.yaml"
    shell:
        "llumnix real-vs-sim --experiment {input.experiment} --scale {params.scale} -o {output} 2> {log}"
