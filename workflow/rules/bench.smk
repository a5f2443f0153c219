# Real-engine and scheduler benchmarks (Fig 10, Fig 16). They measure this machine, so their numbers differ from
# machine to machine; each writes the command and machine next to its output.
#  - Fig 10 on the paper's setting (LLaMA-7B on a GPU) is a committed measurement (results/fig10/README.md says how it
#    was made); every run also measures migration on this machine's engine: CUDA when torch sees a GPU, else the CPU
#    `tiny` model, drawn as results/figures/fig10-local.
#  - Fig 16 is the scheduler benchmark; results/fig16/measurements.csv is committed, `snakemake -R bench_scheduler`
#    measures it again here.


rule bench_migration_local:
    output:
        "results/fig10/local.csv",
    params:
        args=local_bench_args(),
    log:
        "results/logs/bench/migration_local.log",
    conda:
        "../envs/llumnix.yaml"
    shell:
        "llumnix bench migration {params.args} -o {output} 2> {log}"


rule plot_fig10_local:
    input:
        "results/fig10/local.csv",
    output:
        pdf="results/figures/fig10-local.pdf",
        png=report(
            "results/figures/fig10-local.png",
            caption="../report/fig10-local.rst",
            category="Fig 10",
        ),
    log:
        "results/logs/plot/fig10-local.log",
    conda:
        "../envs/llumnix.yaml"
    shell:
        "llumnix plot-migration --csv {input} -o results/figures/fig10-local 2> {log}"


rule bench_scheduler:
    output:
        "results/fig16/measurements.csv",
    params:
        instances="16,64" if SCALE == "quick" else "16,64,256",
    log:
        "results/logs/bench/scheduler.log",
    conda:
        "../envs/llumnix.yaml"
    shell:
        "llumnix bench scheduler --instances {params.instances} -o {output} 2> {log}"
