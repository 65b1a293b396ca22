"""Figure rules declare what they read, so Snakemake rebuilds them when a config or the data sample changes."""

import subprocess
import sys
from pathlib import Path

from common import workflow as grid

REPO = Path(__file__).resolve().parents[2]


def test_mixed_examples_declares_the_papers_configs_and_the_cifar_sample(tmp_path):
    res = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                          "-n", "figures/mixup/smoke/mixed_examples.png"],
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr + res.stdout
    line = next(line for line in res.stdout.splitlines() if line.strip().startswith("input:"))
    declared = {part.strip() for part in line.split("input:", 1)[1].split(",")}
    configs = {str(grid.config_path("mixup", "smoke", e)) for e in grid.experiments("mixup", "smoke")}
    assert configs and declared == configs | {str(REPO / "tests/data/cifar10-mini/test.parquet")}
