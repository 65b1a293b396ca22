"""k-Mixup and Local Mixup (papers/cmixup/baselines.py): the assignment against brute force, the partners and
weights against straightforward loops on fixed draws, the steps against a longhand computation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from common.data import DataInfo
from common.errors import ReproError
from common.methods import StepContext, build_method
from common.mixing import randperm_partner, sample_beta
from papers.cmixup import kmixup_partners, local_weights, optimal_assignment
from papers.cmixup.baselines import weighted_mse

INFO = DataInfo("toy", "regression", 1, None, None, None, "test")


def brute_force(cost: np.ndarray) -> tuple[float, tuple]:
    """Minimum total cost over every permutation, and the permutation reaching it."""
    k = len(cost)
    return min((sum(cost[i, p[i]] for i in range(k)), p) for p in itertools.permutations(range(k)))


class Recorder(torch.nn.Module):
    """Remembers its input; predicts a fixed linear map of it (so the loss has gradients)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(-1.0, 1.0, dim).reshape(dim, 1))
        self.seen = None

    def forward(self, x):
        self.seen = x
        return x @ self.weight


def batch(n=16, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g), torch.randn(n, 1, generator=g) * 3 + 10


# -------------------------------------------------------------------------------------------- assignment
@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
def test_assignment_reaches_the_brute_force_minimum(k):
    rng = np.random.default_rng(k)
    for _ in range(25):
        cost = rng.random((k, k)) * rng.choice([1.0, 100.0])
        col = optimal_assignment(cost)
        assert sorted(col.tolist()) == list(range(k))  # a permutation
        best, perm = brute_force(cost)
        assert cost[np.arange(k), col].sum() == pytest.approx(best, rel=1e-12, abs=1e-12)
        assert tuple(col.tolist()) == perm  # continuous random costs: the optimum is unique


def test_assignment_with_ties_and_integer_costs():
    cost = np.array([[4, 1, 3], [2, 0, 5], [3, 2, 2]], dtype=float)
    col = optimal_assignment(cost)
    assert cost[np.arange(3), col].sum() == brute_force(cost)[0] == 5.0
    assert optimal_assignment(np.ones((4, 4))).tolist() in [list(p) for p in itertools.permutations(range(4))]
    with pytest.raises(ReproError, match="square"):
        optimal_assignment(np.ones((2, 3)))


# ---------------------------------------------------------------------------------------------- k-Mixup
def loop_kmixup_partners(x: torch.Tensor, order: list[int], k: int) -> list[int]:
    """The official block matching written out: per block, the permutation of its candidates with the least
    summed Euclidean distance (brute force)."""
    partner = []
    for start in range(0, len(order), k):
        anchors, candidates = list(range(start, min(start + k, len(order)))), order[start:start + k]
        cost = np.array([[math.dist(x[a].tolist(), x[c].tolist()) for c in candidates] for a in anchors])
        partner += [candidates[j] for j in brute_force(cost)[1]]
    return partner


@pytest.mark.parametrize("n,k", [(12, 4), (12, 6), (10, 4), (6, 6), (8, 1)])
def test_kmixup_partners_match_blocks_by_optimal_transport(n, k):
    x, _ = batch(n, 3, seed=n + k)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(k))
    partner = kmixup_partners(x, order, k)
    assert partner.tolist() == loop_kmixup_partners(x, order.tolist(), k)
    assert sorted(partner.tolist()) == list(range(n))  # still a permutation of the batch
    if k == 1:
        assert torch.equal(partner, order)  # k = 1 is mixup's random pairing


def test_kmixup_lowers_the_matched_distance():
    x, _ = batch(64, 5, seed=3)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    d1 = (x - x[kmixup_partners(x, order, 1)]).norm(dim=1).sum()
    d16 = (x - x[kmixup_partners(x, order, 16)]).norm(dim=1).sum()
    assert d16 < d1


def test_kmixup_step_equals_the_longhand_computation():
    x, y = batch(16, 5)
    method = build_method({"name": "k_mixup", "alpha": 2.0, "k": 8}, num_classes=1, task="regression")
    method.prepare(None, INFO)
    model = Recorder(5)
    out = method.step(model, (x, y), StepContext(0, 0, 0.0, torch.Generator().manual_seed(7)))
    g = torch.Generator().manual_seed(7)  # the same draws, in the step's order: lam, then the permutation
    lam = float(sample_beta(2.0, 1, g)[0])
    order = randperm_partner(16, g)
    partner = loop_kmixup_partners(x, order.tolist(), 8)
    x_mix = torch.stack([lam * x[b] + (1 - lam) * x[partner[b]] for b in range(16)])
    y_mix = torch.stack([lam * y[b] + (1 - lam) * y[partner[b]] for b in range(16)])
    assert out["lam"] == lam
    torch.testing.assert_close(model.seen, x_mix)
    torch.testing.assert_close(out["loss"], ((x_mix @ model.weight - y_mix) ** 2).mean())
    out["loss"].backward()
    assert model.weight.grad is not None and float(model.weight.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------------------ Local Mixup
def test_local_weights_equal_a_loop():
    x, _ = batch(10, 4, seed=1)
    x2 = x.flip(0)
    for weight, kwargs in (("threshold", {"epsilon": 0.8, "decay": 0.0}), ("exp", {"epsilon": 1.0, "decay": 2.5})):
        w = local_weights(x, x2, weight, **kwargs)
        for b in range(10):
            d = math.dist(x[b].tolist(), x2[b].tolist())
            expected = float(d <= kwargs["epsilon"]) if weight == "threshold" else math.exp(-kwargs["decay"] * d)
            assert float(w[b]) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ReproError, match="threshold, exp"):
        local_weights(x, x2, "gaussian", 1.0, 1.0)


def test_weighted_mse_equals_a_loop_and_an_empty_graph_gives_zero():
    pred, target = torch.randn(6, 2), torch.randn(6, 2)
    w = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.25])
    per = [float(((pred[b] - target[b]) ** 2).mean()) for b in range(6)]
    expected = sum(w[b].item() * per[b] for b in range(6)) / w.sum().item()
    assert float(weighted_mse(pred, target, w)) == pytest.approx(expected, rel=1e-6)
    p = pred.clone().requires_grad_(True)
    zero = weighted_mse(p, target, torch.zeros(6))
    zero.backward()
    assert float(zero.detach()) == 0.0 and float(p.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("epsilon", [0.6, 1e-9, 1e9])
def test_local_mixup_step_equals_the_longhand_computation(epsilon):
    x, y = batch(16, 5, seed=2)
    method = build_method({"name": "local_mixup", "alpha": 2.0, "weight": "threshold", "epsilon": epsilon},
                          num_classes=1, task="regression")
    method.prepare(None, INFO)
    model = Recorder(5)
    out = method.step(model, (x, y), StepContext(0, 0, 0.0, torch.Generator().manual_seed(3)))
    g = torch.Generator().manual_seed(3)
    lam = float(sample_beta(2.0, 1, g)[0])
    partner = randperm_partner(16, g).tolist()
    rows, weights = [], []
    for b in range(16):
        x_mix = lam * x[b] + (1 - lam) * x[partner[b]]
        y_mix = lam * y[b] + (1 - lam) * y[partner[b]]
        rows.append(float(((x_mix @ model.weight.detach() - y_mix) ** 2).mean()))
        weights.append(float(math.dist(x[b].tolist(), x[partner[b]].tolist()) <= epsilon))
    expected = sum(w * r for w, r in zip(weights, rows, strict=True)) / sum(weights) if sum(weights) else 0.0
    assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-5)
    assert float(out["local_fraction"]) == pytest.approx(np.mean(weights))
    if epsilon == 1e9:  # every pair counts: plain in-batch mixup
        assert float(out["loss"].detach()) == pytest.approx(np.mean(rows), rel=1e-5)


def test_baselines_validate_their_options_and_task():
    for options in ({"name": "k_mixup", "k": 0}, {"name": "k_mixup", "alpha": 0.0},
                    {"name": "local_mixup", "weight": "knn"}, {"name": "local_mixup", "epsilon": 0.0},
                    {"name": "local_mixup", "decay": -1.0}):
        with pytest.raises(ReproError):
            build_method(options, num_classes=1, task="regression")
    method = build_method({"name": "local_mixup"}, num_classes=10, task="classification")
    with pytest.raises(ReproError, match="regression"):
        method.prepare(None, DataInfo("toy", "classification", 10, 32, None, None, "test"))
    with pytest.raises(ReproError, match="label_smoothing"):
        build_method({"name": "k_mixup"}, num_classes=1, label_smoothing=0.1, task="regression")
