# Helper functions of the ICM rules (papers/icm/workflow.smk).
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
