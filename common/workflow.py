"""Helpers the Snakemake workflow calls: which papers, experiments, methods and seeds exist, and where runs go.

The grid comes from the papers' experiment configs (``papers/<paper>/configs/<scale>/*.yaml``: their
``methods`` and ``seeds``), never from the Snakefile. A run's folder is keyed by
(paper, scale, experiment, method, seed) and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from common.errors import ReproError

REPO_ROOT = Path(__file__).resolve().parents[1]
SCALES = ("smoke", "proxy", "paper")


@dataclass(frozen=True)
class Run:
    paper: str
    scale: str
    experiment: str
    method: str
    seed: int

    @property
    def folder(self) -> str:
        return f"results/{self.paper}/{self.scale}/{self.experiment}/{self.method}/seed{self.seed}"

    @property
    def metrics(self) -> str:
        return f"{self.folder}/metrics.json"


def papers(root: Path = REPO_ROOT) -> list[str]:
    """Every paper subpackage that has a workflow."""
    return sorted(p.parent.name for p in (root / "papers").glob("*/workflow.smk"))


def config_path(paper: str, scale: str, experiment: str, root: Path = REPO_ROOT) -> Path:
    return root / "papers" / paper / "configs" / scale / f"{experiment}.yaml"


def experiments(paper: str, scale: str, root: Path = REPO_ROOT) -> list[str]:
    check_scale(scale)
    return sorted(p.stem for p in (root / "papers" / paper / "configs" / scale).glob("*.yaml"))


def check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ReproError(f"scale must be one of {', '.join(SCALES)}, got {scale!r} (use --config scale=proxy).")


def load_experiment(paper: str, scale: str, experiment: str, root: Path = REPO_ROOT) -> dict:
    return yaml.safe_load(config_path(paper, scale, experiment, root).read_text()) or {}


def parse_seeds(seeds) -> list[int] | None:
    """--config seeds=3 (first three), seeds=0,1,4 or seeds=[0,1]; None keeps each config's own seeds."""
    if seeds is None or seeds == "":
        return None
    if isinstance(seeds, int):
        return list(range(seeds))
    if isinstance(seeds, str):
        return [int(s) for s in seeds.replace("[", "").replace("]", "").split(",") if s.strip()]
    return [int(s) for s in seeds]


def runs(paper: str, scale: str, seeds=None, root: Path = REPO_ROOT) -> list[Run]:
    """The (experiment, method, seed) grid of one paper at one scale."""
    chosen = parse_seeds(seeds)
    grid = []
    for experiment in experiments(paper, scale, root):
        cfg = load_experiment(paper, scale, experiment, root)
        for method in cfg.get("methods") or {}:
            for seed in chosen if chosen is not None else cfg.get("seeds", [0]):
                grid.append(Run(paper, scale, experiment, method, int(seed)))
    return grid


def resources(paper: str, scale: str, experiment: str, root: Path = REPO_ROOT) -> dict:
    """Resources one run of an experiment asks for (its config's `resources` section, defaults filled)."""
    from common.config import ResourcesConfig, build_dataclass

    raw = load_experiment(paper, scale, experiment, root).get("resources") or {}
    res = build_dataclass(ResourcesConfig, raw, prefix="resources.")
    return {"gpus": res.gpus, "cpus": res.cpus, "mem_mb": res.mem_mb, "runtime": res.runtime_min}


def launch_command(paper: str, scale: str, experiment: str, pack: int = 1, root: Path = REPO_ROOT) -> str:
    """`accelerate launch` with as many processes as the run asks GPUs for (one CPU process if none).

    GPU runs go through `common.gpu_slots`, which picks free GPUs (``pack`` jobs may share one) and sets
    CUDA_VISIBLE_DEVICES; on a SLURM node it simply sees the GPUs the job was given."""
    gpus = resources(paper, scale, experiment, root)["gpus"]
    if gpus <= 0:
        return "accelerate launch --num_processes 1 --num_machines 1 --dynamo_backend no --cpu -m common.train"
    multi = " --multi_gpu" if gpus > 1 else ""
    return (f"python -m common.gpu_slots --need {gpus} --pack {pack} -- accelerate launch --num_processes {gpus} "
            f"--num_machines 1 --dynamo_backend no{multi} -m common.train")


def gpu_share(paper: str, scale: str, experiment: str, pack: int = 1, root: Path = REPO_ROOT) -> int:
    """Percent of a GPU one run holds: 100 per GPU, divided by how many jobs are packed on a GPU."""
    return resources(paper, scale, experiment, root)["gpus"] * 100 // max(1, pack)


def train_command(run: Run, pack: int = 1, root: Path = REPO_ROOT) -> list[str]:
    """The full command that trains one run of the grid (what the workflow's train rule executes)."""
    return [*launch_command(run.paper, run.scale, run.experiment, pack, root).split(),
            "--config", str(config_path(run.paper, run.scale, run.experiment, root)), "--method", run.method,
            "--output", run.folder, "--on-config-change", "restart", f"seed={run.seed}"]


def main(argv=None) -> int:
    """``python -m common.workflow train --paper P --scale S --experiment E --method M --seed K [--pack N]``.

    The train rule calls this instead of spelling the command out, so the rule's params hold only the run's
    config hash: paths, packing and launcher details never make Snakemake retrain a finished run."""
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="python -m common.workflow")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one run of the grid")
    for key in ("paper", "scale", "experiment", "method"):
        train.add_argument(f"--{key}", required=True)
    train.add_argument("--seed", type=int, required=True)
    train.add_argument("--pack", type=int, default=1)
    args = parser.parse_args(argv)
    command = train_command(Run(args.paper, args.scale, args.experiment, args.method, args.seed), args.pack)
    print("[workflow] " + " ".join(command), flush=True)
    os.execvp(command[0], command)
    return 0  # not reached


def run_config_hash(paper: str, scale: str, experiment: str, method: str, seed: int, root: Path = REPO_ROOT) -> str:
    """Hash of one run's resolved config: the workflow retrains a run only when this changes."""
    from common.config import config_hash, load_config

    cfg = load_config(config_path(paper, scale, experiment, root), [f"seed={seed}"], method_label=method)
    return config_hash(cfg)


if __name__ == "__main__":
    import sys

    sys.exit(main())
