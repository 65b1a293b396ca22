"""The provenance record written beside every run's metrics: what code, config, software and hardware made it."""

from __future__ import annotations

import importlib.metadata
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "torchvision", "timm", "accelerate", "numpy", "pyyaml", "datasets", "snakemake")


# What the workflow itself writes while runs train (other runs, tables, figures) is output, not code: a figure
# PDF rewritten by a sibling job must not mark a run as made by uncommitted code.
OUTPUT_PATHS = ("results", "reports", "figures")


def git_state(root: Path = REPO_ROOT) -> dict:
    """Commit of the checkout the code runs from and whether its code differs from that commit.

    ``git_dirty`` looks at tracked files outside the workflow's outputs (``results/``, ``reports/``,
    ``figures/``); ``git_dirty_files`` names up to 20 of the changed ones. 'unknown' outside a git checkout.
    """

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20, check=False)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"git_commit": "unknown", "git_dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                     *(f":(exclude){path}" for path in OUTPUT_PATHS))
        changed = [line[3:] for line in status.stdout.splitlines() if line.strip()]
        return {"git_commit": head.stdout.strip(), "git_dirty": bool(changed), "git_dirty_files": changed[:20]}
    except (OSError, subprocess.TimeoutExpired):
        return {"git_commit": "unknown", "git_dirty": None}


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_info(num_processes: int = 1) -> dict:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        kind = "cuda"
    else:
        name = platform.processor() or platform.machine()
        kind = "cpu"
    return {"device_type": kind, "device_name": name, "device_count": num_processes, "host": socket.gethostname()}


def provenance(config_hash: str, wall_time_s: float, num_processes: int, extra: dict | None = None) -> dict:
    record = {
        **git_state(),
        "config_hash": config_hash,
        "packages": package_versions(),
        **device_info(num_processes),
        "wall_time_s": round(wall_time_s, 3),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    record.update(extra or {})
    return record
