"""Give a job its GPUs on a local machine: ``python -m common.gpu_slots --need N --pack K -- COMMAND ...``.

Snakemake limits how many jobs run at once but does not say which GPU each gets. This wrapper holds
``K`` slots per GPU as lock files (``fcntl.flock``, released by the kernel when the job ends or is killed,
so a crashed job never leaks a GPU), takes one slot on each of ``N`` GPUs (the least loaded first), sets
``CUDA_VISIBLE_DEVICES`` and runs the command. ``--pack K`` > 1 packs several small proxy runs on one GPU.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

SLOT_DIR_ENV = "REPRO_GPU_SLOT_DIR"
NUM_GPUS_ENV = "REPRO_NUM_GPUS"


def count_gpus() -> int:
    if os.environ.get(NUM_GPUS_ENV):
        return int(os.environ[NUM_GPUS_ENV])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
        return sum(line.startswith("GPU ") for line in out.stdout.splitlines())
    except (OSError, subprocess.TimeoutExpired):
        return 0


def try_acquire(slot_dir: Path, gpus: int, need: int, pack: int) -> tuple[list[int], list] | None:
    """Lock one free slot on each of `need` GPUs, or nothing; returns (gpu ids, open lock files)."""
    slot_dir.mkdir(parents=True, exist_ok=True)
    free = {}
    for gpu in range(gpus):
        free[gpu] = []
        for slot in range(pack):
            handle = open(slot_dir / f"gpu{gpu}.slot{slot}.lock", "w")  # noqa: SIM115  (held while the job runs)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                free[gpu].append(handle)
            except BlockingIOError:
                handle.close()
    ranked = sorted((g for g in free if free[g]), key=lambda g: (-len(free[g]), g))[:need]
    keep = []
    for gpu, handles in free.items():
        for i, handle in enumerate(handles):
            if gpu in ranked and i == 0:
                keep.append(handle)
            else:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
    if len(ranked) < need:
        for handle in keep:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        return None
    return sorted(ranked), keep


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.gpu_slots", description=__doc__.splitlines()[0])
    parser.add_argument("--need", type=int, required=True, help="GPUs the job needs (0: run it as it is)")
    parser.add_argument("--pack", type=int, default=1, help="jobs that may share one GPU")
    parser.add_argument("--slot-dir", default=os.environ.get(SLOT_DIR_ENV, ".snakemake/gpu-slots"))
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.need <= 0:
        return subprocess.call(command)
    gpus = count_gpus()
    if gpus < args.need:
        print(f"error: the job needs {args.need} GPU(s) but this machine shows {gpus}; use the slurm profile "
              f"or set {NUM_GPUS_ENV}.", file=sys.stderr)
        return 2
    while (lease := try_acquire(Path(args.slot_dir), gpus, args.need, max(1, args.pack))) is None:
        time.sleep(2.0)
    ids, _locks = lease
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, ids))}
    print(f"[gpu_slots] CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}", flush=True)
    return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main())
