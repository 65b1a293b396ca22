# C-Mixup: the shared rules build the tables; these rules add the paper's figures (tabular data, so the
# shared image figures are left out of reproduce_cmixup, see common.smk).


include: "common.smk"


rule cmixup_fig_rmse:
    input:
        cmixup_rmse_inputs,
    output:
        png=report(
            "figures/cmixup/{scale}/rmse_{experiment}.png",
            caption="report/rmse.rst",
            category="cmixup",
            subcategory="{scale}",
            labels={"paper": "cmixup", "figure": "RMSE per method {experiment}", "scale": "{scale}"},
        ),
        pdf="figures/cmixup/{scale}/rmse_{experiment}.pdf",
    params:
        runs=cmixup_rmse_runs,
        stamp=cmixup_stamp,
    conda:
        "../../envs/repro.yaml"
    log:
        "logs/cmixup/{scale}/rmse_{experiment}.log",
    shell:
        "python -m papers.cmixup.figures rmse --runs {params.runs:q} "
        "--out figures/cmixup/{wildcards.scale:q}/rmse_{wildcards.experiment:q} "
        "--stamp {params.stamp:q} > {log:q} 2>&1"


rule cmixup_fig_kernel:
    input:
        config=cmixup_config,
    output:
        png=report(
            "figures/cmixup/{scale}/kernel_{experiment}.png",
            caption="report/kernel.rst",
            category="cmixup",
            subcategory="{scale}",
            labels={"paper": "cmixup", "figure": "partner-label law {experiment}", "scale": "{scale}"},
        ),
        pdf="figures/cmixup/{scale}/kernel_{experiment}.pdf",
    params:
        stamp=cmixup_stamp,
    conda:
        "../../envs/repro.yaml"
    log:
        "logs/cmixup/{scale}/kernel_{experiment}.log",
    shell:
        "python -m papers.cmixup.figures kernel --config {input.config:q} "
        "--out figures/cmixup/{wildcards.scale:q}/kernel_{wildcards.experiment:q} "
        "--stamp {params.stamp:q} > {log:q} 2>&1"


rule reproduce_cmixup:
    input:
        cmixup_paper_targets(),
        [f"figures/cmixup/{SCALE}/rmse_{experiment}.png" for experiment in cmixup_experiments()],
        [f"figures/cmixup/{SCALE}/kernel_{experiment}.png" for experiment in cmixup_kernel_experiments()],
