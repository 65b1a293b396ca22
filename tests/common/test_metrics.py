"""Tests for common/metrics.py: hand-computed cases and plain-loop references (specs/rankmixup.md §2.5-2.6)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from common.errors import ReproError
from common.metrics import (
    adaptive_ece,
    classification_metrics,
    classwise_ece,
    ece,
    nll,
    overconfidence_error,
    regression_metrics,
    reliability_diagram_data,
    temperature_grid,
    temperature_scale,
    topk_accuracy,
    underconfidence_error,
)

NEG_INF = float("-inf")


def _binary_logits(confs: list[float]) -> torch.Tensor:
    """(N, 2) logits whose class-0 softmax probability is each conf (> 0.5 makes class 0 the top-1)."""
    p = torch.tensor(confs, dtype=torch.float64)
    return torch.stack([torch.log(p / (1 - p)), torch.zeros_like(p)], dim=1).float()


def _random_logits(seed: int, n: int = 2000, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with a spread of confidences, some saturated at 1.0 and some duplicated rows (ties)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=g) * 8.0
    logits = torch.randn(n, k, generator=g) * scale
    logits[:50, 0] += 60.0  # confidence exactly 1.0 in float32
    logits[50:100] = logits[100:150]  # tied confidences
    labels = torch.randint(0, k, (n,), generator=g)
    labels[: n // 2] = logits[: n // 2].argmax(1)  # about half right, so calibration errors are moderate
    return logits, labels


# ---------------------------------------------------------------- independent references (plain loops)


def _ref_ece_loop(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Plain-Python ECE: bins (l, u] with the official float32 linspace edges; percent."""
    probs = torch.softmax(logits, dim=1).tolist()
    ys = labels.tolist()
    edges = [float(e) for e in torch.linspace(0, 1, n_bins + 1)]
    confs, hits = [], []
    for row, y in zip(probs, ys):
        c = max(row)
        confs.append(c)
        hits.append(1.0 if row.index(c) == y else 0.0)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        members = [i for i, c in enumerate(confs) if lo < c <= hi]
        if members:
            mean_conf = sum(confs[i] for i in members) / len(members)
            acc = sum(hits[i] for i in members) / len(members)
            total += len(members) / len(confs) * abs(mean_conf - acc)
    return 100.0 * total


def _ref_bin_loop(conf: torch.Tensor, hit: torch.Tensor, edges, weight: str = "ece") -> float:
    """Loop over (lower, upper] bins comparing tensors with Python-float edges (torch casts them to the
    tensor dtype), accumulating |conf - acc| (ece), conf*relu(conf-acc) (oe) or conf*relu(acc-conf) (ue)."""
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        in_bin = conf.gt(float(lo)) & conf.le(float(hi))
        prop = in_bin.double().mean().item()
        if prop > 0:
            c = conf[in_bin].double().mean().item()
            a = hit[in_bin].double().mean().item()
            term = {"ece": abs(c - a), "oe": c * max(c - a, 0.0), "ue": c * max(a - c, 0.0)}[weight]
            total += term * prop
    return 100.0 * total


def _ref_adaptive_ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    conf, pred = torch.softmax(logits, 1).max(1)
    x = conf.numpy()
    edges = np.interp(np.linspace(0, len(x), n_bins + 1), np.arange(len(x)), np.sort(x))
    return _ref_bin_loop(conf, pred.eq(labels), edges.tolist())


def _ref_classwise_ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    probs = torch.softmax(logits, 1)
    edges = torch.linspace(0, 1, n_bins + 1).tolist()
    per_class = [_ref_bin_loop(probs[:, c], labels.eq(c), edges) for c in range(int(labels.max()) + 1)]
    return sum(per_class) / len(per_class)


# ---------------------------------------------------------------- top-k and NLL


def test_topk_accuracy_hand_case():
    logits = torch.tensor(
        [
            [9.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # label 0 is top-1
            [1.0, 9.0, 8.0, 7.0, 6.0, 5.0],  # label 4 is rank 4 -> top-5 only
            [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # label 5 is rank 6 -> neither
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # label 1 is rank 5 -> top-5 only
        ]
    )
    labels = torch.tensor([0, 4, 5, 1])
    acc = topk_accuracy(logits, labels)
    assert acc == {"top1": 25.0, "top5": 75.0}
    assert topk_accuracy(logits, labels, ks=(2,)) == {"top2": 25.0}


def test_topk_with_fewer_than_five_classes_uses_all_classes():
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    labels = torch.tensor([2, 1])
    assert topk_accuracy(logits, labels) == {"top1": 0.0, "top5": 100.0}


def test_nll_hand_case():
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]], dtype=torch.float64)
    labels = torch.tensor([1, 2])
    expected = (math.log(4.0) - math.log(0.7)) / 2
    assert nll(probs.log(), labels) == pytest.approx(expected, rel=1e-12)
    # adding a per-row constant to logits leaves the likelihood unchanged
    assert nll(probs.log() + torch.tensor([[3.0], [-7.0]], dtype=torch.float64), labels) == pytest.approx(
        expected, rel=1e-12
    )


# ---------------------------------------------------------------- ECE


def test_ece_hand_case_bins_and_percent():
    # confs 0.9 (wrong) alone in (0.8667, 0.9333]; 0.62 and 0.64 (one right) share (0.6, 0.6667].
    logits = _binary_logits([0.9, 0.62, 0.64])
    labels = torch.tensor([1, 0, 1])
    expected = (0.9 + abs(0.62 + 0.64 - 1.0)) / 3 * 100
    assert ece(logits, labels) == pytest.approx(expected, abs=1e-4)
    # with 2 bins, all three share (0.5, 1]: |2.16 - 1| / 3
    assert ece(logits, labels, n_bins=2) == pytest.approx(abs(0.9 + 0.62 + 0.64 - 1.0) / 3 * 100, abs=1e-4)


def test_ece_edge_rule_sample_on_interior_edge_goes_to_lower_bin():
    """A confidence exactly 1/15 (a float32 bin edge) belongs to bin (0, 1/15], not (1/15, 2/15]."""
    k = 20
    a = torch.full((k,), NEG_INF)
    a[:15] = 0.0  # 15 tied classes: conf = 1/15 exactly, class 19 (label) is certainly wrong
    b = torch.zeros(k)
    b[0] = 0.1  # conf ~0.055 in bin 0, argmax 0 (right)
    c = torch.full((k,), NEG_INF)
    c[:10] = 0.0
    c[0] = 0.1  # conf ~0.109 in bin 1, argmax 0 (wrong, label 1)
    logits = torch.stack([a, b, c])
    labels = torch.tensor([19, 0, 1])
    conf = torch.softmax(logits, 1).max(1).values
    assert conf[0] == torch.linspace(0, 1, 16)[1]  # precondition: exactly on the edge
    ca, cb, cc = conf.double().tolist()
    lower_rule = (abs(ca + cb - 1.0) + cc) / 3 * 100  # bin0 = {a, b}, bin1 = {c}
    upper_rule = (abs(cb - 1.0) + ca + cc) / 3 * 100  # what [l, u) bins would give
    assert abs(lower_rule - upper_rule) > 1.0
    assert ece(logits, labels) == pytest.approx(lower_rule, abs=1e-4)


def test_ece_confidence_one_is_in_last_bin():
    logits = torch.tensor([[100.0, 0.0], [0.0, 100.0]])
    conf = torch.softmax(logits, 1).max(1).values
    assert bool((conf == 1.0).all())
    # both wrong at confidence 1.0: ECE 100% (a rule dropping conf == 1 would give 0)
    assert ece(logits, torch.tensor([1, 0])) == pytest.approx(100.0)
    assert ece(logits, torch.tensor([0, 1])) == pytest.approx(0.0)


def test_ece_perfectly_calibrated_is_zero():
    # bin (0.7333, 0.8]: four samples at 0.75, three right; bin (0.4667, 0.5333]: two tied at 0.5, one
    # right (argmax takes class 0); last bin: two at confidence 1.0, both right.
    logits = torch.cat(
        [
            _binary_logits([0.75] * 4),
            torch.zeros(2, 2),
            torch.tensor([[80.0, 0.0], [80.0, 0.0]]),
        ]
    )
    labels = torch.tensor([0, 0, 0, 1, 0, 1, 0, 0])
    assert ece(logits, labels) == pytest.approx(0.0, abs=1e-4)
    # a wrong prediction turns it non-zero: one more miss in the 0.75 bin adds 1/8 * 0.25 * ... > 0
    labels_bad = labels.clone()
    labels_bad[0] = 1
    assert ece(logits, labels_bad) == pytest.approx(100 * abs(0.75 * 4 - 2) / 8, abs=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_matches_plain_python_loop(seed):
    logits, labels = _random_logits(seed, n=1500)
    assert ece(logits, labels) == pytest.approx(_ref_ece_loop(logits, labels), abs=1e-4)
    assert ece(logits, labels, n_bins=7) == pytest.approx(_ref_ece_loop(logits, labels, 7), abs=1e-4)
    # float64 logits take the same edges (float32 linspace values)
    assert ece(logits.double(), labels) == pytest.approx(_ref_ece_loop(logits.double(), labels), abs=1e-8)


def test_ece_float64_logits_use_the_float32_linspace_edges():
    """The official edges are float32 `torch.linspace` values even for float64 confidences: 8/15 is
    stored as 0.53333330..., so a float64 confidence just below 8/15 is already in bin (8/15, 9/15]."""
    e32 = float(torch.linspace(0, 1, 16)[8])
    mid = (e32 + 8 / 15) / 2
    p = torch.tensor([mid, 0.55, 0.52], dtype=torch.float64)
    logits = torch.stack([torch.log(p / (1 - p)), torch.zeros_like(p)], dim=1)
    labels = torch.tensor([1, 0, 0])  # mid wrong, 0.55 and 0.52 right
    conf = torch.softmax(logits, 1)[:, 0]
    assert e32 < conf[0].item() < 8 / 15  # precondition: between the float32 and the exact edge
    official = (0.48 + abs(mid + 0.55 - 1)) / 3 * 100  # bin 7 = {0.52}, bin 8 = {mid, 0.55}
    exact_edges = (abs(mid + 0.52 - 1) + 0.45) / 3 * 100  # bin 7 = {mid, 0.52}, bin 8 = {0.55}
    assert abs(official - exact_edges) > 1.0
    assert ece(logits, labels) == pytest.approx(official, abs=1e-8)


def test_ece_is_permutation_invariant_and_device_free_of_order():
    logits, labels = _random_logits(3, n=500)
    perm = torch.randperm(500, generator=torch.Generator().manual_seed(0))
    assert ece(logits[perm], labels[perm]) == pytest.approx(ece(logits, labels), abs=1e-9)


# ---------------------------------------------------------------- adaptive ECE


def test_adaptive_ece_hand_case_excludes_minimum_sample():
    # N = 5, 2 bins: edges = [s0, s2 + 0.5 (s3 - s2), s4]; s0 = 0.55 lies in no bin.
    confs = [0.9, 0.7, 0.55, 0.8, 0.6]  # shuffled on purpose
    hits = {0.55: 1, 0.6: 1, 0.7: 0, 0.8: 1, 0.9: 1}
    logits = _binary_logits(confs)
    labels = torch.tensor([0 if hits[c] else 1 for c in confs])
    expected = (abs(0.6 + 0.7 - 1) + abs(0.8 + 0.9 - 2)) / 5 * 100  # 12%
    assert adaptive_ece(logits, labels, n_bins=2) == pytest.approx(expected, abs=1e-4)
    # if the minimum were included in the first bin it would be (|0.55 + 0.6 + 0.7 - 2| + 0.3) / 5 = 9%
    assert abs(expected - (0.15 + 0.3) / 5 * 100) > 1.0


def test_adaptive_ece_minimum_sample_contributes_nothing():
    confs = [0.55, 0.6, 0.7, 0.8, 0.9, 0.95]
    logits = _binary_logits(confs)
    right = torch.zeros(6, dtype=torch.long)
    flipped = right.clone()
    flipped[0] = 1  # change only the correctness of the minimum-confidence sample
    assert adaptive_ece(logits, right, n_bins=3) == pytest.approx(adaptive_ece(logits, flipped, n_bins=3))
    flipped_other = right.clone()
    flipped_other[1] = 1
    assert adaptive_ece(logits, flipped_other, n_bins=3) != pytest.approx(
        adaptive_ece(logits, right, n_bins=3)
    )


def test_adaptive_ece_edges_are_rounded_to_the_confidence_dtype():
    """The official code compares float32 confidences with float64 interp edges through torch, which
    rounds the edge to float32: an edge 2/3 of the way between two adjacent float32 confidences
    becomes the upper one, so that confidence stays in the lower bin."""
    z = [torch.tensor(1.0)]
    for _ in range(63):
        z.append(torch.nextafter(z[-1], torch.tensor(2.0)))
    z = torch.stack(z)
    conf = torch.softmax(torch.stack([z, torch.zeros_like(z)], 1), 1)[:, 0]
    i, j = next(
        (i, j)
        for i in range(64)
        for j in range(i + 1, 64)
        if conf[j] == torch.nextafter(conf[i], torch.tensor(1.0))
    )
    c = conf[i].item()
    # N = 5, 3 bins: positions 0, 5/3, 10/3, 5 -> edge1 = s1 + 2/3 (s2 - s1) rounds to s2 in float32
    logits = torch.cat([_binary_logits([0.6, 0.85, 0.95]), torch.stack([z[[i, j]], torch.zeros(2)], 1)])
    labels = torch.tensor([0, 1, 0, 0, 0])  # 0.85 wrong, the others right
    official = (abs(2 * c - 2) + 0.85 + 0.05) / 5 * 100  # bins {s1, s2}, {0.85}, {0.95}
    unrounded = (abs(c - 1) + abs(c + 0.85 - 1) + 0.05) / 5 * 100  # bins {s1}, {s2, 0.85}, {0.95}
    assert abs(official - unrounded) > 1.0
    assert adaptive_ece(logits, labels, n_bins=3) == pytest.approx(official, abs=1e-4)
    assert _ref_adaptive_ece(logits, labels, n_bins=3) == pytest.approx(official, abs=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adaptive_ece_matches_numpy_interp_reference(seed):
    logits, labels = _random_logits(seed, n=1003)
    for n_bins in (15, 4):
        assert adaptive_ece(logits, labels, n_bins) == pytest.approx(
            _ref_adaptive_ece(logits, labels, n_bins), abs=1e-4
        )


# ---------------------------------------------------------------- classwise ECE, OE, UE


def test_classwise_ece_hand_case_averages_over_max_label_plus_one():
    probs = torch.tensor([[0.75, 0.15, 0.10], [0.22, 0.68, 0.10], [0.78, 0.12, 0.10]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1])
    # class 0: {0.75 hit, 0.78 miss} share (0.7333, 0.8], 0.22 miss alone -> (0.53 + 0.22) / 3 = 0.25
    # class 1: 0.15 miss, 0.68 hit, 0.12 hit, each alone -> (0.15 + 0.32 + 0.88) / 3 = 0.45
    # class 2 (no label reaches it) is left out: mean over 2 classes = 0.35
    assert classwise_ece(probs.log(), labels) == pytest.approx(35.0, abs=1e-8)


@pytest.mark.parametrize("seed", [0, 1])
def test_classwise_ece_matches_loop_reference(seed):
    logits, labels = _random_logits(seed, n=800, k=7)
    labels[labels == 6] = 5  # the top class never appears: it must be excluded
    assert classwise_ece(logits, labels) == pytest.approx(_ref_classwise_ece(logits, labels), abs=1e-4)


def test_over_and_under_confidence_hand_case():
    logits = _binary_logits([0.9, 0.62])
    labels = torch.tensor([1, 0])  # 0.9 wrong (over-confident), 0.62 right (under-confident)
    assert overconfidence_error(logits, labels) == pytest.approx(0.5 * 0.9 * 0.9 * 100, abs=1e-4)
    assert underconfidence_error(logits, labels) == pytest.approx(0.5 * 0.62 * 0.38 * 100, abs=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_over_under_confidence_match_loop_reference(seed):
    logits, labels = _random_logits(seed, n=900)
    conf, pred = torch.softmax(logits, 1).max(1)
    edges = torch.linspace(0, 1, 16).tolist()
    hit = pred.eq(labels)
    assert overconfidence_error(logits, labels) == pytest.approx(
        _ref_bin_loop(conf, hit, edges, "oe"), abs=1e-4
    )
    assert underconfidence_error(logits, labels) == pytest.approx(
        _ref_bin_loop(conf, hit, edges, "ue"), abs=1e-4
    )


# ---------------------------------------------------------------- temperature


def test_temperature_grid_is_the_official_accumulated_grid():
    grid = temperature_grid()
    assert len(grid) == 100
    assert grid[0] == 0.1 and grid[2] == 0.1 + 0.1 + 0.1  # accumulated, not 0.3
    assert grid[-1] == pytest.approx(10.0, abs=1e-12)
    assert all(abs(t * 10 - round(t * 10)) < 1e-9 for t in grid)


@pytest.mark.parametrize("t_star", [0.5, 2.5])
@pytest.mark.parametrize("criterion", ["ece", "nll"])
def test_temperature_scale_recovers_known_temperature(t_star, criterion):
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(20000, 10, generator=g) * 2.0
    labels = torch.multinomial(torch.softmax(clean, 1), 1, generator=g).squeeze(1)
    logits = clean * t_star  # dividing by t_star recovers calibrated logits
    t = temperature_scale(logits, labels, criterion=criterion)
    assert abs(t - t_star) <= 0.1 + 1e-9
    assert abs(t * 10 - round(t * 10)) < 1e-9
    if criterion == "ece":  # never worse than no scaling (spec §5 invariant 9)
        assert ece(logits / t, labels) <= ece(logits, labels)


def test_temperature_ties_keep_the_first_grid_value():
    # all-equal logits: every temperature gives the same ECE and NLL, so the first (0.1) is kept
    logits = torch.zeros(10, 4)
    labels = torch.arange(10) % 4
    assert temperature_scale(logits, labels) == 0.1
    assert temperature_scale(logits, labels, criterion="nll") == 0.1
    assert temperature_scale(logits, labels, grid=[3.0, 2.0, 1.0]) == 3.0


def test_temperature_rejects_unknown_criterion():
    with pytest.raises(ReproError, match="criterion"):
        temperature_scale(torch.zeros(2, 2), torch.tensor([0, 1]), criterion="brier")


# ---------------------------------------------------------------- bundles and reliability data


def test_classification_metrics_keys_and_values():
    logits, labels = _random_logits(4, n=300)
    metrics = classification_metrics(logits, labels)
    assert set(metrics) == {"top1", "top5", "nll", "ece", "aece", "cece", "oe", "ue"}
    assert metrics["aece"] == pytest.approx(adaptive_ece(logits, labels))
    assert metrics["cece"] == pytest.approx(classwise_ece(logits, labels))
    assert metrics["top1"] == pytest.approx(100 * logits.argmax(1).eq(labels).double().mean().item())
    assert metrics["nll"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert metrics["ece"] == pytest.approx(_ref_ece_loop(logits, labels), abs=1e-4)


def test_reliability_diagram_data_hand_case_and_consistency_with_ece():
    logits = _binary_logits([0.9, 0.62, 0.64])
    labels = torch.tensor([1, 0, 1])
    data = reliability_diagram_data(logits, labels)
    assert data["count"][13] == 1 and data["count"][9] == 2 and sum(data["count"]) == 3
    assert data["confidence"][9] == pytest.approx(0.63, abs=1e-6)
    assert data["accuracy"][9] == pytest.approx(0.5)
    assert data["accuracy"][13] == 0.0
    assert math.isnan(data["confidence"][0])
    assert data["lower"][9] == pytest.approx(0.6) and data["upper"][9] == pytest.approx(2 / 3)
    logits, labels = _random_logits(5, n=700)
    data = reliability_diagram_data(logits, labels)
    gap = sum(n * abs(c - a) for n, c, a in zip(data["count"], data["confidence"], data["accuracy"]) if n)
    assert 100 * gap / 700 == pytest.approx(ece(logits, labels), abs=1e-8)


# ---------------------------------------------------------------- regression


def test_regression_metrics_hand_case():
    preds = torch.tensor([[1.0], [2.5], [2.0], [5.0]])  # (N, 1) against (N,) targets
    targets = torch.tensor([2.0, 2.0, 0.0, 4.0])
    out = regression_metrics(preds, targets)
    assert out["rmse"] == pytest.approx(math.sqrt((1 + 0.25 + 4 + 1) / 4))
    # MAPE skips y = 0: (1/2 + 0.5/2 + 1/4) / 3 * 100
    assert out["mape"] == pytest.approx((0.5 + 0.25 + 0.25) / 3 * 100)
    assert out["r"] == pytest.approx(np.corrcoef(preds.squeeze(1).numpy(), targets.numpy())[0, 1], rel=1e-6)


def test_regression_pearson_averages_dimensions_with_target_variance():
    g = torch.Generator().manual_seed(0)
    targets = torch.randn(50, 3, generator=g, dtype=torch.float64)
    targets[:, 2] = 1.5  # constant target column: excluded from the mean r
    preds = targets + 0.5 * torch.randn(50, 3, generator=g, dtype=torch.float64)
    r0 = np.corrcoef(preds[:, 0].numpy(), targets[:, 0].numpy())[0, 1]
    r1 = np.corrcoef(preds[:, 1].numpy(), targets[:, 1].numpy())[0, 1]
    assert regression_metrics(preds, targets)["r"] == pytest.approx((r0 + r1) / 2, rel=1e-10)


def test_regression_rejects_mismatched_shapes():
    with pytest.raises(ReproError, match="targets"):
        regression_metrics(torch.zeros(4, 2), torch.zeros(4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    logits, labels = _random_logits(6, n=3000)
    cpu = classification_metrics(logits, labels)
    cpu_more = [f(logits, labels) for f in (adaptive_ece, classwise_ece, overconfidence_error)]
    torch.use_deterministic_algorithms(True)
    try:
        gpu = classification_metrics(logits.cuda(), labels.cuda())
        gpu_more = [
            f(logits.cuda(), labels.cuda()) for f in (adaptive_ece, classwise_ece, overconfidence_error)
        ]
    finally:
        torch.use_deterministic_algorithms(False)
    assert gpu == pytest.approx(cpu, abs=1e-4)
    assert gpu_more == pytest.approx(cpu_more, abs=1e-4)
