# ICM: the shared rules train the runs and build the tables and the accuracy curves; these rules add the
# paper's figures (noise of the pairs beside the cluster purity; a grid of clusters). The shared mixed_examples
# figure is left out: a complementary-label batch has no class targets to draw.
ICM_STAMPS = {
    "smoke": "smoke scale: the committed 600-image Fashion-MNIST sample, 2 epochs, 1 seed, CPU; numbers meaningless",
    "proxy": "proxy scale: the official MLP recipe on Fashion-MNIST, 100 epochs (paper: 300), PCA clusters, CPU",
    "paper": "paper scale: the official recipe, 300 epochs, on every dataset supplied",
}


def icm_targets():
    return [t for t in paper_targets("icm") if not os.path.basename(t).startswith("mixed_examples.")]


def icm_experiments():
    return grid.experiments("icm", SCALE)


def icm_experiment_runs(wildcards):
    return [run for run in grid.runs("icm", wildcards.scale, SEEDS) if run.experiment == wildcards.experiment]


def icm_noise_inputs(wildcards):
    return grid_metrics("icm", {wildcards.experiment})


def icm_noise_runs(wildcards):
    # a list: the shell line quotes each item ({params.runs:q}), one argument per run
    return [f"{run.method}={run.folder}" for run in icm_experiment_runs(wildcards)]


def icm_config(wildcards):
    return str(grid.config_path("icm", wildcards.scale, wildcards.experiment))


def icm_batch_size(wildcards):
    return int((grid.load_experiment("icm", wildcards.scale, wildcards.experiment).get("train") or {})
               .get("batch_size", 512))


def icm_analytic_flag(wildcards):
    """--no-analytic unless the experiment has uniform CLs over balanced classes (the analytic rate's assumptions)."""
    options = ((grid.load_experiment("icm", wildcards.scale, wildcards.experiment).get("data") or {})
               .get("options") or {})
    balanced = options.get("cl", "uniform") == "uniform" and float(options.get("imb_factor", 1.0)) == 1.0
    return "" if balanced else "--no-analytic"


def icm_stamp(wildcards):
    return ICM_STAMPS[wildcards.scale]


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
