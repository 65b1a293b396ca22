"""GPU slot leases: packed jobs spread over GPUs, never more than `pack` per GPU, freed when a job ends; GPUs a
scheduler assigned (SLURM, CUDA_VISIBLE_DEVICES) are the only ones handed out; locks stay node-local."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import gpu_slots

REPO = Path(__file__).resolve().parents[2]


def start(tmp_path, need, pack, seconds, env=None, slot_dir=True, cwd=None):
    """Start `python -m common.gpu_slots` around a child that prints its CUDA_VISIBLE_DEVICES and sleeps."""
    code = f"import os, time; print(os.environ.get('CUDA_VISIBLE_DEVICES')); time.sleep({seconds})"
    where = ["--slot-dir", str(tmp_path)] if slot_dir else []
    return subprocess.Popen(
        [sys.executable, "-m", "common.gpu_slots", "--need", str(need), "--pack", str(pack), *where,
         "--", sys.executable, "-c", code],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
        env={"REPRO_NUM_GPUS": "2", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **(env or {})},
    )


def visible(proc):
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return next(line for line in out.splitlines() if not line.startswith("[gpu_slots]"))


def test_packed_jobs_fill_each_gpu_up_to_pack_then_wait(tmp_path):
    first = [start(tmp_path, 1, 2, 3.0) for _ in range(4)]
    time.sleep(1.5)
    fifth = start(tmp_path, 1, 2, 0.0)
    t0 = time.time()
    assignments = sorted(visible(p) for p in first)
    assert assignments == ["0", "0", "1", "1"]
    assert visible(fifth) in ("0", "1")
    assert time.time() - t0 > 0.5  # the fifth job waited for a slot


def test_a_two_gpu_job_gets_two_distinct_gpus_and_cpu_jobs_run_directly(tmp_path):
    assert visible(start(tmp_path, 2, 1, 0.0)) == "0,1"
    assert visible(start(tmp_path, 0, 1, 0.0)) == "None"


def test_a_slurm_job_runs_on_the_gpus_slurm_assigned_without_locks_in_the_working_directory(tmp_path):
    # no REPRO_NUM_GPUS and no nvidia-smi here: only the scheduler's assignment can make this job start
    (tmp_path / "node-tmp").mkdir()
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_GPUS": "5,7", "CUDA_VISIBLE_DEVICES": "5,7",
             "REPRO_NUM_GPUS": "", "TMPDIR": str(tmp_path / "node-tmp")}
    assert visible(start(tmp_path, 2, 1, 0.0, env=slurm, slot_dir=False, cwd=tmp_path)) == "5,7"
    assert not (tmp_path / ".snakemake").exists()  # nothing on the shared file system
    locks = sorted(p.name for p in (tmp_path / "node-tmp" / f"repro-gpu-slots-{os.getuid()}" / "slurm-4242").iterdir())
    assert locks == ["gpu5.slot0.lock", "gpu7.slot0.lock"]


def test_jobs_sharing_an_allocation_split_its_gpus_never_the_machine_s_other_ones(tmp_path):
    # an salloc with GPUs 3 and 6 of an 8-GPU node, two one-GPU jobs at once: one each, never GPU 0 or 1
    alloc = {"SLURM_JOB_ID": "77", "CUDA_VISIBLE_DEVICES": "3,6", "REPRO_NUM_GPUS": "8"}
    jobs = [start(tmp_path, 1, 1, 2.0, env=alloc) for _ in range(2)]
    assert sorted(visible(p) for p in jobs) == ["3", "6"]
    uuids = {"CUDA_VISIBLE_DEVICES": "GPU-1a2b,GPU-3c4d"}  # device UUIDs are valid ids too
    assert visible(start(tmp_path, 1, 1, 0.0, env=uuids)) == "GPU-1a2b"


def test_too_few_assigned_gpus_and_a_gpuless_slurm_job_are_one_line_errors(tmp_path):
    short = start(tmp_path, 2, 1, 0.0, env={"SLURM_JOB_ID": "9", "CUDA_VISIBLE_DEVICES": "0"})
    out, err = short.communicate(timeout=60)
    assert short.returncode == 2 and out == ""  # the command never ran
    assert err.count("\n") == 1 and err.startswith("error: the job needs 2 GPU(s) but SLURM job 9 was assigned 1")
    # SLURM gave this job no GPUs: the node's cards (REPRO_NUM_GPUS unset, nvidia-smi or not) belong to others
    bare = start(tmp_path, 1, 1, 0.0, env={"SLURM_JOB_ID": "9", "REPRO_NUM_GPUS": ""})
    out, err = bare.communicate(timeout=60)
    assert bare.returncode == 2 and out == ""
    assert err.count("\n") == 1 and "SLURM job 9 was assigned no GPUs" in err


def test_default_lock_folder_is_node_local_per_user_and_per_slurm_job(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_slots.tempfile, "gettempdir", lambda: str(tmp_path))
    user = tmp_path / f"repro-gpu-slots-{os.getuid()}"
    assert gpu_slots.default_slot_dir({}) == user / "local"
    assert gpu_slots.default_slot_dir({"SLURM_JOB_ID": "12"}) == user / "slurm-12"
    assert gpu_slots.default_slot_dir({"REPRO_GPU_SLOT_DIR": "/scratch/me", "SLURM_JOB_ID": "12"}) == Path(
        "/scratch/me/slurm-12")


def test_a_file_system_without_locks_is_an_error_naming_the_fix(tmp_path, monkeypatch):
    def no_locks(handle, flags):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(gpu_slots.fcntl, "flock", no_locks)
    with pytest.raises(gpu_slots.SlotError, match="REPRO_GPU_SLOT_DIR"):
        gpu_slots.try_acquire(tmp_path, ["0"], 1, 1)


def test_a_python_command_runs_under_the_wrappers_own_interpreter_without_python_on_path(tmp_path):
    # the workflow's shell lines give `python ... -- python -m ...`: the inner `python` must not come from PATH
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "common.gpu_slots", "--need", "1", "--slot-dir", str(tmp_path), "--",
         "python", "-c", "import sys; print(sys.executable)"],
        capture_output=True, text=True, timeout=60, check=False,
        env={"REPRO_NUM_GPUS": "1", "PATH": str(empty), "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == sys.executable
