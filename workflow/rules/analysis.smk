# Aggregation (results/<experiment>/data.csv), figures (results/figures/<experiment>.{pdf,png}) and the claims
# table (results/claims.{md,csv}). Measurement experiments (Fig 10, 16) read committed measurements until their
# benchmarks are wired in: then replace `rule measurements` by a rule that runs `llumnix bench ...` and writes the
# same CSV.


rule aggregate:
    input:
        experiment=experiment_file,
        runs=summaries,
    output:
        "results/{experiment}/data.csv",
    params:
        scale=SCALE,
    log:
        "results/logs/aggregate/{experiment}.log",
    wildcard_constraints:
        experiment=_alternatives(SIMULATED),
    conda:
        "../envs/llumnix.yaml"
    shell:
        "llumnix aggregate --experiment {input.experiment} --scale {params.scale} -o {output} 2> {log}"


rule timeline:
    input:
        experiment=experiment_file,
        runs=summaries,
        instances=instance_tables,
    output:
        "results/{experiment}/timeline.csv",
    params:
        scale=SCALE,
    log:
        "results/logs/timeline/{experiment}.log",
    wildcard_constraints:
        experiment=_alternatives(TIMELINES),
    conda:
        "../envs/llumnix.yaml"
    shell:
        "llumnix timeline --experiment {input.experiment} --scale {params.scale} -o {output} 2> {log}"


rule measurements:
    input:
        experiment=experiment_file,
        measurements=measurements_file,
    output:
        "results/{experiment}/data.csv",
    log:
        "results/logs/aggregate/{experiment}.log",
    wildcard_constraints:
        experiment=_alternatives(MEASURED),
    conda:
        "../envs/llumnix.yaml"
    shell:
        "llumnix aggregate --experiment {input.experiment} --measurements {input.measurements} -o {output} 2> {log}"


# One plot rule per experiment, so that each figure carries its own caption in the report. Snakemake evaluates
# `shell` and functions at run time, after the loop has finished: nothing below may read `_name` lazily.
for _name in EXPERIMENTS:

    rule:
        name:
            f"plot_{_name.replace('-', '_')}"
        input:
            **plot_inputs(_name),
        output:
            pdf=figure_files(_name)[0],
            png=report(
                figure_files(_name)[1],
                caption=caption(REPORT_DIR, _name),
                category="Figures",
                labels={"figure": _name},
            ),
        params:
            timeline=timeline_option,
        log:
            f"results/logs/plot/{_name}.log",
        conda:
            "../envs/llumnix.yaml"
        shell:
            "llumnix plot --experiment {input.experiment} --data {input.data} {params.timeline}-o {output.pdf} 2> {log}"


rule claims:
    input:
        claims=CLAIMS_FILE,
        data=claims_inputs(EXPERIMENTS, CLAIMED),
    output:
        md="results/claims.md",
        csv=report(
            "results/claims.csv",
            caption="../report/claims.rst",
            category="Claims",
        ),
    log:
        "results/logs/claims.log",
    conda:
        "../envs/llumnix.yaml"
    shell:
        "llumnix claims --claims {input.claims} --results results --markdown {output.md} --csv {output.csv} 2> {log}"
