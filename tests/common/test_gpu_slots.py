"""GPU slot leases: packed jobs spread over GPUs, never more than `pack` per GPU, freed when a job ends."""

import subprocess
import sys
import time


def start(tmp_path, need, pack, seconds):
    code = f"import os, time; print(os.environ.get('CUDA_VISIBLE_DEVICES')); time.sleep({seconds})"
    return subprocess.Popen(
        [sys.executable, "-m", "common.gpu_slots", "--need", str(need), "--pack", str(pack),
         "--slot-dir", str(tmp_path), "--", sys.executable, "-c", code],
        stdout=subprocess.PIPE, text=True, env={"REPRO_NUM_GPUS": "2", "PATH": "/usr/bin:/bin"},
    )


def visible(proc):
    out, _ = proc.communicate(timeout=60)
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
