# Helper functions of the RankMixup rules (papers/rankmixup/workflow.smk).
import os

from common.report import SCALE_NOTES


def rankmixup_runs(experiment):
    """Every run (all methods and seeds) of one experiment; only existing ones when train=false."""
    runs = [run for run in grid.runs("rankmixup", SCALE, SEEDS) if run.experiment == experiment]
    return [run for run in runs if TRAIN or os.path.exists(run.metrics)]


def rankmixup_experiments():
    return grid.experiments("rankmixup", SCALE)


def rankmixup_reliability_inputs(wildcards):
    return [run.metrics for run in rankmixup_runs(wildcards.experiment)]


def rankmixup_reliability_runs(wildcards):
    # a list: the shell line quotes each item ({params.runs:q}), one argument per run
    return [run.folder for run in rankmixup_runs(wildcards.experiment)]


def rankmixup_stamp(wildcards):
    return SCALE_NOTES[wildcards.scale]
