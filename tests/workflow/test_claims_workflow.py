"""Workflow: `snakemake report` writes reports/claims.{md,csv}, the forest plots and the index's verdict counts
from run folders alone (a fresh working directory holding only fake runs)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def fake_run(results, experiment, method, seed, top1):
    """A finished mixup proxy run: metrics.json, provenance.json and the resolved config (method-only change)."""
    folder = results / "mixup" / "proxy" / experiment / method / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "task": "classification", "primary_metric": "top1", "final": {"top1": top1}, "best": {"top1": top1},
        "median_last10_top1": top1, "dataset": "cifar10", "model": "preact_resnet18_cifar", "epochs": 200}))
    (folder / "provenance.json").write_text(json.dumps({"wall_time_s": 60, "device_type": "cpu"}))
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "paper": "mixup", "experiment": experiment, "scale": "proxy", "seed": seed,
        "data": {"name": "cifar10", "split_seed": None}, "method": {"name": method}}))


@pytest.mark.slow
def test_snakemake_report_writes_claims_from_run_folders(tmp_path):
    results = tmp_path / "results"
    for seed, (erm, mixup) in enumerate([(94.0, 95.5), (94.2, 95.6), (94.4, 95.9)]):
        fake_run(results, "cifar10_preactresnet18", "erm", seed, erm)
        fake_run(results, "cifar10_preactresnet18", "mixup", seed, mixup)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    targets = ["report", "figures/mixup/proxy/claims_forest.png", "reports/mixup/proxy/cifar10_demo.md"]
    res = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                          "-c1", *targets, "--config", "scale=proxy", "train=False"],
                         capture_output=True, text=True, timeout=900, env=env, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(tmp_path / "reports" / "claims.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["paper"] for r in rows} == {"mixup"} and {r["scale"] for r in rows} == {"proxy"}
    demo = next(r for r in rows if r["setting"] == "wd 1e-4")
    # error = 100 - top1: ours 1.4667 lower than ERM on every seed, the paper's 5.53 -> 4.24 = +1.29
    assert demo["method"] == "mixup" and demo["baseline"] == "erm" and demo["metric"] == "error"
    assert demo["higher_is_better"] == "false" and demo["statistic"] == "median_last10" and demo["paired"] == "yes"
    assert (demo["n_method"], demo["n_baseline"]) == ("3", "3") and float(demo["paper_gain"]) == 1.29
    assert abs(float(demo["our_gain"]) - 1.46667) < 1e-4 and float(demo["ci_low"]) > 0
    assert demo["verdict"] == "reproduced"
    wrn = next(r for r in rows if r["setting"] == "CIFAR-10 WRN-28-10")
    assert wrn["verdict"] == "not run" and wrn["our_gain"] == ""
    md = (tmp_path / "reports" / "claims.md").read_text()
    assert "**proxy** scale: 2 reproduced" in md
    index = (tmp_path / "reports" / "index.md").read_text()
    assert index.index("## Do the papers' claims hold?") < index.index("## Runs")
    assert "**proxy** scale: 2 reproduced" in index and "[claims.md](claims.md)" in index
    assert "../figures/claims_forest.png" in index
    for figure in ("figures/claims_forest.png", "figures/claims_forest.pdf", "figures/mixup/proxy/claims_forest.png"):
        assert (tmp_path / figure).stat().st_size > 0, figure
    assert "| by seed | reproduced |" in (tmp_path / "reports/mixup/proxy/cifar10_demo.md").read_text()
