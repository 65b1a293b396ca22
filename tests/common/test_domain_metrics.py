"""Out-of-distribution support in the trainer: per-domain regression errors (worst and mean domain) from a
dataset's domain ids, and training batches in dataset order (`data.shuffle=false`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import load_config
from common.data import TabularDataset
from common.errors import ReproError
from common.metrics import regression_metrics
from common.train import main, make_train_loader

REPO = Path(__file__).resolve().parents[2]


def test_domain_errors_equal_a_loop_over_domains():
    g = torch.Generator().manual_seed(0)
    preds, targets = torch.randn(30, 2, generator=g), torch.randn(30, 2, generator=g)
    domains = torch.tensor([7] * 5 + [3] * 15 + [11] * 10)[torch.randperm(30, generator=g)]
    out = regression_metrics(preds, targets, domains=domains)
    per_domain = {}
    for d in set(domains.tolist()):
        rows = [i for i in range(30) if int(domains[i]) == d]
        errors = [(float(preds[i, j]) - float(targets[i, j])) ** 2 for i in rows for j in range(2)]
        per_domain[d] = math.sqrt(sum(errors) / len(errors))
    assert out["rmse_worst_domain"] == pytest.approx(max(per_domain.values()), rel=1e-12)
    assert out["rmse_domain_mean"] == pytest.approx(np.mean(list(per_domain.values())), rel=1e-12)
    # pooled MSE is the row-weighted mean of the domains' MSEs: never above the worst domain
    assert out["rmse"] <= out["rmse_worst_domain"]
    assert out["rmse"] == pytest.approx(regression_metrics(preds, targets)["rmse"])  # unchanged by domains
    assert "rmse_worst_domain" not in regression_metrics(preds, targets)


def test_one_domain_is_its_own_worst_and_a_bad_length_fails():
    preds, targets = torch.randn(8, 1), torch.randn(8, 1)
    out = regression_metrics(preds, targets, domains=torch.full((8,), 4))
    assert out["rmse_worst_domain"] == pytest.approx(out["rmse"]) == pytest.approx(out["rmse_domain_mean"])
    with pytest.raises(ReproError, match="domains has 7 entries for 8"):
        regression_metrics(preds, targets, domains=torch.zeros(7))


class _Accelerator:
    num_processes, process_index = 1, 0


def test_unshuffled_training_takes_batches_in_dataset_order():
    dataset = TabularDataset(np.arange(50.0).reshape(25, 2), np.arange(25.0), 0.0, 1.0)
    path = REPO / "papers/cmixup/configs/proxy/crime.yaml"
    ordered = load_config(path, ["train.batch_size=8"], method_label="erm")
    assert ordered.data.shuffle is False
    for epoch in (0, 3):  # the same order every epoch, the last partial batch dropped
        batches = [t.reshape(-1).tolist() for _, t in make_train_loader(dataset, ordered, epoch, _Accelerator())]
        assert batches == [list(map(float, range(k, k + 8))) for k in (0, 8, 16)]
    shuffled = load_config(path, ["train.batch_size=8", "data.shuffle=true"], method_label="erm")
    first = torch.cat([t.reshape(-1) for _, t in make_train_loader(dataset, shuffled, 0, _Accelerator())])
    assert len(first) == 24 and not torch.equal(first, first.sort().values)


def test_ood_smoke_run_reports_the_worst_domain(tmp_path, capsys):
    out = tmp_path / "run"
    config = REPO / "papers/cmixup/configs/smoke/crime.yaml"
    assert main(["--config", str(config), "--method", "cmixup", "--output", str(out), "seed=1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["selected"]["test"]
    assert test["rmse"] <= test["rmse_worst_domain"] and test["rmse_domain_mean"] <= test["rmse_worst_domain"]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all("val_rmse_worst_domain" in row and "test_rmse_worst_domain" in row for row in rows)
    # dataset order needs the standard loader
    assert main(["--config", str(config), "--method", "erm", "--output", str(tmp_path / "bad"),
                 "data.device_cache=true"]) == 2
    assert "data.shuffle=false" in capsys.readouterr().err and not (tmp_path / "bad" / "metrics.json").exists()
