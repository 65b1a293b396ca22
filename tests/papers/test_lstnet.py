"""LSTNet (papers/cmixup/lstnet.py): longhand loops, manifold mixing through it, short training runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import papers.cmixup  # noqa: F401  (registers lstnet into timm)
from common.data import DataInfo, WindowedSeries
from common.methods import StepContext, build_method
from common.models import ModelArgumentError, build_model
from common.train import main

REPO = Path(__file__).resolve().parents[2]
# small but complete: T = 20 - 3 + 1 = 18 conv steps, pt = (20 - 3) // 4 = 4 periods -> the skip-GRU reads
# the last 16 steps and skips the first 2, so an off-by-one in the slicing shows
SMALL = {
    "hid_cnn": 3,
    "hid_rnn": 4,
    "hid_skip": 2,
    "cnn_kernel": 3,
    "skip": 4,
    "highway_window": 5,
    "drop_rate": 0.0,
}
WINDOW, SERIES = 20, 3


def make(dtype=torch.float64, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("lstnet", num_classes=SERIES, **{**SMALL, **overrides})
    for p in model.parameters():  # PyTorch's init leaves biases small; make every weight matter
        torch.nn.init.normal_(p, std=0.5)
    return model.to(dtype).eval()


def windows(batch=5, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(batch, WINDOW, SERIES, generator=torch.Generator().manual_seed(1), dtype=dtype)


# --------------------------------------------------------------------------------- longhand reference
def gru_loop(gru: torch.nn.GRU, steps: list[torch.Tensor]) -> torch.Tensor:
    """The GRU equations of torch.nn.GRU, one step at a time, from a zero state. Returns the last state."""
    w_ih, w_hh, b_ih, b_hh = gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0
    size = gru.hidden_size
    h = torch.zeros(size, dtype=w_ih.dtype)
    for x in steps:
        gi, gh = w_ih @ x + b_ih, w_hh @ h + b_hh
        reset = torch.sigmoid(gi[:size] + gh[:size])
        update = torch.sigmoid(gi[size : 2 * size] + gh[size : 2 * size])
        new = torch.tanh(gi[2 * size :] + reset * gh[2 * size :])
        h = (1 - update) * new + update * h
    return h


def conv_loop(model, window: torch.Tensor) -> list[torch.Tensor]:
    """ReLU(conv) of one window (P, m): one (hid_cnn,) vector per time step t, reading rows t .. t + k - 1."""
    weight = model.conv.weight[:, 0]  # (hid_cnn, k, m)
    k = weight.shape[1]
    return [
        torch.relu(model.conv.bias + (weight * window[t : t + k]).sum(dim=(1, 2)))
        for t in range(window.shape[0] - k + 1)
    ]


def highway_loop(model, window: torch.Tensor) -> torch.Tensor:
    """sum_k w_k x[P - hw + k, i] + b for every series i: the same AR coefficients for all series."""
    hw, w, b = model.highway_window, model.highway.weight[0], model.highway.bias[0]
    steps = window.shape[0]
    return torch.stack(
        [sum(w[k] * window[steps - hw + k, i] for k in range(hw)) + b for i in range(window.shape[1])]
    )


def skip_loop(model, conv_steps: list[torch.Tensor]) -> torch.Tensor:
    """One skip-GRU sequence per phase j < skip: steps j, j + skip, ... of the last pt * skip conv steps."""
    steps, skip = len(conv_steps), model.skip
    periods = (steps - 1) // skip  # int((P - k) / skip) with P - k = steps - 1
    start = steps - periods * skip
    return torch.cat(
        [
            gru_loop(model.gru_skip, [conv_steps[start + i * skip + j] for i in range(periods)])
            for j in range(skip)
        ]
    )


def head_loop(model, conv_steps: list[torch.Tensor], highway: torch.Tensor) -> torch.Tensor:
    features = torch.cat([gru_loop(model.gru, conv_steps), skip_loop(model, conv_steps)])
    return model.head.weight @ features + model.head.bias + highway


# ------------------------------------------------------------------------------------------- the model
def test_registered_shapes_and_official_parameter_count():
    assert timm.is_model("lstnet")
    model = make()
    x = windows()
    assert model(x).shape == (5, SERIES)
    assert model.block_1(x).shape == (5, 3 * 18 + 5 * SERIES)
    # C-Mixup's Exchange-Rate LSTNet: conv 50x6x8, GRU 50->50, skip-GRU 50->5, linear 170->8, highway 24->1
    official = timm.create_model("lstnet", num_classes=8, hid_cnn=50, hid_rnn=50)
    expected = (
        (50 * 6 * 8 + 50) + 3 * (50 * 50 + 50 * 50 + 100) + 3 * (5 * 50 + 5 * 5 + 10) + (170 * 8 + 8) + 25
    )
    assert sum(p.numel() for p in official.parameters()) == expected == 19998
    assert official(torch.randn(2, 168, 8)).shape == (2, 8)
    with pytest.raises(ModelArgumentError, match="accepts"):
        timm.create_model("lstnet", num_classes=8, hidden=3)
    with pytest.raises(ModelArgumentError, match=r"windows \(B, P, 3\)"):
        model(torch.randn(2, WINDOW, 4, dtype=torch.float64))
    with pytest.raises(ModelArgumentError, match=r"max\(cnn_kernel, highway_window\) = 5"):
        model(torch.randn(2, 4, SERIES, dtype=torch.float64))
    with pytest.raises(ModelArgumentError, match="window - cnn_kernel >= skip"):
        model(torch.randn(2, 6, SERIES, dtype=torch.float64))


def test_highway_is_a_linear_ar_over_the_last_steps():
    model = make()
    x = windows()
    expected = torch.stack([highway_loop(model, x[b]) for b in range(len(x))])
    torch.testing.assert_close(
        model.highway_term(x[:, -model.highway_window :]), expected, rtol=0, atol=1e-10
    )
    # and forward adds it on top of the recurrent part
    recurrent = model.head(model.recurrent_features(model.conv_features(x)))
    torch.testing.assert_close(model(x) - recurrent, expected, rtol=0, atol=1e-10)


def test_skip_gru_equals_a_loop_over_phases():
    model = make()
    x = windows()
    features = model.recurrent_features(model.conv_features(x))
    assert features.shape == (5, 4 + 4 * 2)
    for b in range(len(x)):
        steps = conv_loop(model, x[b])
        torch.testing.assert_close(features[b, :4], gru_loop(model.gru, steps), rtol=0, atol=1e-6)
        torch.testing.assert_close(features[b, 4:], skip_loop(model, steps), rtol=0, atol=1e-6)


@pytest.mark.parametrize("output_fun", [None, "linear", "tanh", "sigmoid"])
def test_forward_equals_the_longhand_network(output_fun):
    model = make(output_fun=output_fun)
    x = windows()
    expected = torch.stack(
        [head_loop(model, conv_loop(model, x[b]), highway_loop(model, x[b])) for b in range(5)]
    )
    if output_fun in ("tanh", "sigmoid"):
        expected = getattr(torch, output_fun)(expected)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.forward_head(model.block_2(model.block_1(x))), model(x), rtol=0, atol=0)


def test_no_skip_no_highway_variant():
    model = make(skip=0, highway_window=0)
    x = windows()
    expected = torch.stack(
        [model.head.weight @ gru_loop(model.gru, conv_loop(model, x[b])) + model.head.bias for b in range(5)]
    )
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.block_2(model.block_1(x)), model(x), rtol=0, atol=0)


def test_dropout_is_active_in_training_only():
    model = make(drop_rate=0.5).train()
    x = windows()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


# ------------------------------------------------------------------------------------ manifold mixing
def series_dataset(n=60, m=SERIES):
    series = torch.randn(n, m, generator=torch.Generator().manual_seed(3)).cumsum(0) * 0.1
    ds = WindowedSeries(series, range(WINDOW + 2, n), WINDOW, 3)
    return ds, DataInfo("toy-series", "regression", m, None, None, None, "test")


def test_manifold_mixup_mixes_the_conv_features_and_the_highway_window():
    data, info = series_dataset()
    method = build_method(
        {"name": "manifold_mixup_regression", "alpha": 1.5}, num_classes=SERIES, task="regression"
    )
    method.prepare(data, info)
    model = make(dtype=torch.float32)
    method.check_model(model)
    x = torch.stack([data[i][0] for i in range(8)])
    y = torch.stack([data[i][1] for i in range(8)])
    lam, partner = method.draw(y, torch.Generator().manual_seed(4))
    out = method.step(model, (x, y), StepContext(0, 0, 0.0, torch.Generator().manual_seed(4)))
    assert out["lam"] == lam and 0 < lam < 1
    x2 = torch.stack([data[int(j)][0] for j in partner])
    y2 = torch.stack([data[int(j)][1] for j in partner])
    expected = []
    for b in range(8):  # Learner_TimeSeries.forward_mixup, longhand
        mixed_steps = [
            lam * c1 + (1 - lam) * c2 for c1, c2 in zip(conv_loop(model, x[b]), conv_loop(model, x2[b]))
        ]
        highway = highway_loop(model, lam * x[b] + (1 - lam) * x2[b])
        expected.append(head_loop(model, mixed_steps, highway))
    expected = torch.stack(expected)
    torch.testing.assert_close(out["logits"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        out["loss"], ((expected - (lam * y + (1 - lam) * y2)) ** 2).mean(), rtol=1e-5, atol=1e-7
    )
    # the conv block is non-linear: mixing its output is not mixing the input (the test can tell them apart)
    assert (model(lam * x + (1 - lam) * x2) - expected).abs().max() > 1e-3
    # forward_mixup(x, x, lam) == forward(x)
    h = model.block_1(x)
    torch.testing.assert_close(
        model.forward_head(model.block_2(lam * h + (1 - lam) * h)), model(x), rtol=1e-5, atol=1e-5
    )
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_input_cmixup_feeds_the_mixed_window():
    data, info = series_dataset()
    method = build_method(
        {"name": "cmixup", "alpha": 2.0, "bandwidth": 0.5, "manifold": False},
        num_classes=SERIES,
        task="regression",
    )
    method.prepare(data, info)
    model = make(dtype=torch.float32)
    x = torch.stack([data[i][0] for i in range(8)])
    y = torch.stack([data[i][1] for i in range(8)])
    lam, partner = method.draw(y, torch.Generator().manual_seed(5))
    out = method.step(model, (x, y), StepContext(0, 0, 0.0, torch.Generator().manual_seed(5)))
    x2 = torch.stack([data[int(j)][0] for j in partner])
    torch.testing.assert_close(out["logits"], model(lam * x + (1 - lam) * x2), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------- training runs
TINY = [
    "train.epochs=2",
    "train.batch_size=16",
    "train.eval_batch_size=32",
    "train.checkpoint_every=1",
    "model.kwargs.hid_cnn=4",
    "model.kwargs.hid_rnn=4",
    "model.kwargs.hid_skip=2",
]


@pytest.mark.parametrize(
    "experiment,folder,file,method",
    [
        ("exchange_rate", "exchange_rate", "exchange_rate.txt", "cmixup"),  # manifold C-Mixup, 8-dim kernel
        ("electricity", "electricity", "electricity.txt", "cmixup"),  # input C-Mixup
        ("exchange_rate", "exchange_rate", "exchange_rate.txt", "manifold_mixup"),
    ],
)
def test_paper_config_trains_on_a_synthetic_series(tmp_path, monkeypatch, experiment, folder, file, method):
    rng = np.random.default_rng(0)
    series = 1.0 + np.cumsum(rng.normal(scale=0.01, size=(400, 8)), axis=0)  # a smooth random walk, 8 series
    (tmp_path / "data" / folder).mkdir(parents=True)
    np.savetxt(tmp_path / "data" / folder / file, series, delimiter=",")
    monkeypatch.setenv("REPRO_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "run"
    config = REPO / "papers" / "cmixup" / "configs" / "paper" / f"{experiment}.yaml"
    assert main(["--config", str(config), "--method", method, "--output", str(out), *TINY, "seed=0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "regression" and metrics["epochs"] == 2 and metrics["model"] == "lstnet"
    selected = metrics["selected"]["test"]
    assert all(math.isfinite(selected[k]) for k in ("rmse", "mape"))
    # max-abs scaled targets near 1: a model that learnt nothing sensible would be far off
    assert selected["rmse"] < 5.0


def test_kernel_figure_draws_vector_labels(tmp_path, monkeypatch):
    """The partner-law figure of a time-series experiment: partner distance to the anchor, kernel vs uniform."""
    from papers.cmixup.figures import kernel_figure

    rng = np.random.default_rng(1)
    series = 1.0 + np.cumsum(rng.normal(scale=0.01, size=(400, 8)), axis=0)
    (tmp_path / "data" / "exchange_rate").mkdir(parents=True)
    np.savetxt(tmp_path / "data" / "exchange_rate" / "exchange_rate.txt", series, delimiter=",")
    monkeypatch.setenv("REPRO_DATA_DIR", str(tmp_path / "data"))
    config = REPO / "papers" / "cmixup" / "configs" / "paper" / "exchange_rate.yaml"
    drawn = kernel_figure(config, tmp_path / "kernel", "test")
    assert (tmp_path / "kernel.png").exists() and (tmp_path / "kernel.pdf").exists()
    for (anchor, name), mass in drawn.items():
        assert mass.sum() == pytest.approx(1.0, abs=1e-6)  # every partner falls in some distance bin
    # the kernel puts more mass than uniform partners on the nearest-distance bin
    anchors = {a for a, _ in drawn}
    assert all(drawn[(a, "C-Mixup")][0] > drawn[(a, "mixup")][0] for a in anchors)
