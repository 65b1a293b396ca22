"""Every shell line the workflow runs is valid shell and keeps each value one argument, at every scale.

The values interpolated into shell lines hold spaces and quotes ("the paper's comparison" in the scale notes, a
checkout in a folder with a space), so every rule quotes them with Snakemake's `:q`. These tests run the workflow
from a copy of the repository in a folder named with an apostrophe and a space, under an interpreter whose path
has a space, with no `python` on PATH: dry runs print every job's command (`-p`), which must pass `bash -n` and
split back into the intended arguments; two figure jobs then run for real (their `python` is the workflow's
interpreter, through the shell prefix of workflow/common.smk).
"""

import itertools
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common import workflow as grid

REPO = Path(__file__).resolve().parents[2]
SCALES = ("smoke", "proxy", "paper")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """(copy of the repository's workflow and code in "it's a checkout", interpreter path with a space)."""
    base = tmp_path_factory.mktemp("shell")
    root = base / "it's a checkout"
    root.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".snakemake")
    for name in ("Snakefile", "workflow", "common", "papers", "envs", "tests/data"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=skip)
        else:
            shutil.copy(source, root / name)
    # the running environment seen through a folder whose name has a space: its bin/python is a venv's
    # interpreter that is not on PATH and has a space in its path
    (base / "py env").symlink_to(sys.prefix, target_is_directory=True)
    python = base / "py env" / "bin" / Path(sys.executable).name
    return root, str(python)


def run_snakemake(checkout, *args, timeout=900):
    root, python = checkout
    tools = root.parent / "no-python-bin"  # PATH: the system's programs, but no python of any kind
    if not tools.exists():
        tools.mkdir()
        for folder in (Path("/bin"), Path("/usr/bin")):
            for program in folder.iterdir():
                if not program.name.startswith("python") and not (tools / program.name).exists():
                    (tools / program.name).symlink_to(program)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
    env.update(PATH=str(tools), PYTHONPATH=str(root), PYTHONUNBUFFERED="1")
    return subprocess.run([python, "-m", "snakemake", "-s", str(root / "Snakefile"), "-d", str(root), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=root, check=False)


def printed_commands(stdout: str) -> list[str]:
    """The shell commands a `snakemake -n -p` run printed, one per job with a shell (Snakemake 9 prints each as
    `Shell command: ...`, a multi-line one continued up to a blank line or the next section)."""
    sections = ("[", "Job stats:", "rule ", "localrule ", "checkpoint ", "Shell command: ", "This was a dry-run")
    commands, block = [], None
    for line in [*stdout.splitlines(), ""]:
        if block is not None and line.strip() and not line.startswith(sections):
            block.append(line)
            continue
        if block is not None and block != ["None"]:  # target rules have no shell
            commands.append("\n".join(block))
        block = [line[len("Shell command: "):]] if line.startswith("Shell command: ") else None
    return commands


def argument_problems(command: str, scale: str, root: Path) -> list[str]:
    """What is wrong with the arguments one command splits into (empty when every value came through whole)."""
    words = shlex.split(command)
    # an absolute path split at a space leaves a head that is not there (e.g. an unquoted interpreter or checkout)
    problems = [f"{word!r} does not exist (a path split apart?)" for word in words
                if word.startswith("/") and not Path(word).exists()]
    for flag, value in itertools.pairwise(words):
        if flag == "--stamp" and not value.startswith(f"{scale} scale"):
            problems.append(f"--stamp split apart: {value!r}")
        if flag == "--config" and not (root / value).is_file():
            problems.append(f"--config is not a file: {value!r}")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("scale", SCALES)
def test_every_shell_command_of_every_target_is_valid_shell_with_whole_arguments(checkout, scale):
    root, _ = checkout
    targets = [f"reproduce_{paper}" for paper in grid.papers(root)] + ["reproduce_all", "report"]
    res = run_snakemake(checkout, "-n", "-p", *targets, "--config", f"scale={scale}")
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    commands = printed_commands(res.stdout)
    jobs = int(next(line for line in res.stdout.splitlines() if line.startswith("total ")).split()[-1])
    assert len(commands) == jobs - len(targets) + 1  # every job but the targets (report has a shell) printed one
    bad = []
    for command in commands:
        syntax = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True, check=False)
        # a command bash rejects cannot be split into arguments either
        problems = [syntax.stderr.strip()] if syntax.returncode else argument_problems(command, scale, root)
        if problems:
            bad.append(f"{command[:160]}...: {'; '.join(problems)}")
    assert not bad, f"{len(bad)} of {len(commands)} shell commands at scale {scale}:\n" + "\n".join(bad[:20])


@pytest.mark.slow
def test_figure_jobs_run_from_a_checkout_and_interpreter_with_spaces_and_quotes(checkout):
    # a stamp with an apostrophe (every SCALE_NOTES one at proxy scale) and a config path inside "it's a checkout";
    # neither job trains: the figures need only their experiment's config and the committed Airfoil sample
    root, _ = checkout
    targets = ["figures/resizemix/proxy/weights_cifar10_resnet18_200ep.png", "figures/cmixup/smoke/kernel_airfoil.png"]
    res = run_snakemake(checkout, "-c1", *targets, "--config", "scale=smoke")
    logs = "".join(p.read_text() for p in (root / "logs").rglob("*.log")) if (root / "logs").exists() else ""
    assert res.returncode == 0, res.stderr[-3000:] + logs
    for target in targets:
        assert (root / target).stat().st_size > 0, target
