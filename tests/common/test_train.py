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


VIT = ["model.name=vit_tiny_patch4_32", "model.kwargs={depth: 1, embed_dim: 48, num_heads: 3}",
       "data.num_workers=0", "optim.name=adamw", "optim.lr=0.001", "schedule.name=constant"]


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    """2 micro-batches of 50 with grad_accum 2 give the same update as one batch of 100 (no BatchNorm)."""
    common = ["--config", str(SMOKE), "--method", "erm", "train.epochs=1", *VIT]
    assert main([*common, "--output", str(tmp_path / "big"), "train.batch_size=100",
                 "train.max_steps_per_epoch=1"]) == 0
    assert main([*common, "--output", str(tmp_path / "acc"), "train.batch_size=50", "train.grad_accum=2",
                 "train.max_steps_per_epoch=2"]) == 0
    big = torch.load(tmp_path / "big/checkpoint/last.pt", weights_only=False)["model"]
    acc = torch.load(tmp_path / "acc/checkpoint/last.pt", weights_only=False)["model"]
    init = build_model("vit_tiny_patch4_32", num_classes=10, depth=1, embed_dim=48, num_heads=3)
    moved = 0
    for key in big:
        assert torch.allclose(big[key], acc[key], atol=1e-5), key
        moved += int(not torch.equal(big[key], init.state_dict()[key]))
    assert moved > 0


def test_bf16_ema_and_clipping_run_and_log_ema_metrics(tmp_path):
    out = tmp_path / "run"  # a fresh process: Accelerate's precision is fixed once per process
    res = run_cli("--config", SMOKE, "--method", "mixup", "--output", out, "train.epochs=1",
                  "train.max_steps_per_epoch=2", "train.precision=bf16", "train.ema_decay=0.9",
                  "train.clip_grad=1.0", *TINY)
    assert res.returncode == 0, res.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert "top1" in metrics["final_ema"]
    row = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert "test_ema_top1" in row and "train_lam" in row


def test_nan_loss_stops_with_a_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["--config", str(SMOKE), "--method", "erm", "--output", str(out), "train.epochs=2",
                 "optim.lr=1.0e+30", "train.max_steps_per_epoch=5", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "loss became" in err and "optim.lr" in err
    assert not (out / "metrics.json").exists()


@pytest.mark.full_data
def test_regression_on_airfoil_reports_rmse_and_mape(tmp_path):
    root = os.environ.get("REPRO_DATA_DIR")
    candidates = [Path(root) / "airfoil"] if root else []
    candidates.append(REPO.parent / "shared/datasets/airfoil")
    found = [c for c in candidates if (c / "airfoil_self_noise.dat").exists()]
    if not found:
        pytest.skip("the Airfoil file is not available (set REPRO_DATA_DIR)")
    out = tmp_path / "run"
    assert main(["--output", str(out), "data.name=airfoil", f"data.root={found[0]}", "data.num_workers=0",
                 "model.name=mlp_regression", "optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0",
                 "schedule.name=constant", "train.epochs=3", "train.batch_size=64"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["primary_metric"] == "rmse" and metrics["best"]["rmse"] <= metrics["final"]["rmse"] + 1e-9
    assert {"rmse", "mape"} <= set(metrics["final"])


def test_selection_on_validation_follows_the_tie_rule():
    from common.train import select_epoch

    history = [{"epoch": 1, "val_rmse": 2.0}, {"epoch": 2, "val_rmse": 1.5}, {"epoch": 3, "val_rmse": 1.5},
               {"epoch": 4, "val_rmse": 1.7}]
    assert select_epoch(history, "rmse", "later")["epoch"] == 3  # <= : C-Mixup's official rule
    assert select_epoch(history, "rmse", "earlier")["epoch"] == 2
    acc = [{"epoch": 1, "val_top1": 50.0}, {"epoch": 2, "val_top1": 60.0}, {"epoch": 3, "val_top1": 55.0}]
    assert select_epoch(acc, "top1", "later")["epoch"] == 2


def test_validation_split_reports_the_selected_epochs_test_metrics(tmp_path):
    out = tmp_path / "run"
    assert main(["--config", str(SMOKE), "--method", "erm", "--output", str(out), "train.epochs=2",
                 "train.max_steps_per_epoch=3", "data.val_split=100", "train.select=best_val", *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    chosen = metrics["selected"]
    row = next(r for r in log if r["epoch"] == chosen["epoch"])
    assert chosen["test"]["top1"] == row["test_top1"] and chosen["val"]["top1"] == row["val_top1"]
    assert all("val_top1" in r and "test_top1" in r for r in log)
    # post-hoc temperature scaling on validation, applied to test (RankMixup's +TS), and reliability data
    assert all(0.1 <= r["val_temperature"] <= 10.0 and "test_ts_ece" in r for r in log)
    assert chosen["test"]["ts_ece"] == row["test_ts_ece"]
    rel = chosen["reliability"]["test_ts"]
    assert sum(rel["count"]) == 200 and len(rel["count"]) == 15


def test_config_change_under_the_workflow_keeps_the_old_result(tmp_path):
    """--on-config-change restart (the workflow's) moves the old run aside; even without its metrics.json
    (Snakemake deletes declared outputs before rerunning) the result survives in provenance.json."""
    out = tmp_path / "run"
    args = ["--config", str(SMOKE), "--method", "erm", "--output", str(out), "train.max_steps_per_epoch=2", *TINY]
    assert main([*args, "train.epochs=1"]) == 0
    old = json.loads((out / "metrics.json").read_text())
    old_hash = json.loads((out / "provenance.json").read_text())["config_hash"]
    (out / "metrics.json").unlink()  # what Snakemake does to a declared output before rerunning the job
    assert main([*args, "train.epochs=2", "--on-config-change", "restart"]) == 0
    kept = out / f"superseded-{old_hash}"
    assert json.loads((kept / "provenance.json").read_text())["metrics"] == old
    assert (kept / "log.jsonl").exists() and json.loads((out / "metrics.json").read_text())["epochs"] == 2


def test_a_second_writer_is_refused_and_touches_nothing(tmp_path, capsys):
    """While a process holds a run folder's lock, another trainer on that folder exits 2 naming it and changes
    no file, even where it would otherwise move the old run aside; once the lock is free it proceeds."""
    from common.train import RunFolderLock

    out = tmp_path / "run"
    args = ["--config", str(SMOKE), "--method", "erm", "--output", str(out), "train.max_steps_per_epoch=1", *TINY]
    assert main([*args, "train.epochs=1"]) == 0

    def snapshot():
        return {p.relative_to(out): (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}

    holder = RunFolderLock(out)  # another open file description: flock conflicts as with another process
    holder.acquire()
    try:
        before = snapshot()
        capsys.readouterr()  # the first run's progress bars
        assert main([*args, "train.epochs=2", "--on-config-change", "restart"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        assert f"run folder {out} is being written by another process (pid {os.getpid()} on" in err
        assert snapshot() == before
    finally:
        holder.release()
    assert main([*args, "train.epochs=2", "--on-config-change", "restart"]) == 0
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2
