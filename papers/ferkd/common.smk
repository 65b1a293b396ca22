# Helper functions of the FerKD rules (papers/ferkd/workflow.smk): the label-set config of the scale, its shards,
# and the inputs of the figures.
import hashlib
import json
import os

from common.report import SCALE_NOTES


def ferkd_labelset_file(scale):
    # anchored at the checkout: the workflow may run in another working directory (snakemake -d)
    return f"{workflow.basedir}/papers/ferkd/labelsets/{scale}.yaml"


def ferkd_labelset(scale):
    from papers.ferkd.regions import load_labelset_config

    return load_labelset_config(ferkd_labelset_file(scale))


def _present(path):
    # with train=false, only what exists: a figure then explains what is missing instead of starting jobs
    return TRAIN or os.path.exists(path)


def ferkd_labels_dir(scale):
    return ferkd_labelset(scale).out_dir


def ferkd_teacher_manifest(scale):
    return f"{ferkd_labels_dir(scale)}/teacher/manifest.json"


def ferkd_adapted_manifest(scale, name):
    return f"{ferkd_labels_dir(scale)}/adapted/{name}/manifest.json"


def ferkd_shard_files(wildcards):
    cfg = ferkd_labelset(wildcards.scale)
    return [f"{cfg.out_dir}/teacher/shard_{k:05d}.npz" for k in range(cfg.shards)]


def ferkd_teacher_input(wildcards):
    """The teacher run's metrics.json when the pipeline trains the teacher (source: teacher, teacher.run)."""
    cfg = ferkd_labelset(wildcards.scale)
    if cfg.source != "teacher" or not cfg.teacher.run:
        return []
    metrics = f"{cfg.teacher.run}/metrics.json"
    return [metrics] if _present(metrics) else []


def ferkd_labelset_digest(wildcards):
    """What the teacher labels depend on (the adapted: and figure entries do not): a change relabels every shard."""
    from dataclasses import asdict

    cfg = asdict(ferkd_labelset(wildcards.scale))
    for key in ("adapted", "main_adapted", "resources", "num_workers", "batch_images", "batch_regions"):
        cfg.pop(key)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def ferkd_adapt_digest(wildcards):
    options = ferkd_labelset(wildcards.scale).adapted.get(wildcards.labelset)
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]


def ferkd_shard_verb(wildcards):
    """`generate` (the teacher labels the regions) or `import` (the published per-image files)."""
    return "generate" if ferkd_labelset(wildcards.scale).source == "teacher" else "import"


def _labelset_resource(wildcards, key, default):
    return ferkd_labelset(wildcards.scale).resources.get(key, default)


def ferkd_shard_gpus(wildcards):
    cfg = ferkd_labelset(wildcards.scale)
    return int(cfg.resources.get("gpus", 0)) if cfg.source == "teacher" else 0


def ferkd_shard_cpus(wildcards):
    return int(_labelset_resource(wildcards, "cpus", 2))


def ferkd_shard_mem_mb(wildcards):
    return int(_labelset_resource(wildcards, "mem_mb", 8000))


def ferkd_shard_runtime(wildcards):
    return int(_labelset_resource(wildcards, "runtime_min", 60))


def ferkd_adapted_names(scale):
    return sorted(ferkd_labelset(scale).adapted)


def ferkd_regions_inputs(wildcards):
    cfg = ferkd_labelset(wildcards.scale)
    files = [ferkd_teacher_manifest(wildcards.scale)]
    if cfg.main_adapted:
        files.append(ferkd_adapted_manifest(wildcards.scale, cfg.main_adapted))
    return [f for f in files if _present(f)]


def ferkd_groups_inputs(wildcards):
    files = [ferkd_adapted_manifest(wildcards.scale, name) for name in ferkd_adapted_names(wildcards.scale)]
    return [f for f in files if _present(f)]


def ferkd_convergence_runs(experiment):
    """The main experiment's FKD and FerKD runs (every method whose label says fkd or ferkd)."""
    runs = [run for run in grid.runs("ferkd", SCALE, SEEDS) if run.experiment == experiment
            and run.method.startswith(("fkd", "ferkd"))]
    return [run for run in runs if TRAIN or os.path.exists(run.metrics)]


def ferkd_convergence_inputs(wildcards):
    return [run.metrics for run in ferkd_convergence_runs(wildcards.experiment)]


def ferkd_convergence_arg(wildcards):
    # a list: the shell line quotes each item ({params.runs:q}), one argument per run
    return [f"{run.method}={run.folder}" for run in ferkd_convergence_runs(wildcards.experiment)]


def ferkd_main_experiments():
    """Experiments that run FKD and a FerKD arm side by side (the convergence figure compares them)."""
    found = []
    for experiment in grid.experiments("ferkd", SCALE):
        methods = {run.method for run in grid.runs("ferkd", SCALE) if run.experiment == experiment}
        if "fkd" in methods and any(m.startswith("ferkd") for m in methods):
            found.append(experiment)
    return found


def ferkd_stamp(wildcards):
    return SCALE_NOTES[wildcards.scale]
