# Helper functions of the ResizeMix rules (papers/resizemix/workflow.smk).
from common.report import SCALE_NOTES


def resizemix_figure_experiments():
    """Experiments of the chosen scale whose grid trains ResizeMix, one per distinct method grid (the figures
    depend only on the grid: e.g. the 200- and 400-epoch proxy experiments share theirs)."""
    found, seen = [], set()
    for experiment in grid.experiments("resizemix", SCALE):
        methods = grid.load_experiment("resizemix", SCALE, experiment).get("methods") or {}
        key = repr(sorted(methods.items()))
        trains_resizemix = any((options or {}).get("name", label) == "resizemix" for label, options in methods.items())
        if trains_resizemix and key not in seen:
            seen.add(key)
            found.append(experiment)
    return found


def resizemix_figure_targets():
    return [f"figures/resizemix/{SCALE}/{kind}_{experiment}.png"
            for kind in ("pairs", "weights") for experiment in resizemix_figure_experiments()]


def resizemix_config(wildcards):
    # the figures depend only on the experiment's method grid, so its config is the input
    return str(grid.config_path("resizemix", wildcards.scale, wildcards.experiment))


def resizemix_stamp(wildcards):
    return SCALE_NOTES[wildcards.scale]
