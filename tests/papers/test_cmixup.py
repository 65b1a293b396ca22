"""C-Mixup (papers/cmixup): the kernel, the inverse-CDF partner draw, the official NumPy order, the step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.data import DataInfo, TabularDataset
from common.errors import ReproError
from common.methods import StepContext, build_method
from common.models import build_model
from papers.cmixup import official_draws, pair_probabilities, pair_probability_rows, sample_partners

INFO = DataInfo("toy", "regression", 1, None, None, None, "test")


def loop_probabilities(labels: np.ndarray, bandwidth: float) -> np.ndarray:
    """The official `get_mixup_sample_rate` written out: one Gaussian density row per example, normalised."""
    y = np.asarray(labels, dtype=np.float32).astype(np.float64).reshape(len(labels), -1)
    out = np.zeros((len(y), len(y)))
    for i in range(len(y)):
        for j in range(len(y)):
            d2 = sum((y[i, k] - y[j, k]) ** 2 for k in range(y.shape[1]))
            # KernelDensity.score_samples: log of a normalised Gaussian; the constant cancels below
            out[i, j] = math.exp(-d2 / (2 * bandwidth**2) - math.log(bandwidth * math.sqrt(2 * math.pi)))
        out[i] /= out[i].sum()
    return out


@pytest.fixture
def labels():
    return np.random.default_rng(0).normal(120.0, 6.0, size=40)  # Airfoil-like dB values


def test_kernel_matches_the_official_formula_elementwise(labels):
    p = pair_probabilities(labels, 1.75)
    assert p.shape == (40, 40) and p.dtype == np.float64
    np.testing.assert_allclose(p, loop_probabilities(labels, 1.75), rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=0, atol=1e-12)
    assert (p.argmax(1) == np.arange(40)).all()  # self is the row maximum
    vec = np.random.default_rng(1).normal(size=(12, 3))  # vector labels: Euclidean distance
    np.testing.assert_allclose(pair_probabilities(vec, 0.8), loop_probabilities(vec, 0.8), rtol=1e-9)


def test_kernel_limits(labels):
    np.testing.assert_allclose(pair_probabilities(labels, float("inf")), np.full((40, 40), 1 / 40), rtol=1e-12)
    np.testing.assert_array_equal(pair_probabilities(labels, 1e-6), np.eye(40))  # C-Mixup -> ERM
    dup = np.array([1.0, 1.0, 5.0])  # exact duplicates share the mass
    np.testing.assert_allclose(pair_probabilities(dup, 1e-6)[0], [0.5, 0.5, 0.0])
    with pytest.raises(ReproError, match="bandwidth must be > 0"):
        pair_probabilities(labels, 0.0)


def test_rows_on_the_fly_equal_the_dense_matrix(labels):
    dense = pair_probabilities(labels, 1.75)
    batch = np.array([3, 17, 3, 39])
    rows = pair_probability_rows(torch.tensor(labels[batch], dtype=torch.float32), labels, 1.75)
    np.testing.assert_array_equal(rows.numpy(), dense[batch])  # bit-identical, not merely close


def test_partner_draw_equals_numpy_choice(labels):
    p = pair_probabilities(labels, 1.75)
    anchors = np.arange(40).repeat(5)
    rng = np.random.RandomState(7)
    expected = [rng.choice(40, p=p[i]) for i in anchors]  # the official call, sequential on one stream
    uniforms = np.random.RandomState(7).random_sample(len(anchors))  # choice draws one uniform each
    ours = sample_partners(p[anchors], uniforms)
    assert ours.dtype == torch.int64 and ours.tolist() == expected
    # searchsorted side='right': a uniform exactly on a cdf step goes to the next index
    assert sample_partners(np.array([[0.25, 0.25, 0.5]]), np.array([0.25])).tolist() == [1]
    assert sample_partners(np.array([[0.25, 0.25, 0.5]]), np.array([0.0])).tolist() == [0]


def test_partner_frequencies_follow_the_row(labels):
    p = pair_probabilities(labels, 3.0)
    u = torch.rand(50_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = sample_partners(np.repeat(p[5:6], len(u), axis=0), u)
    freq = np.bincount(draws.numpy(), minlength=40) / len(u)
    keep = p[5] * len(u) >= 5
    chi2 = (((freq - p[5]) ** 2 / p[5])[keep]).sum() * len(u)
    assert chi2 < 80  # ~ chi-square with < 40 dof; the 1e-6 quantile is ~ 87


def test_official_draws_replay_the_official_loop(labels):
    p = pair_probabilities(labels, 1.75)
    np.random.seed(3)  # the official train(): global NumPy stream
    shuffle_idx = np.random.permutation(np.arange(40))
    official = []
    for k in range(40 // 16):
        lam = np.random.beta(2.0, 2.0)
        idx_1 = shuffle_idx[k * 16:(k + 1) * 16]
        idx_2 = np.array([np.random.choice(np.arange(40), p=p[i]) for i in idx_1])
        official.append((idx_1, lam, idx_2))
    ours = official_draws(np.random.RandomState(3), p, 16, 2.0, "kde")
    assert len(ours) == 2  # N // B batches, last partial batch dropped
    for (a1, al, a2), (b1, bl, b2) in zip(official, ours, strict=True):
        assert (a1 == b1).all() and al == bl and (a2 == b2).all()
    np.random.seed(4)
    perm = np.random.permutation(40)
    lam = np.random.beta(2.0, 2.0)
    uniform = [np.random.choice(np.arange(40)) for _ in range(16)]  # mixtype=random
    (b1, bl, b2), _ = official_draws(np.random.RandomState(4), p, 16, 2.0, "random")
    assert (b1 == perm[:16]).all() and bl == lam and b2.tolist() == uniform


# ----------------------------------------------------------------------------------------------- the step
def toy_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 5, generator=g, dtype=torch.float64).numpy()
    y = (100 + 20 * x[:, 0] + torch.randn(n, generator=g, dtype=torch.float64).numpy())
    return TabularDataset(x, y, np.zeros(5), np.ones(5))


def make(name, **options):
    method = build_method({"name": name, **options}, num_classes=1, task="regression")
    data = toy_data()
    method.prepare(data, INFO)
    return method, data


class Recorder(torch.nn.Module):
    """Records what the step feeds the model; the prediction is the first input column."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen = None

    def forward(self, x):
        self.seen = x
        return x[:, :1] * self.scale


@pytest.mark.parametrize("name,options", [
    ("mixup_regression", {}), ("cmixup", {"bandwidth": 5.0}), ("cmixup_batch", {"bandwidth": 5.0})])
def test_input_mixing_matches_a_loop(name, options):
    method, data = make(name, **options)
    x, y = data.features[:16], data.targets[:16]
    lam, partner = method.draw(y, torch.Generator().manual_seed(1))
    model = Recorder()
    out = method.step(model, (x, y), StepContext(0, 0, 0.0, torch.Generator().manual_seed(1)))
    assert 0 < lam < 1 and out["lam"] == lam
    if name == "cmixup_batch":
        uniform, pooled = partner
        pool = list(range(16)) + [None] * 16
        sources = [(x[b], y[b]) if b < 16 else data[int(uniform[b - 16])] for b in pooled.tolist()]
        assert pooled.max() < 32 and len(pool) == 32
    else:
        sources = [data[int(j)] for j in partner]
    for b in range(16):
        x2, y2 = sources[b]
        torch.testing.assert_close(model.seen[b], lam * x[b] + (1 - lam) * x2, rtol=0, atol=1e-5)
        lo, hi = sorted((float(y[b]), float(y2)))
        y_mix = lam * float(y[b]) + (1 - lam) * float(y2)
        assert lo - 1e-4 <= y_mix <= hi + 1e-4
    pred = model.seen[:, :1]
    y_mix = torch.stack([lam * y[b] + (1 - lam) * sources[b][1] for b in range(16)])
    torch.testing.assert_close(out["loss"], ((pred - y_mix) ** 2).mean(), rtol=1e-5, atol=1e-5)


def test_kernel_partners_are_close_in_label_and_uniform_ones_are_not():
    gaps = {}
    for name in ("mixup_regression", "cmixup"):
        method, data = make(name, bandwidth=0.5)
        g = torch.Generator().manual_seed(0)
        gaps[name] = np.mean([method.step(Recorder(), (data.features[:32], data.targets[:32]),
                                          StepContext(0, 0, 0.0, g))["partner_label_gap"].item() for _ in range(20)])
    assert gaps["cmixup"] < 0.5 * gaps["mixup_regression"]


def test_tiny_bandwidth_is_erm_on_the_batch():
    method, data = make("cmixup", bandwidth=1e-6, manifold=True)
    torch.manual_seed(0)
    model = build_model("mlp_regression", num_classes=1, in_features=5)
    x, y = data.features[:16], data.targets[:16]
    out = method.step(model, (x, y), StepContext(0, 0, 0.0, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(out["loss"], ((model(x) - y) ** 2).mean())


def test_manifold_mixing_mixes_after_block_1():
    method, data = make("manifold_mixup_regression")
    torch.manual_seed(0)
    model = build_model("mlp_regression", num_classes=1, in_features=5)
    x, y = data.features[:16], data.targets[:16]
    lam, partner = method.draw(y, torch.Generator().manual_seed(2))
    out = method.step(model, (x, y), StepContext(0, 0, 0.0, torch.Generator().manual_seed(2)))
    x2 = data.features[partner]
    h = lam * model.block_1(x) + (1 - lam) * model.block_1(x2)
    torch.testing.assert_close(out["logits"], model.head(model.block_2(h)))
    # forward_mixup(x, x, lam) == forward(x); lam = 1 gives forward(x1)
    torch.testing.assert_close(model.head(model.block_2(lam * model.block_1(x) + (1 - lam) * model.block_1(x))),
                               model(x), rtol=1e-5, atol=1e-4)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_same_generator_same_step_and_subset_labels():
    from torch.utils.data import Subset

    method, data = make("cmixup", bandwidth=2.0)
    args = (data.features[:8], data.targets[:8])
    a = method.draw(args[1], torch.Generator().manual_seed(5))
    b = method.draw(args[1], torch.Generator().manual_seed(5))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    sub = build_method({"name": "cmixup"}, num_classes=1, task="regression")
    sub.prepare(Subset(data, [4, 2, 9]), INFO)
    torch.testing.assert_close(sub.labels, data.targets[[4, 2, 9]])
    torch.testing.assert_close(sub.features, data.features[[4, 2, 9]])


def test_bad_inputs_fail_clearly():
    with pytest.raises(ReproError, match="partners must be one of"):
        build_method({"name": "cmixup", "partners": "knn"}, num_classes=1)
    with pytest.raises(ReproError, match="bandwidth must be > 0"):
        build_method({"name": "cmixup", "bandwidth": -1.0}, num_classes=1)
    method = build_method({"name": "cmixup"}, num_classes=10)  # building for a classification task is allowed
    with pytest.raises(ReproError, match="mixes regression targets"):
        method.prepare(toy_data(), DataInfo("cifar10", "classification", 10, 32, None, None, "x"))
    manifold = build_method({"name": "cmixup", "manifold": True}, num_classes=1, task="regression")
    with pytest.raises(ReproError, match="block_1, block_2 and forward_head"):
        manifold.check_model(torch.nn.Linear(5, 1))


def test_kernel_rows_of_wide_labels_are_summed_in_chunks_exactly(monkeypatch):
    """Label vectors wide enough to be chunked give the same rows as the one-shot formula."""
    from papers.cmixup import method as cm

    gen = torch.Generator().manual_seed(0)
    # float32 draws: the kernel works on float32 labels widened to float64, as the official code's labels
    anchors, pool = torch.randn(64, 300, generator=gen).double(), torch.randn(4000, 300, generator=gen).double()
    rows = cm.pair_probability_rows(anchors, pool, bandwidth=12.0)  # 64 * 4000 = 256k per dim: 256 dims a chunk
    sq = ((anchors[:, None, :] - pool[None, :, :]) ** 2).sum(-1)
    want = torch.exp(-sq / (2 * 12.0**2))
    torch.testing.assert_close(rows, want / want.sum(1, keepdim=True), rtol=1e-12, atol=1e-15)
