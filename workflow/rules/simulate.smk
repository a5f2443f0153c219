# One trace file per (experiment, trace, rate, seed) and one simulation per (experiment, trace, rate, system, seed).
# Paths: results/traces/<scale>/<experiment>/<trace>/r<rate>_s<seed>.parquet and
#        results/runs/<scale>/<experiment>/<trace>/r<rate>/<system>/s<seed>/{summary.json,*.parquet}.
# `llumnix simulate` writes summary.json last, atomically; snakemake removes the outputs of a failed or
# interrupted job, so a rerun picks up exactly the runs that are missing.


rule trace:
    output:
        TRACE_FILE,
    params:
        options=trace_options,
    log:
        "results/logs/{scale}/trace/{experiment}/{trace}/r{rate}_s{seed}.log",
    conda:
        "../envs/llumnix.yaml"
    shell:
        "llumnix trace {params.options} -o {output} 2> {log}"


rule simulate:
    input:
        trace=TRACE_FILE,
    output:
        summary=f"{RUN_DIR}/summary.json",
        requests=f"{RUN_DIR}/requests.parquet",
        instances=f"{RUN_DIR}/instances.parquet",
        migrations=f"{RUN_DIR}/migrations.parquet",
    params:
        options=simulate_options,
        out_dir=lambda wildcards, output: Path(output.summary).parent,
    log:
        f"results/logs/{{scale}}/simulate/{{experiment}}/{{trace}}/r{{rate}}/{{system}}/s{{seed}}.log",
    conda:
        "../envs/llumnix.yaml"
    shell:
        "llumnix simulate --trace {input.trace} {params.options} --out {params.out_dir} 2> {log}"
