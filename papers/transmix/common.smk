# Helper functions of the TransMix rules (papers/transmix/workflow.smk).
from common.report import SCALE_NOTES


def transmix_runs(experiment):
    return [run for run in grid.runs("transmix", SCALE, SEEDS)
            if run.experiment == experiment and run.method == "transmix"]


def transmix_experiments():
    return sorted({run.experiment for run in grid.runs("transmix", SCALE, SEEDS) if run.method == "transmix"})


def transmix_attention_input(wildcards):
    return transmix_runs(wildcards.experiment)[0].metrics


def transmix_attention_run(wildcards):
    return transmix_runs(wildcards.experiment)[0].folder


def transmix_weights_inputs(wildcards):
    return [run.metrics for run in transmix_runs(wildcards.experiment)]


def transmix_weights_runs(wildcards):
    # a list: the shell line quotes each item ({params.runs:q}), one argument per run
    return [run.folder for run in transmix_runs(wildcards.experiment)]


def transmix_stamp(wildcards):
    return SCALE_NOTES[wildcards.scale]
