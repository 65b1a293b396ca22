"""Workflow: dry runs of every target, a smoke reproduction, resume under Snakemake, tables from fake runs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import workflow as grid
from common.report import build_table, write_index, write_table

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]


def snakemake(workdir, *args, timeout=900):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*SNAKEMAKE, "-d", str(workdir), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def test_every_paper_has_configs_results_and_a_target():
    assert {"mixup", "cutmix", "transmix"} <= set(grid.papers())
    for paper in grid.papers():
        assert (REPO / "papers" / paper / "paper_results.yaml").exists()
        assert grid.runs(paper, "smoke"), paper


@pytest.mark.parametrize("scale", ["smoke", "proxy", "paper"])
def test_dry_run_of_every_reproduce_target(tmp_path, scale):
    targets = [f"reproduce_{paper}" for paper in grid.papers()] + ["reproduce_all"]
    res = snakemake(tmp_path, "-n", *targets, "--config", f"scale={scale}")
    assert res.returncode == 0, res.stderr + res.stdout
    expected = sum(len(grid.runs(paper, scale)) for paper in grid.papers())
    assert f"train{' ' * 1}" in res.stdout
    stats = res.stdout[res.stdout.rindex("Job stats"):]
    train_line = next(line for line in stats.splitlines() if line.startswith("train "))
    assert int(train_line.split()[-1]) == expected


def test_seeds_and_bad_config_are_handled(tmp_path):
    res = snakemake(tmp_path, "-n", "reproduce_mixup", "--config", "scale=proxy", "seeds=2")
    assert res.returncode == 0, res.stderr
    assert "seed1/metrics.json" in res.stdout and "seed2/metrics.json" not in res.stdout
    bad = snakemake(tmp_path, "-n", "reproduce_mixup", "--config", "scale=huge")
    assert bad.returncode != 0 and "huge" in (bad.stderr + bad.stdout)


def test_lint_and_report_dry_run(tmp_path):
    lint = subprocess.run([*SNAKEMAKE, "--lint"], capture_output=True, text=True, cwd=REPO, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    res = snakemake(tmp_path, "-n", "report")
    assert res.returncode == 0, res.stderr


def fake_run(results, paper, scale, experiment, method, seed, top1, best=None):
    folder = results / paper / scale / experiment / method / f"seed{seed}"
    folder.mkdir(parents=True)
    metrics = {"task": "classification", "primary_metric": "top1", "final": {"top1": top1},
               "best": {"top1": best if best is not None else top1}, "median_last10_top1": top1,
               "dataset": "cifar10", "model": "preact_resnet18_cifar", "epochs": 200}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "provenance.json").write_text(json.dumps({"wall_time_s": 3600, "device_type": "cuda",
                                                        "device_count": 1}))


def test_table_from_fake_runs_shows_missing_as_missing(tmp_path):
    results = tmp_path / "results"
    fake_run(results, "mixup", "proxy", "cifar10_preactresnet18", "erm", 0, 94.0)
    fake_run(results, "mixup", "proxy", "cifar10_preactresnet18", "erm", 1, 95.0)
    fake_run(results, "mixup", "proxy", "cifar10_preactresnet18", "mixup", 0, 96.0)
    _, _, rows = build_table("mixup", "proxy", "cifar10_demo", results)
    erm, mixup = rows
    assert erm["ours"] == "5.50 ± 0.71" and erm["n"] == "2/3"  # error = 100 - top1
    assert mixup["ours"] == "4.00 ± 0.00" and mixup["n"] == "1/3"
    assert mixup["ours_gain"] == "+1.50" and mixup["paper_gain"] == "+1.29"
    assert mixup["delta"] == "-0.24"
    _, _, rows = build_table("mixup", "proxy", "table1_cifar", results)
    wrn = [r for r in rows if r["setting"] == "CIFAR-10 WRN-28-10"]
    assert all(r["ours"] == "missing" and r["delta"] == "missing" for r in wrn)
    write_table("mixup", "proxy", "table1_cifar", results, tmp_path / "reports")
    md = (tmp_path / "reports" / "table1_cifar.md").read_text()
    assert "missing" in md and "proxy scale" in md
    csv = (tmp_path / "reports" / "table1_cifar.csv").read_text()
    assert csv.count("missing") >= 8
    write_index(results, tmp_path / "reports", tmp_path / "figures")
    index = (tmp_path / "reports" / "index.md").read_text()
    assert "| mixup | proxy | 3 | 6 | 3.00 |" in index and "gain over ERM" in index


@pytest.mark.slow
def test_smoke_reproduce_mixup_builds_tables_figures_and_index(tmp_path):
    res = snakemake(tmp_path, "-c2", "reproduce_mixup")
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("reports/mixup/smoke/cifar10_demo.md", "reports/mixup/smoke/cifar10_demo.csv",
                 "reports/mixup/smoke/cifar10_demo.tex", "figures/mixup/smoke/curves_cifar10_preactresnet18.png",
                 "figures/mixup/smoke/curves_cifar10_preactresnet18.pdf", "figures/mixup/smoke/mixed_examples.png"):
        assert (tmp_path / name).exists(), name
    table = (tmp_path / "reports/mixup/smoke/cifar10_demo.md").read_text()
    assert "1/1" in table and "smoke scale" in table
    again = snakemake(tmp_path, "-c2", "reproduce_mixup")
    assert again.returncode == 0 and "Nothing to be done" in (again.stdout + again.stderr)
    report = snakemake(tmp_path, "-c1", "report")
    assert report.returncode == 0, report.stderr[-3000:]
    index = (tmp_path / "reports/index.md").read_text()
    assert "| mixup | smoke | 2 | 2 |" in index and "curves_cifar10_preactresnet18" in index


@pytest.mark.slow
def test_killed_training_job_resumes_under_the_workflow(tmp_path):
    target = "results/mixup/smoke/cifar10_preactresnet18/erm/seed0/metrics.json"
    run = tmp_path / "results/mixup/smoke/cifar10_preactresnet18/erm/seed0"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*SNAKEMAKE, "-d", str(tmp_path), "-c1", target], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "checkpoint/last.pt").exists():
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: snakemake, accelerate and the trainer
    proc.wait()
    assert (run / "checkpoint/last.pt").exists() and not (run / "metrics.json").exists()
    shutil.rmtree(tmp_path / ".snakemake" / "locks", ignore_errors=True)
    res = snakemake(tmp_path, "-c1", "--rerun-incomplete", target)
    assert res.returncode == 0, res.stderr[-3000:]
    log = (tmp_path / "logs/train/mixup/smoke/cifar10_preactresnet18/erm/seed0.log").read_text()
    assert "resuming" in log
    assert len((run / "log.jsonl").read_text().splitlines()) == 3
