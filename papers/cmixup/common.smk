# Helper functions of the C-Mixup rules (papers/cmixup/workflow.smk).
CMIXUP_STAMPS = {
    "smoke": "smoke scale: committed samples of each dataset, 1-3 epochs, 1 seed, CPU; numbers meaningless, only the "
    "pipeline is tested",
    "proxy": "proxy scale = each dataset's official recipe (src/config.py, main.sh), on a CPU",
    "paper": "paper scale: the official settings on every dataset we have",
}


def cmixup_paper_targets():
    """The shared tables of `paper_targets`, without the shared image-only figures (mixed_examples shows
    CIFAR images, curves plot top-1): for this tabular paper cmixup_fig_rmse and cmixup_fig_kernel replace them."""
    return [t for t in paper_targets("cmixup") if not os.path.basename(t).startswith(("mixed_examples.", "curves_"))]


def cmixup_experiments():
    return grid.experiments("cmixup", SCALE)


def cmixup_kernel_experiments():
    """The experiments with a C-Mixup method, whose bandwidth the kernel figure draws (airfoil_baselines has
    only k-Mixup and Local Mixup)."""
    kernel = ("cmixup", "cmixup_batch")  # papers/cmixup/figures.py KERNEL_METHODS
    return [e for e in cmixup_experiments() if any((m or {}).get("name") in kernel for m in
                                                 (grid.load_experiment("cmixup", SCALE, e).get("methods") or {}).values())]


def cmixup_experiment_runs(wildcards):
    return [run for run in grid.runs("cmixup", wildcards.scale, SEEDS) if run.experiment == wildcards.experiment]


def cmixup_rmse_inputs(wildcards):
    return grid_metrics("cmixup", {wildcards.experiment})


def cmixup_rmse_runs(wildcards):
    # a list: the shell line quotes each item ({params.runs:q}), one argument per run
    return [f"{run.method}={run.folder}" for run in cmixup_experiment_runs(wildcards)]


def cmixup_config(wildcards):
    return str(grid.config_path("cmixup", wildcards.scale, wildcards.experiment))


def cmixup_stamp(wildcards):
    return CMIXUP_STAMPS[wildcards.scale]
