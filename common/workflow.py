"""Helpers the Snakemake workflow calls: which papers, experiments, methods and seeds exist, and where runs go.

The grid comes from the papers' experiment configs (``papers/<paper>/configs/<scale>/*.yaml``: their
``methods`` and ``seeds``), never from the Snakefile. A run's folder is keyed by
(paper, scale, experiment, method, seed) and nothing else.
"""

from __future__ import annotations

import shlex
import sys
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


SEEDS_HELP = "give a count (seeds=3 runs seeds 0, 1, 2) or whole seeds >= 0 (seeds=0,4 or seeds=[0,4])"


def parse_seeds(seeds) -> list[int] | None:
    """--config seeds=3 (first three), seeds=0,1,4 or seeds=[0,1]; None keeps each config's own seeds.

    Snakemake hands over an int, a string, or a list of strings (``seeds=[0,1]``); anything that is not whole
    numbers >= 0 is one ReproError naming the value, before any job starts."""
    if seeds is None or seeds == "":
        return None
    if isinstance(seeds, bool):  # True is an int to Python; no one means one seed by it
        raise ReproError(f"--config seeds={seeds} is not a seed list: {SEEDS_HELP}.")
    if isinstance(seeds, int):
        if seeds < 0:
            raise ReproError(f"--config seeds={seeds} is a negative count: {SEEDS_HELP}.")
        return list(range(seeds))
    items = seeds.replace("[", "").replace("]", "").split(",") if isinstance(seeds, str) else list(seeds)
    chosen = []
    for item in items:
        text = str(item).strip()
        if text == "" and isinstance(seeds, str):
            continue
        if isinstance(item, bool) or not text.isdigit():  # isdigit: no sign, no decimal point
            raise ReproError(f"--config seeds={seeds}: {text!r} is not a seed; {SEEDS_HELP}.")
        chosen.append(int(text))
    return chosen


def parse_flag(value, key: str) -> bool:
    """A yes/no workflow option as users write it: true/false (the README's spelling, which Snakemake passes as a
    string), True/False (which it turns into booleans) or 1/0; anything else is a ReproError naming the key."""
    if isinstance(value, bool):
        return value
    spelled = str(value).strip()
    if spelled in ("true", "True", "1"):
        return True
    if spelled in ("false", "False", "0"):
        return False
    raise ReproError(f"--config {key}={value} is not a yes/no value: use {key}=true or {key}=false.")


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


# `accelerate launch` as a module of the running interpreter: no `accelerate` script or `python` needed on PATH
LAUNCHER = "accelerate.commands.launch"


def launch_command(paper: str, scale: str, experiment: str, pack: int = 1, root: Path = REPO_ROOT) -> list[str]:
    """`accelerate launch` with as many processes as the run asks GPUs for (one CPU process if none), as argv.

    Every program is the running interpreter (``sys.executable -m ...``): the one the workflow's shell line
    started, so a venv need not be activated. GPU runs go through `common.gpu_slots`, which picks free GPUs
    (``pack`` jobs may share one) and sets CUDA_VISIBLE_DEVICES; in a SLURM job it hands out only the GPUs the
    job was given."""
    gpus = resources(paper, scale, experiment, root)["gpus"]
    accelerate = [sys.executable, "-m", LAUNCHER]
    if gpus <= 0:
        return [*accelerate, "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no", "--cpu",
                "-m", "common.train"]
    multi = ["--multi_gpu"] if gpus > 1 else []
    return [sys.executable, "-m", "common.gpu_slots", "--need", str(gpus), "--pack", str(pack), "--",
            *accelerate, "--num_processes", str(gpus), "--num_machines", "1", "--dynamo_backend", "no", *multi,
            "-m", "common.train"]


def gpu_share(paper: str, scale: str, experiment: str, pack: int = 1, root: Path = REPO_ROOT) -> int:
    """Percent of a GPU one run holds: 100 per GPU, divided by how many jobs are packed on a GPU."""
    return resources(paper, scale, experiment, root)["gpus"] * 100 // max(1, pack)


def train_command(run: Run, pack: int = 1, root: Path = REPO_ROOT) -> list[str]:
    """The full command that trains one run of the grid (what the workflow's train rule executes)."""
    return [*launch_command(run.paper, run.scale, run.experiment, pack, root),
            "--config", str(config_path(run.paper, run.scale, run.experiment, root)), "--method", run.method,
            "--output", run.folder, "--on-config-change", "restart", f"seed={run.seed}"]


def main(argv=None) -> int:
    """``python -m common.workflow train --paper P --scale S --experiment E --method M --seed K [--pack N]``.

    The train rule calls this instead of spelling the command out, so the rule's params hold only the run's
    config hash: paths, packing and launcher details never make Snakemake retrain a finished run.

    Exit status: the launcher's 0 on success; 2 with one ``error:`` line naming the command and the fix when the
    launcher is missing or fails (the trainer's or the launcher's own messages come above it); 128 + N when a
    signal N stopped it (the run resumes from its checkpoint)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m common.workflow")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one run of the grid")
    for key in ("paper", "scale", "experiment", "method"):
        train.add_argument(f"--{key}", required=True)
    train.add_argument("--seed", type=int, required=True)
    train.add_argument("--pack", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        check_scale(args.scale)
        if not config_path(args.paper, args.scale, args.experiment).exists():
            known = experiments(args.paper, args.scale)
            raise ReproError(f"no experiment {args.experiment!r} for paper {args.paper!r} at scale {args.scale} "
                             f"(no {config_path(args.paper, args.scale, args.experiment)}); choose one of: "
                             f"{', '.join(known) or 'none'}.")
        command = train_command(Run(args.paper, args.scale, args.experiment, args.method, args.seed), args.pack)
        print("[workflow] " + shlex.join(command), flush=True)
        return _run_launcher(command)
    except ReproError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run_launcher(command: list[str]) -> int:
    """Run the training command as a child: its status becomes an exit code (see `main`) or a ReproError."""
    import importlib.util
    import signal
    import subprocess
    import threading

    shown = shlex.join(command)
    fix = (f"install the project into this interpreter ({sys.executable} -m pip install -e .) or start the "
           "workflow from the environment that has it (activate it, or run its bin/snakemake)")
    if importlib.util.find_spec(LAUNCHER.split(".")[0]) is None:
        raise ReproError(f"cannot launch training: {sys.executable} has no {LAUNCHER.split('.')[0]} package "
                         f"(command: {shown}); {fix}.")
    try:
        proc = subprocess.Popen(command)
    except OSError as exc:
        raise ReproError(f"cannot launch training: {command[0]}: {exc.strerror} (command: {shown}); {fix}.") from exc
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # as with exec, the trainer decides how to stop: Ctrl-C reaches it through the terminal's process group,
        # and a TERM sent to this process only (a scheduler's time limit) is passed on
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda signum, _frame: proc.send_signal(signum))
    try:
        code = proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if code < 0:
        print(f"error: training stopped by signal {signal.Signals(-code).name} (command: {shown}); run the "
              "workflow again to resume it from its last checkpoint.", file=sys.stderr)
        return 128 - code
    if code != 0:
        raise ReproError(f"the training command exited with status {code} (command: {shown}); the lines above say "
                         "why: the trainer's own `error:` line, or the launcher's traceback if it failed before "
                         "training started. Fix that and run the workflow again (the run resumes from its "
                         "checkpoint); to debug, run the command by hand.")
    return 0


def run_config_hash(paper: str, scale: str, experiment: str, method: str, seed: int, root: Path = REPO_ROOT) -> str:
    """Hash of one run's resolved config: the workflow retrains a run only when this changes.

    The trainer hashes its config with `train.world_size` set to the processes Accelerate started; here it is the
    count `launch_command` starts (one per GPU of `resources.gpus`, one CPU process without GPUs), so the two agree
    without launching anything. One process leaves the hash as it was before world sizes were recorded."""
    from common.config import config_hash, load_config, with_world_size

    cfg = load_config(config_path(paper, scale, experiment, root), [f"seed={seed}"], method_label=method)
    gpus = resources(paper, scale, experiment, root)["gpus"]
    processes = max(1, gpus)  # as launch_command: --num_processes gpus, or 1 on the CPU
    return config_hash(with_world_size(cfg, processes, f"resources.gpus={gpus} launches {processes} process(es)"))


if __name__ == "__main__":
    sys.exit(main())
