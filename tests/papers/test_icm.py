"""ICM (specs/icm.md §2, §3, §3.1, §6, §7): the pairing and batch functions of papers/icm/method.py against
plain loops written here, the invariants of §7, the losses against per-example formulas, the exact Mixup noise
rate of §6 and parity on fixed draws with the official `aug_intra_class` / `mixup_cl_data_count_error`
(maitanha/cll_ot 0946ff2, run from the mirrored snapshot) and the official `train_icm` loss expressions.

The data tests (idx files, CL draws, long tail, clusters, dataset registry) are in test_icm_data.py.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import papers.icm.method as icm_method
from common.errors import ReproError
from common.methods import StepContext, build_method
from papers.icm.data import uniform_complementary_labels
from papers.icm.method import (
    cll_loss,
    cluster_partners,
    empirical_transition,
    expected_mixup_noise,
    flip_crop,
    icm_batch,
    pair_noise,
    uniform_transition,
)
from papers.icm.model import MLPCLL

K = 10
OFFICIAL_GIT = Path(os.environ.get("ICM_OFFICIAL_GIT", "/work/.mirror/maitanha+cll_ot/repo"))
OFFICIAL_COMMIT = "0946ff2"  # the commit specs/icm.md cites


# ------------------------------------------------------------------------------------------------- helpers
def toy_cll(batch: int, seed: int, dim: int = 12, num_classes: int = K):
    """Random inputs, true labels and uniform complementary labels (cl != y) from a fixed generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g)
    y = torch.randint(num_classes, (batch,), generator=g)
    cl = (y + torch.randint(1, num_classes, (batch,), generator=g)) % num_classes
    return x, y, cl, g


def loop_partners(clusters: list[int], uniforms: list[float]) -> tuple[list[int], list[bool]]:
    """The straightforward draw: member floor(u m) of i's cluster (batch order, i included); alone: i."""
    partners, paired = [], []
    for i, c in enumerate(clusters):
        members = [r for r in range(len(clusters)) if clusters[r] == c]
        m = len(members)
        partners.append(members[math.floor(uniforms[i] * m)] if m >= 2 else i)
        paired.append(m >= 2)
    return partners, paired


class Recorder(nn.Module):
    """Wraps a model and keeps the last input it saw."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.seen = model, None

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.model(x)


def ctx(seed: int = 0) -> StepContext:
    return StepContext(epoch=0, step=0, progress=0.0, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ cluster_partners
def test_cluster_partners_equals_plain_loop_and_stays_in_cluster():
    g = torch.Generator().manual_seed(1)
    clusters = torch.randint(6, (40,), generator=g)
    clusters[[3, 17]] = torch.tensor([50, 51])  # two rows alone in their cluster
    uniforms = torch.rand(40, generator=g, dtype=torch.float64)
    uniforms[0], uniforms[1] = 0.0, 1.0 - 1e-12  # the two ends of [0, 1)
    partners, paired = cluster_partners(clusters, uniforms)
    want_partners, want_paired = loop_partners(clusters.tolist(), uniforms.tolist())
    assert partners.tolist() == want_partners
    assert paired.tolist() == want_paired
    assert torch.equal(clusters[partners], clusters)  # every partner shares i's cluster
    assert not paired[3] and not paired[17] and int(paired.sum()) == 38
    assert partners[3] == 3 and partners[17] == 17


def test_cluster_partners_one_cluster_is_uniform_over_batch():
    g = torch.Generator().manual_seed(2)
    batch = 64
    uniforms = torch.rand(batch, generator=g, dtype=torch.float64)
    partners, paired = cluster_partners(torch.full((batch,), 7), uniforms)
    assert partners.tolist() == [math.floor(u * batch) for u in uniforms.tolist()]
    assert bool(paired.all())


def test_cluster_partners_unsorted_ids_and_negative_ids():
    clusters = torch.tensor([5, -1, 5, 2, -1, 5, 9])
    uniforms = torch.tensor([0.9, 0.2, 0.1, 0.5, 0.7, 0.5, 0.3], dtype=torch.float64)
    partners, paired = cluster_partners(clusters, uniforms)
    want_partners, want_paired = loop_partners(clusters.tolist(), uniforms.tolist())
    assert partners.tolist() == want_partners == [5, 1, 0, 3, 4, 2, 6]
    assert paired.tolist() == want_paired


# --------------------------------------------------------------------------------------- §7: one cluster
def test_icm_mix_one_cluster_pairs_as_mixup_on_the_same_draws():
    """With all cluster ids equal and the quirk-1 weight off, icm_mix is Mixup: x = (1 - lam) x_i + lam x_j,
    i.e. Mixup's lam' x_i + (1 - lam') x_j with lam' = 1 - lam, on the same partners."""
    x, _, cl, g = toy_cll(64, seed=5)
    uniforms = torch.rand(64, generator=g, dtype=torch.float64)
    partners, paired = cluster_partners(torch.zeros(64, dtype=torch.long), uniforms)
    assert (partners == torch.arange(64)).any()  # the draw includes j = i, the case the quirk changes
    lam = 0.3
    mixed, target = icm_batch(x, cl, partners, paired, lam, K, mix_inputs=True, duplicate_weight=False)
    for i in range(64):
        j = int(partners[i])
        torch.testing.assert_close(mixed[i], (1 - lam) * x[i] + lam * x[j])
        mixup_lam = 1 - lam
        torch.testing.assert_close(mixed[i], mixup_lam * x[i] + (1 - mixup_lam) * x[j])
        want = torch.zeros(K)
        want[cl[i]] += 1 - lam
        want[cl[j]] += lam
        torch.testing.assert_close(target[i], want)


def test_icm_mix_default_matches_mixup_on_distinct_pairs():
    """Official defaults (duplicate weight on): rows whose partner is another image mix exactly as Mixup."""
    x, _, cl, g = toy_cll(64, seed=4)
    partners, paired = cluster_partners(torch.zeros(64, dtype=torch.long), torch.rand(64, generator=g,
                                                                                          dtype=torch.float64))
    lam = 0.3
    mixed, _ = icm_batch(x, cl, partners, paired, lam, K, mix_inputs=True)
    distinct = partners != torch.arange(64)
    assert int(distinct.sum()) > 50
    want = (1 - lam) * x + lam * x[partners]
    torch.testing.assert_close(mixed[distinct], want[distinct])


def test_icm_mix_self_pair_keeps_the_image():
    x, _, cl, _ = toy_cll(8, seed=5)
    partners = torch.tensor([0, 2, 1, 3, 5, 4, 7, 6])  # rows 0 and 3 are paired with themselves
    paired = torch.ones(8, dtype=torch.bool)
    lam = 0.3
    mixed, _ = icm_batch(x, cl, partners, paired, lam, K, mix_inputs=True)
    torch.testing.assert_close(mixed[0], x[0])
    torch.testing.assert_close(mixed[3], x[3])


# ------------------------------------------------------------------------------------ §7: icm_official
def quirk_batch():
    """32 rows in 4 clusters, two rows alone, a duplicated image pair, and partners with j = i."""
    x, y, cl, _ = toy_cll(32, seed=6)
    clusters = torch.arange(32) % 4
    clusters[[5, 9]] = torch.tensor([40, 41])  # alone
    x[12] = x[8]  # a duplicate image, same cluster (8 % 4 == 12 % 4)
    cl[12] = (cl[8] + 1) % K if (cl[8] + 1) % K != y[12] else (cl[8] + 2) % K
    partners = torch.tensor([(i + 4) % 32 for i in range(32)])
    partners[[5, 9]] = torch.tensor([5, 9])
    partners[[1, 2]] = torch.tensor([1, 2])  # j = i
    partners[8] = 12  # the duplicate
    partners[[15, 19]] = torch.tensor([23, 27])
    partners = torch.where(clusters[partners] == clusters, partners, torch.arange(32))
    paired = torch.ones(32, dtype=torch.bool)
    paired[[5, 9]] = False
    return x, y, cl, clusters, partners, paired


def test_icm_official_invariants_and_quirks():
    x, _, cl, _, partners, paired = quirk_batch()
    lam = 0.27
    mixed, target = icm_batch(x, cl, partners, paired, lam, K, mix_inputs=False)
    assert torch.equal(mixed[paired], x[paired])  # bit-identical inputs
    assert torch.equal(mixed[~paired], torch.zeros_like(x[~paired]))  # quirk 2: the row is zeroed
    assert torch.equal(target[~paired], torch.zeros(2, K))  # quirk 2: zero target
    identical = (x == x[partners]).all(dim=1)
    assert identical[[1, 2, 8]].all() and int(identical[paired].sum()) == 3
    sums = target.sum(dim=1)
    for i in range(32):
        if not paired[i]:
            continue
        j = int(partners[i])
        want = torch.zeros(K)
        want[cl[i]] += 1 - lam
        want[cl[j]] += (1 - lam) if identical[i] else lam
        torch.testing.assert_close(target[i], want)
        if i == j:  # quirk 1: 2 (1 - lam) on cl_i
            assert target[i, cl[i]].item() == pytest.approx(2 * (1 - lam))
            assert sums[i].item() == pytest.approx(2 * (1 - lam))
        elif identical[i]:  # a duplicate image: its CL also weighs 1 - lam
            assert target[i, cl[j]].item() == pytest.approx(1 - lam) and cl[i] != cl[j]
            assert sums[i].item() == pytest.approx(2 * (1 - lam))
        else:
            assert sums[i].item() == pytest.approx(1.0)


def test_icm_official_quirks_switched_off():
    x, _, cl, _, partners, paired = quirk_batch()
    lam = 0.27
    mixed, target = icm_batch(x, cl, partners, paired, lam, K, mix_inputs=False, duplicate_weight=False,
                              zero_alone=False)
    assert torch.equal(mixed, x)
    torch.testing.assert_close(target.sum(dim=1), torch.ones(32))
    torch.testing.assert_close(target[~paired], F.one_hot(cl[~paired], K).float())
    # j = i: (1 - lam) + lam on cl_i
    torch.testing.assert_close(target[[1, 2]], F.one_hot(cl[[1, 2]], K).float())
    assert target[8, cl[12]].item() == pytest.approx(lam)  # the duplicate's CL weighs lam again
    # each switch alone
    mixed, target = icm_batch(x, cl, partners, paired, lam, K, mix_inputs=False, zero_alone=False)
    assert torch.equal(mixed, x) and target[1, cl[1]].item() == pytest.approx(2 * (1 - lam))
    mixed, target = icm_batch(x, cl, partners, paired, lam, K, mix_inputs=False, duplicate_weight=False)
    assert torch.equal(mixed[~paired], torch.zeros(2, x.shape[1]))
    torch.testing.assert_close(target[paired].sum(dim=1), torch.ones(30))


def test_icm_mix_weights_each_image_by_its_label_weight():
    """icm_mix on distinct pairs: x = (1 - lam) x_i + lam x_j and the CL weights are the same numbers."""
    x, _, cl, _, partners, paired = quirk_batch()
    lam = 0.27
    mixed, target = icm_batch(x, cl, partners, paired, lam, K, mix_inputs=True)
    for i in range(32):
        j = int(partners[i])
        if not paired[i]:
            assert torch.equal(mixed[i], torch.zeros(x.shape[1]))
        elif i != j and not torch.equal(x[i], x[j]):
            torch.testing.assert_close(mixed[i], (1 - lam) * x[i] + lam * x[j])
            if cl[i] != cl[j]:
                assert target[i, cl[i]].item() == pytest.approx(1 - lam)
                assert target[i, cl[j]].item() == pytest.approx(lam)


# ------------------------------------------------------------------------------------------ §7: noise
def loop_noise(cl, y, partners):
    return [bool(cl[i] == y[j] or cl[j] == y[i]) for i, j in enumerate(partners.tolist())]


def test_pair_noise_equals_plain_loop():
    _, y, cl, g = toy_cll(200, seed=7)
    partners = torch.randint(200, (200,), generator=g)
    assert pair_noise(cl, y, partners).tolist() == loop_noise(cl, y, partners)


def test_pure_clusters_carry_no_noise():
    _, y, cl, g = toy_cll(4096, seed=8)
    partners, paired = cluster_partners(y, torch.rand(4096, generator=g, dtype=torch.float64))
    assert bool(paired.all())
    assert int(pair_noise(cl, y, partners).sum()) == 0


def test_pure_clusters_step_reports_zero_noise_rate():
    x, y, cl, _ = toy_cll(512, seed=9, dim=6)
    arm = build_method({"name": "icm_official", "augment": False}, num_classes=K)
    torch.manual_seed(0)
    model = MLPCLL(in_features=6, hidden_dim=4)
    for step in range(3):
        arm.step(model, (x, torch.stack([cl, y, y], dim=1)), ctx(step))
    stats = arm.epoch_stats()
    assert stats["noise_rate"] == 0.0 and stats["pairs"] == 3 * 512 and stats["alone_share"] == 0.0


def test_random_clusters_return_to_the_mixup_rate():
    """Cluster ids independent of the labels: a pair j != i is noisy with Mixup's probability
    r = 2/K - 1/(K(K-1)); j = i (probability 1/m in a cluster of m) never is. Expected rate
    sum_i r (1 - 1/m_i) / n, tolerance 4 SD."""
    n = 60_000
    g = torch.Generator().manual_seed(10)
    y = torch.randint(K, (n,), generator=g)
    cl = (y + torch.randint(1, K, (n,), generator=g)) % K
    clusters = torch.randint(30, (n,), generator=g)
    partners, paired = cluster_partners(clusters, torch.rand(n, generator=g, dtype=torch.float64))
    rate = pair_noise(cl, y, partners)[paired].double().mean().item()
    sizes = torch.bincount(clusters).double()[clusters]
    expected = (expected_mixup_noise(K) * (1 - 1 / sizes)).mean().item()
    sd = math.sqrt(expected * (1 - expected) / n)
    assert abs(rate - expected) < 4 * sd, (rate, expected, sd)
    assert abs(rate - expected_mixup_noise(K)) < 0.01  # and that is the Mixup rate
    pure_rate = pair_noise(cl, y, cluster_partners(y, torch.rand(n, generator=g, dtype=torch.float64))[0])
    assert rate > 0.15 and int(pure_rate.sum()) == 0


# ---------------------------------------------------------------------------------------- §6 exact check
def test_expected_mixup_noise_formula_by_enumeration():
    """P(cl_i = y_j or cl_j = y_i) for independent (y, cl) pairs, y uniform, cl uniform over the others,
    enumerated exactly over all K^2 (K-1)^2 cases."""
    noisy = total = 0
    for yi in range(K):
        for ci in range(K):
            for yj in range(K):
                for cj in range(K):
                    if ci == yi or cj == yj:
                        continue
                    total += 1
                    noisy += ci == yj or cj == yi
    assert expected_mixup_noise(K) == pytest.approx(noisy / total, abs=1e-12)
    assert expected_mixup_noise(K) == pytest.approx(2 / K - 1 / (K * (K - 1)), abs=1e-12)
    assert round(expected_mixup_noise(K), 5) == 0.18889
    assert round(expected_mixup_noise(K, 512), 5) == 0.18852
    assert expected_mixup_noise(K, 512) == pytest.approx(noisy / total * 511 / 512, abs=1e-12)


def test_cll_mixup_step_measures_the_exact_rate():
    """The project's Mixup arm on synthetic batches (y uniform, CLs drawn by uniform_complementary_labels):
    epoch_stats()['noise_rate'] within 4 binomial SDs of 2/K - 1/(K(K-1)) times 1 - 1/B."""
    batch, steps, dim = 512, 120, 4
    g = torch.Generator().manual_seed(11)
    labels = torch.randint(K, (batch * steps,), generator=g)
    comp = torch.from_numpy(uniform_complementary_labels(labels.numpy(), K, seed=5))
    assert bool((comp != labels).all())
    arm = build_method({"name": "cll_mixup", "augment": False}, num_classes=K)
    torch.manual_seed(0)
    model = MLPCLL(in_features=dim, hidden_dim=4)
    context = ctx(12)
    x = torch.randn(batch, dim, generator=g)
    with torch.no_grad():
        for s in range(steps):
            y, cl = labels[s * batch:(s + 1) * batch], comp[s * batch:(s + 1) * batch]
            arm.step(model, (x, torch.stack([cl, y, torch.zeros_like(y)], dim=1)), context)
    stats = arm.epoch_stats()
    n = batch * steps
    expected = expected_mixup_noise(K, batch)
    sd = math.sqrt(expected * (1 - expected) / n)
    assert stats["pairs"] == n
    assert abs(stats["noise_rate"] - expected) < 4 * sd, (stats["noise_rate"], expected, sd)


# ------------------------------------------------------------------------------------------------- losses
def per_example_losses(logits, target, loss, q=None):
    """Spec §2 written out row by row (float32 scalars, as the official expressions compute them)."""
    p = F.softmax(logits.float(), dim=1)
    out = []
    for i in range(len(logits)):
        if target.dim() == 1:
            c = int(target[i])
            if loss == "scl_nl":
                out.append(-torch.log(1 - p[i, c] + 1e-6))
            elif loss == "scl_exp":
                out.append(torch.exp(p[i, c]))
            else:
                pq = sum(p[i, k] * q[k, c] for k in range(p.shape[1]))
                out.append(-torch.log(pq.clamp(1e-8, 1 - 1e-8)))
        else:
            total = torch.tensor(0.0)
            for c in range(p.shape[1]):
                t = target[i, c]
                if loss == "scl_nl":
                    total = total - t * torch.log(torch.clamp(1 - p[i, c], 1e-6, 1 - 1e-6))
                elif loss == "scl_exp":
                    total = total + t * torch.exp(p[i, c])
                else:
                    pq = sum(p[i, k] * q[k, c] for k in range(p.shape[1]))
                    total = total - t * torch.log(pq.clamp(1e-8, 1 - 1e-8))
            out.append(total)
    return torch.stack(out)


@pytest.mark.parametrize("loss", ["scl_nl", "scl_exp", "fwd"])
def test_cll_loss_equals_per_example_formulas(loss):
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(12, K, generator=g) * 3
    logits[0, 4] = 40.0  # p_cl ~ 1: SCL-NL's epsilon decides the value
    logits[1, 2] = -40.0  # p_cl ~ 0
    hard = torch.randint(K, (12,), generator=g)
    hard[0], hard[1] = 4, 2
    soft = torch.rand(12, K, generator=g) * (torch.rand(12, K, generator=g) < 0.3)
    q = empirical_transition(torch.randint(K, (300,), generator=g), torch.randint(K, (300,), generator=g), K)
    transition = q if loss == "fwd" else None
    torch.testing.assert_close(cll_loss(logits, hard, loss, transition),
                               per_example_losses(logits, hard, loss, q), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cll_loss(logits, soft, loss, transition),
                               per_example_losses(logits, soft, loss, q), rtol=1e-5, atol=1e-6)


def test_scl_nl_epsilon_handling_hard_vs_soft():
    """Hard: -log(1 - p + 1e-6), negative when p_cl = 0 and -log(1e-6) when p_cl = 1; soft: the clamp to
    [1e-6, 1 - 1e-6], positive when p_cl = 0 and the same -log(1e-6) when p_cl = 1."""
    logits = torch.full((2, K), 0.0)
    logits[0, 3] = 100.0  # p_3 = 1
    logits[1, 3] = -100.0  # p_3 = 0
    cl = torch.tensor([3, 3])
    hard = cll_loss(logits, cl, "scl_nl")
    soft = cll_loss(logits, F.one_hot(cl, K).float(), "scl_nl")
    assert hard[0].item() == pytest.approx(-math.log(1e-6), rel=1e-3)
    assert soft[0].item() == pytest.approx(-math.log(1e-6), rel=1e-3)
    assert hard[1].item() < 0 < soft[1].item()
    assert hard[1].item() == pytest.approx(-math.log1p(1e-6), rel=0.1)
    assert soft[1].item() == pytest.approx(-math.log1p(-1e-6), rel=0.1)


def test_scl_exp_soft_equals_weighted_hard_and_bad_loss_names():
    g = torch.Generator().manual_seed(14)
    logits = torch.randn(6, K, generator=g)
    a, b = torch.randint(K, (6,), generator=g), torch.randint(K, (6,), generator=g)
    lam = 0.35
    soft = lam * F.one_hot(a, K).float() + (1 - lam) * F.one_hot(b, K).float()
    for loss, q in (("scl_exp", None), ("fwd", uniform_transition(K))):
        mixed = lam * cll_loss(logits, a, loss, q) + (1 - lam) * cll_loss(logits, b, loss, q)
        torch.testing.assert_close(cll_loss(logits, soft, loss, q), mixed)
    with pytest.raises(ReproError, match="transition"):
        cll_loss(logits, a, "fwd")
    with pytest.raises(ReproError, match="scl_nl"):
        cll_loss(logits, a, "scl_lin")


def test_transitions():
    u = uniform_transition(4)
    assert torch.equal(u.diagonal(), torch.zeros(4)) and torch.allclose(u.sum(dim=1), torch.ones(4))
    assert u[0, 1].item() == pytest.approx(1 / 3)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    comp = torch.tensor([1, 1, 2, 0, 2, 1])
    want = torch.zeros(3, 3)
    for y_, c_ in zip(labels.tolist(), comp.tolist(), strict=True):
        want[y_, c_] += 1
    want = want / want.sum(dim=1, keepdim=True)
    torch.testing.assert_close(empirical_transition(labels, comp, 3), want)


# ----------------------------------------------------------------------------------------------- flip_crop
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_flip_crop_equals_per_image_loop(shape):
    c, h, w = shape
    g = torch.Generator().manual_seed(15)
    images = torch.randn(7, c * h * w, generator=g)
    state = g.get_state()
    out = flip_crop(images, g) if shape == (1, 28, 28) else flip_crop(images, g, shape)
    assert out.shape == (7, c * h * w)
    # the same draws, in the function's order: flips for all, row offsets for all, column offsets for all
    g.set_state(state)
    flips = torch.rand(7, generator=g) < 0.5
    rows = torch.randint(9, (7,), generator=g)
    cols = torch.randint(9, (7,), generator=g)
    assert 0 < int(flips.sum()) < 7
    for i in range(7):
        img = images[i].view(1, c, h, w)
        if flips[i]:
            img = torch.flip(img, dims=[3])
        padded = F.pad(img, (4, 4, 4, 4), mode="reflect")
        want = padded[0, :, rows[i]:rows[i] + h, cols[i]:cols[i] + w].reshape(c * h * w)
        assert torch.equal(out[i], want), i


def test_flip_crop_centre_crop_without_flip_is_identity():
    """Sanity of the offsets: an image whose draws give no flip and offset (4, 4) comes back unchanged."""
    images = torch.randn(200, 784, generator=torch.Generator().manual_seed(16))
    g = torch.Generator().manual_seed(17)
    state = g.get_state()
    out = flip_crop(images, g)
    g.set_state(state)
    flips = torch.rand(200, generator=g) < 0.5
    rows, cols = torch.randint(9, (200,), generator=g), torch.randint(9, (200,), generator=g)
    centre = (~flips) & (rows == 4) & (cols == 4)
    assert centre.any()
    assert torch.equal(out[centre], images[centre])
    moved = (~flips) & (rows != 4)
    assert not torch.equal(out[moved], images[moved])


# --------------------------------------------------------------------------------- official code, fixed draws
@pytest.fixture(scope="module")
def official_source():
    if not OFFICIAL_GIT.exists():
        pytest.skip(f"official ICM snapshot (maitanha/cll_ot) not at {OFFICIAL_GIT}: fetch it or set "
                    "ICM_OFFICIAL_GIT")
    shown = subprocess.run(["git", f"--git-dir={OFFICIAL_GIT}", "show",
                            f"{OFFICIAL_COMMIT}:imb_cll/utils/cl_augmentation.py"],
                           capture_output=True, text=True, check=False)
    if shown.returncode != 0:
        pytest.skip(f"{OFFICIAL_GIT} has no {OFFICIAL_COMMIT}:imb_cll/utils/cl_augmentation.py "
                    f"({shown.stderr.strip()})")
    return shown.stdout


@pytest.fixture
def official(official_source, monkeypatch):
    """The official module in a fresh dict, with np.random.beta / np.random.choice / random.randint wrapped:
    values unchanged, each call recorded. The global RNG states are restored afterwards."""
    module = {"__name__": "official_cl_augmentation"}
    # the official file imports torch, random and numpy only
    exec(compile(official_source, "cl_augmentation.py", "exec"), module)  # noqa: S102
    log = {"beta": [], "choice": [], "randint": []}
    beta, choice, randint = np.random.beta, np.random.choice, random.randint

    def rec_beta(*args, **kwargs):
        value = beta(*args, **kwargs)
        log["beta"].append((args, value))
        return value

    def rec_choice(members, *args, **kwargs):
        value = choice(members, *args, **kwargs)
        log["choice"].append((np.array(members).copy(), np.array(value).copy()))
        return value

    def rec_randint(low, high):
        value = randint(low, high)
        log["randint"].append(value)
        return value

    np_state, py_state = np.random.get_state(), random.getstate()
    monkeypatch.setattr(np.random, "beta", rec_beta)
    monkeypatch.setattr(np.random, "choice", rec_choice)
    monkeypatch.setattr(random, "randint", rec_randint)
    module["log"] = log
    yield module
    np.random.set_state(np_state)
    random.setstate(py_state)


def official_icm_batch():
    """512 rows (the official buffer is zeros(512, 10)), 10 classes, 784-pixel images; random clusters with
    rows alone and duplicated images, some in clusters of exactly two so the duplicate is drawn."""
    x, y, cl, g = toy_cll(512, seed=20, dim=784)
    clusters = torch.randint(60, (512,), generator=g)
    clusters[:6] = torch.arange(100, 106)  # alone
    for n, (a, b) in enumerate([(10, 11), (20, 21), (30, 31), (40, 42), (50, 53)]):
        x[b] = x[a]
        clusters[a] = clusters[b] = 200 + n
    x[70] = x[90]  # a duplicate inside a bigger cluster
    clusters[70] = clusters[90]
    return x, y, cl, clusters


def derive_uniforms(choices, clusters):
    """Our uniforms from the official np.random.choice(members, 1, replace=False) records: the chosen member's
    position p among the m members gives u = (p + 1/2) / m, so floor(u m) = p."""
    n = len(clusters)
    uniforms = torch.full((n,), 0.5, dtype=torch.float64)
    chosen = torch.arange(n)
    records = iter(choices)
    for i in range(n):
        members = np.flatnonzero(clusters.numpy() == int(clusters[i]))
        if len(members) < 2:
            continue
        seen, value = next(records)
        assert np.array_equal(seen, members)
        position = int(np.flatnonzero(members == int(value[0]))[0])
        uniforms[i] = (position + 0.5) / len(members)
        chosen[i] = int(value[0])
    assert next(records, None) is None
    return uniforms, chosen


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the official np.array(list of tensors)
def test_official_wrappers_leave_values_unchanged(official_source, official):
    x, y, cl, clusters = official_icm_batch()
    np.random.seed(31)
    wrapped = official["aug_intra_class"](x, cl, y, clusters.numpy(), "cpu", "FashionMNIST", 0.2)
    plain_module = {"__name__": "official_plain"}
    exec(compile(official_source, "cl_augmentation.py", "exec"), plain_module)  # noqa: S102
    with pytest.MonkeyPatch.context() as mp:  # the unwrapped functions
        mp.setattr(np.random, "beta", np.random.mtrand.beta)
        mp.setattr(np.random, "choice", np.random.mtrand.choice)
        np.random.seed(31)
        plain = plain_module["aug_intra_class"](x, cl, y, clusters.numpy(), "cpu", "FashionMNIST", 0.2)
    assert torch.equal(wrapped[0], plain[0]) and torch.equal(wrapped[1], plain[1])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_parity_official_aug_intra_class(official):
    x, y, cl, clusters = official_icm_batch()
    np.random.seed(32)
    off_x, off_t = official["aug_intra_class"](x, cl, y, clusters.numpy(), "cpu", "FashionMNIST", 0.2)
    (beta_args, lam), = official["log"]["beta"]
    assert beta_args == (0.2, 0.2)
    uniforms, chosen = derive_uniforms(official["log"]["choice"], clusters)
    partners, paired = cluster_partners(clusters, uniforms)
    assert torch.equal(partners[paired], chosen[paired])
    ours_x, ours_t = icm_batch(x, cl, partners, paired, float(lam), K, mix_inputs=False)
    # the cases the quirks cover really occur in this batch
    self_pairs = paired & (partners == torch.arange(512))
    duplicates = paired & (partners != torch.arange(512)) & (x == x[partners]).all(dim=1)
    assert int((~paired).sum()) == 6 and self_pairs.any() and duplicates.any()
    assert torch.equal(ours_x, off_x)
    torch.testing.assert_close(ours_t, off_t, rtol=0, atol=1e-7)
    assert torch.equal(off_t[~paired], torch.zeros(6, K))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_parity_official_icm_step_and_soft_scl_nl(official, monkeypatch):
    """ICMOfficial.step on the official draws (lam, partners) against aug_intra_class plus train_icm's soft
    SCL-NL expression (-(1 - softmax).clamp(1e-6, 1 - 1e-6).log() * targets * weights).sum(-1).mean()."""
    x, y, cl, clusters = official_icm_batch()
    np.random.seed(33)
    off_x, off_t = official["aug_intra_class"](x, cl, y, clusters.numpy(), "cpu", "FashionMNIST", 0.2)
    (_, lam), = official["log"]["beta"]
    uniforms, _ = derive_uniforms(official["log"]["choice"], clusters)
    asked = []

    def fixed_lam(alpha, generator):
        asked.append(alpha)
        return float(lam)

    real_partners = icm_method.cluster_partners
    monkeypatch.setattr(icm_method, "draw_lam", fixed_lam)
    monkeypatch.setattr(icm_method, "cluster_partners", lambda ids, _u: real_partners(ids, uniforms))
    arm = build_method({"name": "icm_official", "alpha": 0.2, "augment": False}, num_classes=K)
    torch.manual_seed(0)
    model = Recorder(MLPCLL(hidden_dim=16))
    out = arm.step(model, (x, torch.stack([cl, y, clusters], dim=1)), ctx())
    assert asked == [0.2]
    assert torch.equal(model.seen, off_x)
    weights = torch.ones(K)
    output_mix = model.model(off_x)
    p = (1 - F.softmax(output_mix, dim=1)).clamp(1e-6, 1 - 1e-6).log()
    official_loss = (-p * off_t * weights).sum(-1).mean()
    torch.testing.assert_close(out["loss"], official_loss, rtol=1e-6, atol=1e-7)
    stats = arm.epoch_stats()
    partners, paired = real_partners(clusters, uniforms)
    noisy = [n for n, ok in zip(loop_noise(cl, y, partners), paired.tolist(), strict=True) if ok]
    assert stats["pairs"] == 506 and stats["noise_rate"] == pytest.approx(sum(noisy) / 506)


def test_parity_official_mixup_cl_data_count_error(official, monkeypatch):
    """CLLMixup.step on the official draws against mixup_cl_data_count_error (mixed_x, y_a, y_b, lam,
    count_error) and train_icm's hard SCL-NL expression
    lam * nll(log(1 - softmax + 1e-6), a) + (1 - lam) * nll(..., b)."""
    batch, dim = 96, 20
    x, y, cl, _ = toy_cll(batch, seed=21, dim=dim)
    np.random.seed(34)
    random.seed(36)
    off_x, y_a, y_b, lam, count_error = official["mixup_cl_data_count_error"](x, cl, y, "cpu")
    (beta_args, logged_lam), = official["log"]["beta"]
    assert beta_args == (1.0, 1.0) and logged_lam == lam
    partners = torch.tensor(official["log"]["randint"])
    assert len(partners) == batch and (partners == torch.arange(batch)).any()  # j = i happens at this seed
    assert torch.equal(y_a, cl) and torch.equal(y_b, cl[partners])
    assert int(pair_noise(cl, y, partners).sum()) == count_error > 0
    asked = []

    def fixed_lam(alpha, generator):
        asked.append(alpha)
        return float(lam)

    monkeypatch.setattr(icm_method, "draw_lam", fixed_lam)
    monkeypatch.setattr(icm_method, "batch_partners", lambda size, generator: partners.clone())
    arm = build_method({"name": "cll_mixup", "augment": False}, num_classes=K)
    torch.manual_seed(0)
    model = Recorder(MLPCLL(in_features=dim, hidden_dim=16))
    out = arm.step(model, (x, torch.stack([cl, y, torch.zeros_like(y)], dim=1)), ctx())
    assert asked == [1.0]  # the official call never passes alpha
    assert torch.equal(model.seen, off_x)
    assert torch.equal(float(lam) * x + (1 - float(lam)) * x[partners], off_x)
    weights = torch.ones(K)
    p = (1 - F.softmax(model.model(off_x), dim=1) + 1e-6).log()
    official_loss = (lam * F.nll_loss(p, y_a, weights) + (1 - lam) * F.nll_loss(p, y_b, weights)).mean()
    torch.testing.assert_close(out["loss"], official_loss.float(), rtol=1e-6, atol=1e-7)
    stats = arm.epoch_stats()
    assert stats["pairs"] == batch and round(stats["noise_rate"] * batch) == count_error
