# The paper's experiments, end to end: traces -> simulations -> data.csv per experiment -> figures -> claims.
#   snakemake --cores all                         # quick scale (default): Figs 11-15 in 901 CPU-s (2026-11-29),
#                                                 # ~8 min on 2 idle cores, the paper scale's verdicts on all claims
#   snakemake --cores all --config scale=paper    # the paper's scale: 10,000 requests/run, 3 seeds, every rate
#   snakemake --cores 1 --report results/report.html
#   snakemake --cores all --config backend=vllm   # the real-cluster experiment on vLLM engines (make install-vllm)
# Experiments are the YAML files in experiments/ (validated on load); the logic lives in llumnix.analysis.
from snakemake.utils import min_version, validate

min_version("8.0")


validate(config, "workflow/schemas/config.schema.yaml", set_default=True)


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/bench.smk"
include: "workflow/rules/real_cluster.smk"


rule all:
    default_target: True
    input:
        all_targets(EXPERIMENTS, with_claims=HAS_CLAIMS, backend=config["backend"]),
        "results/figures/fig10-local.png",
