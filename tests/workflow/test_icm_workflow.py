"""reproduce_icm at smoke scale through Snakemake: the four arms train on the committed Fashion-MNIST sample and the
tables, curves, noise table and figure, and the cluster grid are built; a second run has nothing to do."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smoke_reproduce_icm_builds_every_output(tmp_path):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-c2",
           "reproduce_icm"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    for arm in ("none", "mixup", "icm_official", "icm_mix"):
        assert (tmp_path / f"results/icm/smoke/fmnist_uniform/{arm}/seed0/metrics.json").exists(), arm
    for name in ("reports/icm/smoke/fmnist_uniform.md", "reports/icm/smoke/fmnist_uniform_official.md",
                 "reports/icm/smoke/noise_fmnist_uniform.md", "figures/icm/smoke/noise_fmnist_uniform.png",
                 "figures/icm/smoke/clusters_fmnist_uniform.png", "figures/icm/smoke/curves_fmnist_uniform.png"):
        assert (tmp_path / name).exists(), name
    noise = (tmp_path / "reports/icm/smoke/noise_fmnist_uniform.md").read_text()
    assert "| mixup | 1 |" in noise and "| icm_mix | 1 |" in noise
    table = (tmp_path / "reports/icm/smoke/fmnist_uniform.md").read_text()
    assert "words: no gain ≥ +1" in table and "1/1" in table
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert again.returncode == 0 and "Nothing to be done" in (again.stdout + again.stderr)
