# Real cluster vs simulator: experiments of kind `real` (experiments/real_cluster.yaml). Each run serves a capped
# trace on a real Ray cluster of torch instances (`llumnix real-cluster`) and simulates the same trace and system with
# profiles measured here (`llumnix profile`, same engine, KV pool and threads): `sim` with one measured beside the
# cluster's other instances (they share the CPU cores), `sim-alone` with one of an instance alone, for reference, and
# `sim-insitu` with a profile fitted to the real run's own steps plus its measured per-request latencies
# (`llumnix insitu-profile`, `llumnix simulate --latencies-from`).
# `llumnix real-vs-sim` puts them side by side (results/<experiment>/data.csv); the generic plot rule draws
# results/figures/<experiment>.{pdf,png}.
# Real runs and the profile measure wall-clock time: they take every core (`threads: workflow.cores`) so that no other
# job of the workflow runs beside them.
# With `--config backend=vllm` the default target is the same experiment served by vLLM engines instead (`llumnix
# real-cluster --backend vllm`, run by the vLLM venv's Python, `vllm_python`): real runs only, in the runtime folder
# `real-vllm` of each run, aggregated to results/<experiment>-vllm/data.csv and drawn as
# results/figures/<experiment>-vllm.{pdf,png}; the torch results are left as they are.
from llumnix.analysis.realsim import (
    INSITU,
    INSITU_PROFILE,
    PROFILE_FILE,
    REAL_RUN_DIR,
    REAL_TRACE_FILE,
    REAL_BACKENDS,
    SIM_PROFILES,
    backend_experiment,
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

VLLM_PYTHON = Path(workflow.basedir) / config["vllm_python"]  # unchanged when absolute
VLLM_RUN_DIR = REAL_RUN_DIR.replace("{runtime}", REAL_BACKENDS["vllm"])
VLLM_EXPERIMENT = backend_experiment("{experiment}", "vllm")  # the name of its data and figure
if config["backend"] == "vllm" and not VLLM_PYTHON.is_file():
    raise ValueError(
        f"--config backend=vllm: no Python at {VLLM_PYTHON}; run `make install-vllm` (it creates .venv-vllm) or "
        "point --config vllm_python=... at a Python with vLLM and llumnix installed"
    )


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
        steps=f"{REAL_RUN_DIR.replace('{runtime}', 'real')}/steps.parquet",
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


rule real_insitu_profile:
    input:
        steps=f"{REAL_RUN_DIR.replace('{runtime}', 'real')}/steps.parquet",
        base=PROFILE_FILE.replace("{sharing}", "alone"),
    output:
        f"{REAL_RUN_DIR.replace('{runtime}', 'real')}/{INSITU_PROFILE}",
    log:
        "results/logs/{scale}/real_cluster/{experiment}/{trace}/r{rate}/{system}/s{seed}_insitu_profile.log",
    wildcard_constraints:
        experiment=_alternatives(REAL),
    conda:
        "../envs/llumnix.yaml"
    shell:
        "llumnix insitu-profile --steps {input.steps} --base {input.base} -o {output} 2> {log}"


rule real_insitu_twin:
    input:
        trace=REAL_TRACE_FILE,
        profile=rules.real_insitu_profile.output[0],
        real=rules.real_cluster.output.summary,
    output:
        summary=f"{REAL_RUN_DIR.replace('{runtime}', INSITU)}/summary.json",
        requests=f"{REAL_RUN_DIR.replace('{runtime}', INSITU)}/requests.parquet",
    params:
        options=lambda wc, input: twin_simulate_args(
            EXPERIMENTS[wc.experiment], wc.trace, wc.system, wc.seed, input.profile
        ),
        out_dir=lambda wildcards, output: Path(output.summary).parent,
    log:
        f"results/logs/{{scale}}/simulate/{{experiment}}/{{trace}}/r{{rate}}/{{system}}/s{{seed}}_{INSITU}.log",
    wildcard_constraints:
        experiment=_alternatives(REAL),
    conda:
        "../envs/llumnix.yaml"
    shell:
        "llumnix simulate --trace {input.trace} {params.options} --latencies-from {input.real} "
        "--out {params.out_dir} 2> {log}"


rule real_cluster_vllm:
    input:
        trace=REAL_TRACE_FILE,
    output:
        summary=f"{VLLM_RUN_DIR}/summary.json",
        requests=f"{VLLM_RUN_DIR}/requests.parquet",
    params:
        options=lambda wc: real_cluster_args(
            EXPERIMENTS[wc.experiment], wc.trace, wc.system, wc.seed, backend="vllm", vllm_python=VLLM_PYTHON
        ),
        out_dir=lambda wildcards, output: Path(output.summary).parent,
    threads: workflow.cores
    log:
        "results/logs/{scale}/real_cluster_vllm/{experiment}/{trace}/r{rate}/{system}/s{seed}.log",
    wildcard_constraints:
        experiment=_alternatives(REAL),
    conda:
        "../envs/llumnix.yaml"
    shell:
        "llumnix real-cluster --trace {input.trace} {params.options} --out {params.out_dir} 2> {log}"


rule real_vllm_data:
    input:
        experiment=experiment_file,
        runs=lambda wc: real_run_files(EXPERIMENTS[wc.experiment], SCALE, backend="vllm"),
    output:
        data_file(VLLM_EXPERIMENT),
    params:
        scale=SCALE,
    log:
        f"results/logs/aggregate/{VLLM_EXPERIMENT}.log",
    wildcard_constraints:
        experiment=_alternatives(REAL),
    conda:
        "../envs/llumnix.yaml"
    shell:
        "llumnix real-vs-sim --experiment {input.experiment} --scale {params.scale} --backend vllm -o {output} "
        "2> {log}"


rule plot_real_vllm:
    input:
        experiment=experiment_file,
        data=data_file(VLLM_EXPERIMENT),
    output:
        pdf=figure_files(VLLM_EXPERIMENT)[0],
        png=report(
            figure_files(VLLM_EXPERIMENT)[1],
            caption="../report/real_cluster-vllm.rst",
            category="Figures",
            labels={"figure": VLLM_EXPERIMENT},
        ),
    log:
        f"results/logs/plot/{VLLM_EXPERIMENT}.log",
    wildcard_constraints:
        experiment=_alternatives(REAL),
    conda:
        "../envs/llumnix.yaml"
    shell:
        "llumnix plot --experiment {input.experiment} --data {input.data} -o {output.pdf} 2> {log}"
