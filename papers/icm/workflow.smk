# ICM: the shared rules train the runs and build the tables and the accuracy curves; these rules add the
# paper's figures (noise of the pairs beside the cluster purity; a grid of clusters). The shared mixed_examples
# figure is left out: a complementary-label batch has no class targets to draw.
include: "common.smk"


rule icm_fig_noise:
    input:
        icm_noise_inputs,
    output:
        png=report(
            "figures/icm/{scale}/noise_{experiment}.png",
            caption="report/noise.rst",
            category="icm",
            subcategory="{scale}",
            labels={"paper": "icm", "figure": "CL noise {experiment}", "scale": "{scale}"},
        ),
        pdf="figures/icm/{scale}/noise_{experiment}.pdf",
        # spec §6's exact check: measured noise of the pairs vs the analytic rate of uniform partners
        table="reports/icm/{scale}/noise_{experiment}.md",
    params:
        runs=icm_noise_runs,
        batch=icm_batch_size,
        analytic=icm_analytic_flag,
        stamp=icm_stamp,
    conda:
        "../../envs/repro.yaml"
    log:
        "logs/icm/{scale}/noise_{experiment}.log",
    shell:
        "python -m papers.icm.figures noise --runs {params.runs:q} --batch-size {params.batch} "
        "--table {output.table:q} {params.analytic} --out figures/icm/{wildcards.scale:q}/noise_{wildcards.experiment:q} "
        "--stamp {params.stamp:q} > {log:q} 2>&1"


rule icm_fig_clusters:
    input:
        config=icm_config,
    output:
        png=report(
            "figures/icm/{scale}/clusters_{experiment}.png",
            caption="report/clusters.rst",
            category="icm",
            subcategory="{scale}",
            labels={"paper": "icm", "figure": "clusters {experiment}", "scale": "{scale}"},
        ),
        pdf="figures/icm/{scale}/clusters_{experiment}.pdf",
    params:
        stamp=icm_stamp,
    conda:
        "../../envs/repro.yaml"
    log:
        "logs/icm/{scale}/clusters_{experiment}.log",
    shell:
        "python -m papers.icm.figures clusters --config {input.config:q} "
        "--out figures/icm/{wildcards.scale:q}/clusters_{wildcards.experiment:q} "
        "--stamp {params.stamp:q} > {log:q} 2>&1"


rule reproduce_icm:
    input:
        icm_targets(),
        [f"figures/icm/{SCALE}/noise_{experiment}.png" for experiment in icm_experiments()],
        # one grid per data set: the uniform-CL experiment of each (the settings share its images)
        [f"figures/icm/{SCALE}/clusters_{experiment}.png" for experiment in icm_experiments()
         if experiment.endswith("_uniform")],
