# Helper functions of the SMMix rules (papers/smmix/workflow.smk).
from common.report import SCALE_NOTES


def smmix_runs(experiment):
    return [run for run in grid.runs("smmix", SCALE, SEEDS)
            if run.experiment == experiment and run.method == "smmix"]


def smmix_experiments():
    return sorted({run.experiment for run in grid.runs("smmix", SCALE, SEEDS) if run.method == "smmix"})


def smmix_windows_input(wildcards):
    return smmix_runs(wildcards.experiment)[0].metrics


def smmix_windows_run(wildcards):
    return smmix_runs(wildcards.experiment)[0].folder


def smmix_stamp(wildcards):
    return SCALE_NOTES[wildcards.scale]
