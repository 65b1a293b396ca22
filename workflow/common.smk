# Helper functions for the rules: grid expansion, paths and resources. The logic lives in
# common/workflow.py (importable and tested); these are thin, named wrappers Snakemake can call.
import functools
import glob
import os
import shlex
import sys

from common import workflow as grid
from common.report import paper_results

# `python` in every rule's shell line is the interpreter Snakemake runs under (sys.executable), through a
# shell function the prefix defines: the project's venv even when it is not activated, so no `python` need be
# on PATH (a cluster job re-runs Snakemake on its node, which defines it there). With --sdm conda the job's
# shell first activates the rule's env, whose packages only its own `python` sees, and with --sdm apptainer
# the host's interpreter does not exist in the container: there `python` stays the one on the job's PATH. A
# function rather than a {PYTHON} field keeps the rules lint-clean and a printed command runnable by hand;
# common.gpu_slots runs a `python` command it wraps under its own interpreter (a child sees no function).
_ISOLATED = {"CONDA", "APPTAINER"} & {m.name for m in workflow.deployment_settings.deployment_method}
_PYTHON_FUNCTION = "" if _ISOLATED else f'python() {{ {shlex.quote(sys.executable)} "$@"; }}; '
# every job (local, conda, cluster) imports `common` and `papers` from this checkout; paths quoted (they may
# hold spaces or quotes) and braces doubled (Snakemake formats the prefix too)
_PREFIX = (_PYTHON_FUNCTION
           + f'export PYTHONPATH={shlex.quote(workflow.basedir)}"${{PYTHONPATH:+:$PYTHONPATH}}"; ')
shell.prefix(_PREFIX.replace("{", "{{").replace("}", "}}"))

SCALE = config["scale"]
SEEDS = config.get("seeds") or None
grid.parse_seeds(SEEDS)  # a bad seed list fails here, once, before any rule is expanded
TRAIN = grid.parse_flag(config.get("train", True), "train")  # bool("false") would be True
PACK = int(config.get("pack", 1))
PAPERS = grid.papers()


wildcard_constraints:
    paper="[a-z0-9_]+",
    scale="smoke|proxy|paper",
    experiment="[A-Za-z0-9_.-]+",
    method="[A-Za-z0-9_.-]+",
    seed=r"\d+",


def paper_results_file(paper):
    return f"{workflow.basedir}/papers/{paper}/paper_results.yaml"


def grid_metrics(paper, experiments=None):
    """metrics.json of every run of a paper at the chosen scale (existing ones only when train=false)."""
    files = [run.metrics for run in grid.runs(paper, SCALE, SEEDS)
             if experiments is None or run.experiment in experiments]
    return files if TRAIN else [f for f in files if os.path.exists(f)]


def existing_run_metrics():
    return sorted(glob.glob("results/*/*/*/*/seed*/metrics.json"))


def table_ids(paper):
    return list(paper_results(paper).get("tables", {}))


def table_experiments(paper, table):
    spec = paper_results(paper)["tables"][table]
    return {row.get("experiment", spec.get("experiment")) for row in spec["rows"]} - {None}


def table_inputs(wildcards):
    return [paper_results_file(wildcards.paper),
            *grid_metrics(wildcards.paper, table_experiments(wildcards.paper, wildcards.table))]


def forest_inputs(wildcards):
    return [paper_results_file(wildcards.paper), *grid_metrics(wildcards.paper)]


def curves_inputs(wildcards):
    return grid_metrics(wildcards.paper, {wildcards.experiment})


def mixed_examples_inputs(wildcards):
    """What the mixed-examples figure reads: the paper's experiment configs at that scale (each method's
    options) and the committed CIFAR-10 sample whose test images it mixes (common.plots.plot_mixed_examples)."""
    from common.data import CIFAR10_MINI_DIR

    configs = [str(grid.config_path(wildcards.paper, wildcards.scale, experiment))
               for experiment in grid.experiments(wildcards.paper, wildcards.scale)]
    return configs + [str(CIFAR10_MINI_DIR / "test.parquet")]


def paper_targets(paper):
    """Every table and figure of one paper at the chosen scale."""
    targets = [f"reports/{paper}/{SCALE}/{table}.md" for table in table_ids(paper)]
    targets += [f"figures/{paper}/{SCALE}/curves_{experiment}.png"
                for experiment in grid.experiments(paper, SCALE)]
    if grid.experiments(paper, SCALE):
        targets.append(f"figures/{paper}/{SCALE}/mixed_examples.png")
    if SCALE != "smoke":  # smoke numbers mean nothing: no verdicts, no forest plot
        targets.append(f"figures/{paper}/{SCALE}/claims_forest.png")
    return targets


def train_config_hash(wildcards):
    # a param: Snakemake reruns a finished run only when its resolved config changes
    return grid.run_config_hash(wildcards.paper, wildcards.scale, wildcards.experiment,
                                wildcards.method, int(wildcards.seed))


@functools.lru_cache(maxsize=None)
def _method_inputs(paper, scale, experiment, method):
    from common.config import load_config
    from common.methods import build_method

    cfg = load_config(grid.config_path(paper, scale, experiment), method_label=method)
    return tuple(build_method(cfg.method, num_classes=2, label_smoothing=cfg.train.label_smoothing).inputs())


def train_inputs(wildcards):
    """Files the run's method declares it reads (`Method.inputs`). A finished run is not retrained because they
    are absent here (a fresh clone with committed results); when they exist and are newer, it is."""
    files = _method_inputs(wildcards.paper, wildcards.scale, wildcards.experiment, wildcards.method)
    metrics = grid.Run(wildcards.paper, wildcards.scale, wildcards.experiment, wildcards.method,
                       int(wildcards.seed)).metrics
    return list(files) if not os.path.exists(metrics) else [f for f in files if os.path.exists(f)]


def _resource(wildcards, key):
    return grid.resources(wildcards.paper, wildcards.scale, wildcards.experiment)[key]


def train_gpus(wildcards):
    return _resource(wildcards, "gpus")


def train_gpu_share(wildcards):
    return grid.gpu_share(wildcards.paper, wildcards.scale, wildcards.experiment, PACK)


def train_mem_mb(wildcards):
    return _resource(wildcards, "mem_mb")


def train_runtime(wildcards):
    return _resource(wildcards, "runtime")


def train_cpus(wildcards):
    return _resource(wildcards, "cpus")
