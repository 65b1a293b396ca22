"""Launching one run: `python -m common.workflow train` starts `accelerate launch` (and `common.gpu_slots`) with the
running interpreter, needs no `python`/`accelerate` on PATH, and turns a failed launch into one `error:` line."""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import workflow as grid

REPO = Path(__file__).resolve().parents[2]
TRAIN = ["train", "--paper", "cmixup", "--scale", "smoke", "--experiment", "airfoil", "--seed", "0"]


def bare_env(tmp_path):
    """The environment of a job whose shell has no venv activated: an empty PATH (no python, no accelerate)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
    return {**env, "PATH": str(empty), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def workflow_main(tmp_path, argv, prelude="", **kwargs):
    """Run common.workflow.main(argv) in a child interpreter started by full path, in tmp_path."""
    code = f"import sys\n{prelude}\nfrom common import workflow\nsys.exit(workflow.main({argv!r}))"
    return subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=bare_env(tmp_path), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_launch_commands_use_the_running_interpreter_and_keep_paths_with_spaces_whole(tmp_path, monkeypatch):
    python = "/opt/my env/bin/python3"  # a venv in a folder with a space: one argv element, never split
    monkeypatch.setattr(sys, "executable", python)
    root = tmp_path / "a checkout"
    for name, gpus in (("cpu", 0), ("two", 2)):
        folder = root / "papers" / "p" / "configs" / "proxy"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.yaml").write_text(f"resources: {{gpus: {gpus}}}\n")
    cpu = grid.launch_command("p", "proxy", "cpu", root=root)
    assert cpu == [python, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                   "--dynamo_backend", "no", "--cpu", "-m", "common.train"]
    two = grid.launch_command("p", "proxy", "two", pack=3, root=root)
    assert two == [python, "-m", "common.gpu_slots", "--need", "2", "--pack", "3", "--",
                   python, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
                   "--dynamo_backend", "no", "--multi_gpu", "-m", "common.train"]
    command = grid.train_command(grid.Run("p", "proxy", "two", "mixup", 4), pack=3, root=root)
    assert command[:len(two)] == two
    assert command[len(two):] == ["--config", str(root / "papers/p/configs/proxy/two.yaml"), "--method", "mixup",
                                  "--output", "results/p/proxy/two/mixup/seed4", "--on-config-change", "restart",
                                  "seed=4"]


def test_a_run_trains_with_neither_python_nor_accelerate_on_path(tmp_path):
    proc = workflow_main(tmp_path, [*TRAIN, "--method", "erm"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert (tmp_path / "results/cmixup/smoke/airfoil/erm/seed0/metrics.json").exists()
    shown = next(line for line in out.splitlines() if line.startswith("[workflow] "))
    assert shlex.split(shown[len("[workflow] "):])[:3] == [sys.executable, "-m", "accelerate.commands.launch"]


def test_a_missing_launcher_is_one_error_line_naming_the_command_and_the_fix(tmp_path):
    # this interpreter "has no accelerate": find_spec sees None in sys.modules
    proc = workflow_main(tmp_path, [*TRAIN, "--method", "erm"], prelude="sys.modules['accelerate'] = None")
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert len(err.splitlines()) == 1, err  # no traceback
    assert err.startswith(f"error: cannot launch training: {sys.executable} has no accelerate package")
    assert "-m accelerate.commands.launch" in err and "pip install -e ." in err
    assert not (tmp_path / "results").exists()


def test_a_launch_that_fails_before_training_ends_with_one_error_line_and_exit_2(tmp_path):
    # an unknown method: the trainer refuses it before training starts; accelerate then exits 1 with a traceback
    proc = workflow_main(tmp_path, [*TRAIN, "--method", "no_such_method"])
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the training command exited with status 1 (command: ")
    assert "--method no_such_method" in last and "run the command by hand" in last
    assert sum(line.startswith("error: the training command") for line in err.splitlines()) == 1
    assert not (tmp_path / "results/cmixup/smoke/airfoil/no_such_method/seed0/metrics.json").exists()


def test_unknown_experiment_is_an_error_listing_the_experiments(tmp_path, capsys):
    assert grid.main([*TRAIN[:6], "airfoyl", "--seed", "0", "--method", "erm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no experiment 'airfoyl' for paper 'cmixup' at scale smoke") and "airfoil" in err


def test_a_term_sent_to_the_wrapper_reaches_the_trainer_and_gives_128_plus_15(tmp_path):
    # a stand-in launcher that says when it started, then waits to be stopped (TERM's default action kills it)
    (tmp_path / "sleepy_launcher.py").write_text("import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    prelude = f"import os\nos.environ['PYTHONPATH'] += ':{tmp_path}'\nsys.path.insert(0, {str(tmp_path)!r})\n" \
              "import common.workflow\ncommon.workflow.LAUNCHER = 'sleepy_launcher'"
    proc = workflow_main(tmp_path, [*TRAIN, "--method", "erm"], prelude=prelude)
    deadline = time.time() + 60
    while time.time() < deadline and "started" not in proc.stdout.readline():
        pass
    proc.send_signal(signal.SIGTERM)  # to the wrapper only, as a scheduler's time limit may
    _out, err = proc.communicate(timeout=30)  # the stand-in would sleep 60 s had the TERM not reached it
    assert proc.returncode == 128 + signal.SIGTERM, err  # the wrapper itself did not die of the TERM
    assert err.startswith("error: training stopped by signal SIGTERM") and "resume" in err
