"""The workflow on a real SLURM cluster (issue #12): every job through sbatch, resources from the experiment
config, a job killed with scancel mid-training resumes, and the tables equal those of a local run.

Needs the one-node cluster of ``scripts/local_slurm.sh start`` (partition ``local``) and
snakemake-executor-plugin-slurm (``pip install -e '.[slurm]'``); skips with the reason otherwise, or fails
instead when REPRO_REQUIRE_SLURM=1 (CI, which starts the cluster, sets it so a broken cluster cannot pass as
a skip). The jobs run in a copy of this checkout under tmp, so results, logs and .snakemake never land here.
"""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PARTITION = "local"  # scripts/local_slurm.sh's partition, named by profiles/slurm-local
PROFILE = "profiles/slurm-local"
TARGET = "reproduce_mixup"
EXPERIMENT = "cifar10_preactresnet18"
RUNS = {method: Path(f"results/mixup/smoke/{EXPERIMENT}/{method}/seed0") for method in ("erm", "mixup")}
CALL_TIMEOUT_S = 1800  # one snakemake call; a smoke train job takes about a minute on 2 quiet cores

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def slurm_unavailable() -> str | None:
    """Why the SLURM test cannot run here, or None when it can."""
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH: start the one-node cluster with `scripts/local_slurm.sh start` (as root)"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed: pip install -e '.[slurm]'"
    try:
        sinfo = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%T"], capture_output=True, text=True,
                               timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "sinfo got no answer from slurmctld in 30 s: is `scripts/local_slurm.sh start` running?"
    state = sinfo.stdout.strip()
    if sinfo.returncode != 0 or state not in {"idle", "mixed", "allocated", "completing"}:
        answer = state or sinfo.stderr.strip()
        return (f"SLURM partition {PARTITION!r} is not up (sinfo: {answer!r}): start the one-node cluster "
                "with `scripts/local_slurm.sh start`")
    return None


def copy_checkout(dest: Path) -> Path:
    """The checkout as it stands (tracked and untracked, not ignored files, the CIFAR sample in tests/data
    included) copied to dest: the workflow's results, logs and .snakemake go there, not into the checkout."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is listed but absent
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def snakemake_argv(*args) -> list[str]:
    return [sys.executable, "-m", "snakemake", *args]


def env_for(workdir: Path) -> dict:
    # jobs inherit this environment (sbatch --export=ALL): the copy's code first, unbuffered logs
    return {**os.environ, "PYTHONPATH": str(workdir), "PYTHONUNBUFFERED": "1"}


def run_snakemake(workdir: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_argv(*args), cwd=workdir, env=env_for(workdir), capture_output=True,
                          text=True, timeout=CALL_TIMEOUT_S, check=False)


def submitted_job_ids(output: str) -> list[str]:
    """SLURM job ids from snakemake's 'Job 3 has been submitted with SLURM jobid 12 (log: ...)' lines."""
    return re.findall(r"submitted with SLURM jobid (\d+)", output)


def squeue_rows(states: str = "all") -> list[dict]:
    """Jobs slurmctld knows (finished ones for MinJobAge): id, comment (rule and wildcards), CPUs, memory,
    time limit, state and working directory."""
    fields = ("id", "comment", "cpus", "mem", "limit", "state", "workdir")
    out = subprocess.run(["squeue", "-h", f"--states={states}", "-o", "%i|%k|%C|%m|%l|%T|%Z"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]


def mem_mb(text: str) -> int:
    """squeue's memory column ('8000M', '16G') in MB."""
    number, unit = re.fullmatch(r"(\d+)([KMGT]?)", text).groups()
    return int(number) * {"K": 1 / 1024, "M": 1, "": 1, "G": 1024, "T": 1024 ** 2}[unit]


def minutes(limit: str) -> int:
    """squeue's time limit ('1:00:00', '30:00', '1-02:00:00') in minutes."""
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    hours, mins, secs = ([0] * (3 - len(parts)) + parts)
    return int(days or 0) * 1440 + hours * 60 + mins + (secs > 0)


def scancel_leftovers(workdir: Path) -> None:
    """Cancel any job of this test still queued or running (a failed or timed-out call leaves them)."""
    live = [row["id"] for row in squeue_rows() if row["workdir"] == str(workdir)
            and row["state"] in {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED"}]
    if live:
        subprocess.run(["scancel", *live], check=False, timeout=60)


def running_train_job(workdir: Path, method: str) -> str | None:
    """SLURM id of the running train job of one run of the grid (its comment names rule and wildcards)."""
    for row in squeue_rows("RUNNING"):
        if (row["workdir"] == str(workdir) and row["comment"].startswith("rule_train")
                and row["comment"].endswith(f"_{EXPERIMENT}_{method}_0")):
            return row["id"]
    return None


def metrics_without_timing(run: Path) -> tuple[dict, list[dict]]:
    """metrics.json and log.jsonl of one run, less their wall-clock fields."""
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop("wall_time_s")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    for row in log:
        row.pop("epoch_time_s")
    return metrics, log


@pytest.fixture(scope="module")
def slurm_and_local(tmp_path_factory):
    """reproduce_mixup (smoke) through the local SLURM cluster, with the first train job to checkpoint
    cancelled by scancel and the workflow run again; then the same tables built locally from a copy of the
    same snapshot. Returns what the tests check."""
    reason = slurm_unavailable()
    if reason:
        if os.environ.get("REPRO_REQUIRE_SLURM") == "1":
            pytest.fail(f"REPRO_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("slurm")
    on_slurm = copy_checkout(base / "on_slurm")
    local = base / "local"
    shutil.copytree(on_slurm, local)  # both runs see one snapshot of the checkout
    started = time.time()
    first_log = base / "first_call.log"
    try:
        with open(first_log, "w") as log:
            proc = subprocess.Popen(snakemake_argv("--profile", PROFILE, TARGET), cwd=on_slurm,
                                    env=env_for(on_slurm), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        cancelled = cancelled_job = None
        try:
            deadline = time.time() + CALL_TIMEOUT_S
            while cancelled is None and proc.poll() is None and time.time() < deadline:
                for method, run in RUNS.items():
                    # the first epoch's checkpoint is written, the run is not finished: cancel it now
                    folder = on_slurm / run
                    if (folder / "checkpoint/last.pt").exists() and not (folder / "metrics.json").exists():
                        cancelled_job = running_train_job(on_slurm, method)
                        if cancelled_job is not None:
                            subprocess.run(["scancel", cancelled_job], check=True, timeout=60)
                            cancelled = method
                            break
                time.sleep(0.2)
            first_rc = proc.wait(timeout=max(60.0, deadline - time.time()))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
        first = first_log.read_text()
        assert cancelled is not None, "no train job was seen running with a checkpoint:\n" + first[-3000:]
        cancelled_run = on_slurm / RUNS[cancelled]
        # what the cancel left behind, before the second call resumes from it
        after_cancel = {"metrics": (cancelled_run / "metrics.json").exists(),
                        "checkpoint": (cancelled_run / "checkpoint/last.pt").exists(),
                        "epochs_logged": len((cancelled_run / "log.jsonl").read_text().splitlines())}
        second = run_snakemake(on_slurm, "--profile", PROFILE, TARGET)
        slurm_s = time.time() - started
        # every job of both calls as slurmctld saw it (kept now: a restarted cluster forgets them)
        jobs = [row for row in squeue_rows() if row["workdir"] == str(on_slurm)]
    finally:
        scancel_leftovers(on_slurm)
    tables = sorted(p.name for p in (on_slurm / "reports/mixup/smoke").glob("*.csv"))
    started = time.time()
    local_call = run_snakemake(local, "-c2", *[f"reports/mixup/smoke/{name}" for name in tables])
    local_s = time.time() - started
    print(f"\n[slurm test] SLURM calls {slurm_s:.0f} s, local run {local_s:.0f} s")
    return {"on_slurm": on_slurm, "local": local, "first": first, "first_rc": first_rc, "second": second,
            "local_call": local_call, "cancelled": cancelled, "cancelled_job": cancelled_job,
            "after_cancel": after_cancel, "tables": tables, "jobs": jobs}


def test_every_job_goes_through_sbatch_and_the_workflow_finishes(slurm_and_local):
    first, second = slurm_and_local["first"], slurm_and_local["second"]
    assert second.returncode == 0, second.stderr[-3000:]
    for output in (first, second.stdout + second.stderr):
        rules = re.findall(r"^rule (\w+):", output, flags=re.MULTILINE)  # non-local jobs
        assert rules and len(submitted_job_ids(output)) == len(rules), output[-3000:]
    submitted_rules = {row["comment"].split("_wildcards_")[0] for row in slurm_and_local["jobs"]}
    assert {"rule_train", "rule_table", "rule_curves", "rule_mixed_examples"} <= submitted_rules
    for name in ("reports/mixup/smoke/cifar10_demo.csv", "figures/mixup/smoke/mixed_examples.png",
                 f"figures/mixup/smoke/curves_{EXPERIMENT}.png"):
        assert (slurm_and_local["on_slurm"] / name).exists(), name


def test_train_jobs_ask_slurm_for_the_experiment_configs_resources(slurm_and_local):
    from common import workflow as grid

    on_slurm = slurm_and_local["on_slurm"]
    wanted = grid.resources("mixup", "smoke", EXPERIMENT, root=on_slurm)
    trains = [row for row in slurm_and_local["jobs"] if row["comment"].startswith("rule_train")]
    # both runs, and the cancelled one twice (cancelled, then resumed)
    assert len(trains) == 3, trains
    for row in trains:
        assert (int(row["cpus"]), mem_mb(row["mem"]), minutes(row["limit"])) == (
            wanted["cpus"], wanted["mem_mb"], wanted["runtime"]), row
    # the profile's defaults (what table jobs get) differ, so the numbers above cannot come from them
    assert (wanted["cpus"], wanted["mem_mb"], wanted["runtime"]) != (1, 2000, 30)
    tables = [row for row in slurm_and_local["jobs"] if row["comment"].startswith("rule_table")]
    assert tables
    for row in tables:
        assert (int(row["cpus"]), mem_mb(row["mem"]), minutes(row["limit"])) == (1, 2000, 30), row


def test_a_job_cancelled_mid_training_resumes_on_the_next_call(slurm_and_local):
    first, after = slurm_and_local["first"], slurm_and_local["after_cancel"]
    assert slurm_and_local["first_rc"] != 0, first[-3000:]  # snakemake reports the cancelled job as failed
    assert "CANCELLED" in first, first[-3000:]
    states = {row["id"]: row["state"] for row in slurm_and_local["jobs"]}
    assert states[slurm_and_local["cancelled_job"]] == "CANCELLED", states
    assert after["checkpoint"] and not after["metrics"], after
    assert 1 <= after["epochs_logged"] < 3, after  # stopped mid-training (the smoke run has 3 epochs)
    run = RUNS[slurm_and_local["cancelled"]]
    train_log = (slurm_and_local["on_slurm"] / "logs/train" / "mixup/smoke" / EXPERIMENT
                 / f"{slurm_and_local['cancelled']}/seed0.log").read_text()
    assert re.search(r"resuming .* from epoch [12] ", train_log), train_log[-3000:]
    # the resumed run ends exactly where the local, uninterrupted run does (epochs logged once each)
    assert slurm_and_local["local_call"].returncode == 0, slurm_and_local["local_call"].stderr[-3000:]
    resumed = metrics_without_timing(slurm_and_local["on_slurm"] / run)
    uninterrupted = metrics_without_timing(slurm_and_local["local"] / run)
    assert [row["epoch"] for row in resumed[1]] == [1, 2, 3]
    assert resumed == uninterrupted


def test_tables_equal_those_of_a_local_run(slurm_and_local):
    assert slurm_and_local["local_call"].returncode == 0, slurm_and_local["local_call"].stderr[-3000:]
    assert {"cifar10_demo.csv", "table1_cifar.csv"} <= set(slurm_and_local["tables"])
    for name in slurm_and_local["tables"]:
        on_slurm = (slurm_and_local["on_slurm"] / "reports/mixup/smoke" / name).read_text()
        local = (slurm_and_local["local"] / "reports/mixup/smoke" / name).read_text()
        assert on_slurm == local, name
    for run in RUNS.values():
        assert metrics_without_timing(slurm_and_local["on_slurm"] / run) == metrics_without_timing(
            slurm_and_local["local"] / run), run
