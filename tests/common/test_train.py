"""Trainer: learning happens, outputs are complete, a SIGKILLed run resumes exactly, bad input fails cleanly."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.config import load_config
from common.data import build_datasets
from common.methods import StepContext, build_method
from common.models import build_model
from common.train import main

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "papers/mixup/configs/smoke/cifar10_preactresnet18.yaml"
TINY = ["model.kwargs.width=8", "train.batch_size=50", "data.num_workers=0"]
OUTPUTS = ("metrics.json", "log.jsonl", "config.yaml", "provenance.json", "checkpoint/last.pt")


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "common.train", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_a_few_steps_lower_the_loss():
    train_ds, _, info = build_datasets("cifar10-mini")
    torch.manual_seed(0)
    model = build_model("preact_resnet18_cifar", num_classes=info.num_classes, width=8)
    images = torch.stack([train_ds[i][0] for i in range(64)])
    labels = torch.tensor([train_ds[i][1] for i in range(64)])
    method = build_method({"name": "erm"}, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctx = StepContext(epoch=0, step=0, progress=0.0, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        loss = method.step(model, (images, labels), ctx)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_one_epoch_of_smoke_config_writes_every_output(tmp_path):
    out = tmp_path / "run"
    assert main(["--config", str(SMOKE), "--method", "mixup", "--output", str(out),
                 "train.epochs=1", *TINY]) == 0
    for name in OUTPUTS:
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and 0 <= metrics["final"]["top1"] <= 100
    assert set(metrics["final"]) >= {"top1", "top5", "nll", "ece"}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and "train_loss" in log[0] and "test_top1" in log[0]
    prov = json.loads((out / "provenance.json").read_text())
    assert {"git_commit", "git_dirty", "config_hash", "packages", "device_name", "device_count",
            "wall_time_s", "command"} <= set(prov)
    cfg = load_config(out / "config.yaml")
    assert cfg.method["name"] == "mixup" and cfg.train.epochs == 1
    # a finished run is not retrained; a different config in the same folder is refused
    mtime = (out / "metrics.json").stat().st_mtime
    assert main(["--config", str(SMOKE), "--method", "mixup", "--output", str(out),
                 "train.epochs=1", *TINY]) == 0
    assert (out / "metrics.json").stat().st_mtime == mtime
    assert main(["--config", str(SMOKE), "--method", "mixup", "--output", str(out),
                 "train.epochs=2", *TINY]) == 2
    assert (out / "metrics.json").stat().st_mtime == mtime


@pytest.mark.slow
def test_sigkill_after_epoch_two_resumes_to_identical_result(tmp_path):
    args = ["--config", SMOKE, "--method", "mixup", "train.epochs=4", "train.max_steps_per_epoch=8", *TINY]
    full, killed = tmp_path / "full", tmp_path / "killed"
    done = run_cli(*args, "--output", full)
    assert done.returncode == 0, done.stderr

    proc = subprocess.Popen([sys.executable, "-m", "common.train", *map(str, args), "--output", str(killed)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 2 and (killed / "checkpoint/last.pt").exists():
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    resumed = run_cli(*args, "--output", killed)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout

    state_full = torch.load(full / "checkpoint/last.pt", weights_only=False)["model"]
    state_resumed = torch.load(killed / "checkpoint/last.pt", weights_only=False)["model"]
    for key in state_full:
        assert torch.equal(state_full[key], state_resumed[key]), key
    m_full = json.loads((full / "metrics.json").read_text())
    m_resumed = json.loads((killed / "metrics.json").read_text())
    assert m_full["final"] == m_resumed["final"]
    log_full = [json.loads(x) for x in (full / "log.jsonl").read_text().splitlines()]
    log_resumed = [json.loads(x) for x in (killed / "log.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]
    assert strip(log_full) == strip(log_resumed)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.name=cifar11"], "unknown dataset 'cifar11'"),
        (["model.name=preact_resnet18_cifr"], "preact_resnet18_cifar"),
        (["method.name=mixpu"], "unknown method 'mixpu'"),
        (["train.epoch=3"], "train.epochs"),
        (["optim.lr=fast"], "optim.lr"),
    ],
)
def test_bad_input_is_one_clear_error_and_no_finished_folder(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    code = main(["--config", str(SMOKE), "--method", "erm", "--output", str(out), *TINY, *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (out / "metrics.json").exists()


def test_missing_data_folder_names_the_fix(tmp_path, capsys):
    code = main(["--config", str(SMOKE), "--method", "erm", "--output", str(tmp_path / "run"), *TINY,
                 "data.name=cifar10", f"data.root={tmp_path / 'nowhere'}", "data.allow_download=false"])
    err = capsys.readouterr().err
    assert code == 2 and "REPRO_DATA_DIR" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_truncated_parquet_is_reported_by_file_name(tmp_path):
    data = tmp_path / "cifar10"
    shutil.copytree(REPO / "tests/data/cifar10-mini", data)
    train_file = data / "train.parquet"
    train_file.write_bytes(train_file.read_bytes()[: train_file.stat().st_size // 2])
    res = run_cli("--config", SMOKE, "--method", "erm", "--output", tmp_path / "run", *TINY,
                  "data.name=cifar10", f"data.root={data}", "data.allow_download=false")
    assert res.returncode == 2
    assert "train.parquet" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_unknown_config_file_and_method_label(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--config", str(SMOKE), "--method", "mixpu"]) == 2
    assert "'mixup'" in capsys.readouterr().err
