# RankMixup: the shared rules build its calibration tables (statistic `selected`: test metrics of the
# best-validation epoch, with and without temperature scaling) and curves; this rule adds the paper's
# reliability diagrams.


include: "common.smk"


rule rankmixup_fig_reliability:
    input:
        rankmixup_reliability_inputs,
    output:
        png=report(
            "figures/rankmixup/{scale}/reliability_{experiment}.png",
            caption="report/reliability.rst",
            category="rankmixup",
            subcategory="{scale}",
            labels={"paper": "rankmixup", "figure": "reliability {experiment}", "scale": "{scale}"},
        ),
        pdf="figures/rankmixup/{scale}/reliability_{experiment}.pdf",
    params:
        runs=rankmixup_reliability_runs,
        stamp=rankmixup_stamp,
    conda:
        "../../envs/repro.yaml"
    log:
        "logs/rankmixup/{scale}/reliability_{experiment}.log",
    shell:
        "python -m papers.rankmixup.figures reliability --runs {params.runs:q} "
        "--out figures/rankmixup/{wildcards.scale:q}/reliability_{wildcards.experiment:q} "
        "--stamp {params.stamp:q} > {log:q} 2>&1"


rule reproduce_rankmixup:
    input:
        paper_targets("rankmixup"),
        [f"figures/rankmixup/{SCALE}/reliability_{experiment}.png" for experiment in rankmixup_experiments()],
