# Reproduction workflow: one `reproduce_<paper>` target per paper, `reproduce_all`, and `report`.
#   snakemake -c2 reproduce_mixup                         (smoke scale, CPU, minutes)
#   snakemake --profile profiles/local-gpu reproduce_mixup --config scale=proxy seeds=3
# The grid of (experiment, method, seed) comes from papers/<paper>/configs/<scale>/*.yaml.
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("8.20")


configfile: Path(workflow.basedir) / "workflow" / "config.yaml"


validate(config, Path(workflow.basedir) / "workflow" / "schema" / "config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/common.smk"
include: "workflow/rules.smk"


for paper_workflow in sorted(Path(workflow.basedir).glob("papers/*/workflow.smk")):

    include: str(paper_workflow)


rule reproduce_all:
    input:
        # everything each paper's own reproduce_<paper> builds, its paper-specific figures included
        [getattr(rules, f"reproduce_{paper}").input for paper in PAPERS],


rule report:
    input:
        existing_run_metrics(),
        [paper_results_file(paper) for paper in PAPERS],
    output:
        index="reports/index.md",
        # every claim of every paper with its 95% interval and verdict (common/claims.py), and its forest plot
        claims_md="reports/claims.md",
        claims_csv=report(
            "reports/claims.csv",
            caption="workflow/report/claims.rst",
            category="claims",
            labels={"table": "claims and verdicts"},
        ),
        forest=report(
            "figures/claims_forest.png",
            caption="workflow/report/claims_forest.rst",
            category="claims",
            labels={"figure": "claims forest plot"},
        ),
        forest_pdf="figures/claims_forest.pdf",
    conda:
        "envs/repro.yaml"
    log:
        "logs/report/index.log",
    shell:
        "python -m common.report index > {log:q} 2>&1"
