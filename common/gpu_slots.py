"""Give a job its GPUs: ``python -m common.gpu_slots --need N --pack K -- COMMAND ...``.

Snakemake limits how many jobs run at once but does not say which GPU each gets. This wrapper holds
``K`` slots per GPU as lock files (``fcntl.flock``, released by the kernel when the job ends or is killed,
so a crashed job never leaks a GPU), takes one slot on each of ``N`` GPUs (the least loaded first), sets
``CUDA_VISIBLE_DEVICES`` and runs the command. ``--pack K`` > 1 packs several small proxy runs on one GPU.

Which GPUs: when a scheduler already assigned devices (``CUDA_VISIBLE_DEVICES`` set, as SLURM does for a
job with ``--gpus``/``--gres``), only those are handed out; a SLURM job given exactly the GPUs it needs
runs with them as they are. Otherwise every GPU of the machine (``nvidia-smi -L``, or ``REPRO_NUM_GPUS``).

Where the locks live: on the node, never in the shared working directory (jobs on different nodes would
contend for the same files, and some shared file systems have no locks): ``$REPRO_GPU_SLOT_DIR`` or
``<tmp>/repro-gpu-slots-<uid>``, in a subfolder per SLURM job (inside a job the device ids are the job's
own; another job's ``0`` may be another card).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

SLOT_DIR_ENV = "REPRO_GPU_SLOT_DIR"
NUM_GPUS_ENV = "REPRO_NUM_GPUS"
SLURM_GPU_ENVS = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS")


class SlotError(Exception):
    """The job cannot get the GPUs it needs here; the message says why and what to change."""


def count_gpus() -> int:
    if os.environ.get(NUM_GPUS_ENV):
        return int(os.environ[NUM_GPUS_ENV])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
        return sum(line.startswith("GPU ") for line in out.stdout.splitlines())
    except (OSError, subprocess.TimeoutExpired):
        return 0


def assigned_devices(env: Mapping[str, str]) -> list[str] | None:
    """The devices a scheduler (or the user) already assigned, as CUDA_VISIBLE_DEVICES entries; None if none.

    ``CUDA_VISIBLE_DEVICES`` is what CUDA obeys, so it wins; SLURM sets it for every job given GPUs. The
    ``SLURM_*_GPUS`` ids are global node ids, wrong inside a job whose devices are cgroup-constrained
    (renumbered from 0), so they are used only to tell that a SLURM job had GPUs but no CUDA_VISIBLE_DEVICES.
    """
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"]
    return None


def default_slot_dir(env: Mapping[str, str]) -> Path:
    """Node-local lock folder, one per user, with a subfolder per SLURM job (``local`` outside SLURM)."""
    if env.get(SLOT_DIR_ENV):
        root = Path(env[SLOT_DIR_ENV])
    else:
        root = Path(tempfile.gettempdir()) / f"repro-gpu-slots-{os.getuid()}"
    scope = f"slurm-{env['SLURM_JOB_ID']}" if env.get("SLURM_JOB_ID") else "local"
    return root / scope


def device_pool(env: Mapping[str, str], need: int) -> list[str]:
    """The device ids this job may take `need` of, or SlotError naming the problem and the fix."""
    assigned = assigned_devices(env)
    in_slurm = bool(env.get("SLURM_JOB_ID"))
    if assigned is not None:
        if len(assigned) < need:
            where = f"SLURM job {env['SLURM_JOB_ID']}" if in_slurm else "this shell"
            raise SlotError(
                f"the job needs {need} GPU(s) but {where} was assigned {len(assigned)} "
                f"(CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r}); ask the scheduler for {need} GPU(s) "
                f"(the experiment config's resources.gpus sets what the slurm profile requests) or unset "
                f"CUDA_VISIBLE_DEVICES.")
        return assigned
    if in_slurm and not env.get(NUM_GPUS_ENV):
        # a SLURM job that was given no GPUs may still see the node's cards: taking them would collide with
        # the jobs they were given to
        given = next((f"{k}={env[k]}" for k in SLURM_GPU_ENVS if env.get(k)), None)
        why = (f"sets {given} but no CUDA_VISIBLE_DEVICES" if given
               else "was assigned no GPUs (no SLURM_JOB_GPUS, SLURM_STEP_GPUS or CUDA_VISIBLE_DEVICES)")
        raise SlotError(
            f"the job needs {need} GPU(s) but SLURM job {env['SLURM_JOB_ID']} {why}; submit it with GPUs "
            f"(the slurm profile requests resources.gpus of the experiment config) or set CUDA_VISIBLE_DEVICES "
            f"to the GPUs it may use.")
    gpus = count_gpus()
    if gpus < need:
        raise SlotError(f"the job needs {need} GPU(s) but this machine shows {gpus}; use the slurm profile "
                        f"or set {NUM_GPUS_ENV}.")
    return [str(gpu) for gpu in range(gpus)]


def _lock_name(device: str, slot: int) -> str:
    # device ids may be GPU/MIG UUIDs: keep the file name plain
    return f"gpu{re.sub(r'[^A-Za-z0-9_.-]', '_', device)}.slot{slot}.lock"


def try_acquire(slot_dir: Path, devices: list[str] | int, need: int, pack: int) -> tuple[list[str], list] | None:
    """Lock one free slot on each of `need` devices, or nothing; returns (device ids, open lock files).

    Args:
        slot_dir: folder of the lock files (created if missing).
        devices: the device ids to choose from (an int n stands for "0".."n-1").
        need: how many distinct devices the job needs.
        pack: slots per device (jobs that may share one).
    """
    if isinstance(devices, int):
        devices = [str(gpu) for gpu in range(devices)]
    slot_dir.mkdir(parents=True, exist_ok=True)
    free = {}
    for device in devices:
        free[device] = []
        for slot in range(pack):
            path = slot_dir / _lock_name(device, slot)
            handle = open(path, "w")  # noqa: SIM115  (held while the job runs)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                free[device].append(handle)
            except BlockingIOError:
                handle.close()
            except OSError as exc:  # e.g. ENOLCK: a file system without locks
                handle.close()
                raise SlotError(f"cannot lock {path} ({exc.strerror}); set {SLOT_DIR_ENV} to a folder on a "
                                f"node-local file system (e.g. /tmp).") from exc
    order = {device: i for i, device in enumerate(devices)}
    ranked = sorted((d for d in free if free[d]), key=lambda d: (-len(free[d]), order[d]))[:need]
    keep = []
    for device, handles in free.items():
        for i, handle in enumerate(handles):
            if device in ranked and i == 0:
                keep.append(handle)
            else:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
    if len(ranked) < need:
        for handle in keep:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        return None
    return sorted(ranked, key=order.__getitem__), keep


def run(command: list[str], env: Mapping[str, str] | None = None) -> int:
    """Run the job's command; a leading `python` is this interpreter (the workflow's: its shell lines' `python`
    is a shell function, which a child process such as this wrapper's command does not see)."""
    if command[0] == "python":
        command = [sys.executable, *command[1:]]
    try:
        return subprocess.call(command, env=env)
    except OSError as exc:
        raise SlotError(f"cannot start {command[0]!r} ({exc.strerror}); give the full path of the program.") from exc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.gpu_slots", description=__doc__.splitlines()[0])
    parser.add_argument("--need", type=int, required=True, help="GPUs the job needs (0: run it as it is)")
    parser.add_argument("--pack", type=int, default=1, help="jobs that may share one GPU")
    parser.add_argument("--slot-dir", default=None,
                        help=f"lock folder (default: ${SLOT_DIR_ENV}, else a per-user folder under the node's tmp)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    try:
        if args.need <= 0:
            return run(command)
        env = dict(os.environ)
        devices = device_pool(env, args.need)
        slot_dir = Path(args.slot_dir) if args.slot_dir else default_slot_dir(env)
        while (lease := try_acquire(slot_dir, devices, args.need, max(1, args.pack))) is None:
            time.sleep(2.0)
        ids, _locks = lease
        # a scheduler's assignment that is exactly what the job needs comes back unchanged: pass-through
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
        print(f"[gpu_slots] CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}", flush=True)
        return run(command, env)
    except SlotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
