# Helper functions of the MixPro rules (papers/mixpro/workflow.smk).
from common.report import SCALE_NOTES


def mixpro_runs(experiment):
    return [run for run in grid.runs("mixpro", SCALE, SEEDS)
            if run.experiment == experiment and run.method == "mixpro"]


def mixpro_experiments():
    return sorted({run.experiment for run in grid.runs("mixpro", SCALE, SEEDS) if run.method == "mixpro"})


def mixpro_pal_inputs(wildcards):
    return [run.metrics for run in mixpro_runs(wildcards.experiment)]


def mixpro_pal_runs(wildcards):
    # a list: the shell line quotes each item ({params.runs:q}), one argument per run
    return [run.folder for run in mixpro_runs(wildcards.experiment)]


def mixpro_stamp(wildcards):
    return SCALE_NOTES[wildcards.scale]
