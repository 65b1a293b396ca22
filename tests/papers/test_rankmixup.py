"""RankMixup: the invariants of shared spec rankmixup.md §5, and longhand references on fixed inputs.

The longhand functions below are written from the spec's text (§2.2-§2.4), loop by loop, not from the
vectorised code: the official broadcast of the MRL mask is spelled out as the (B, B) double loop it is.
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ReproError
from common.methods import StepContext, build_method
from common.mixing import smooth_one_hot
from papers import rankmixup
from papers.rankmixup import mix_copies, mndcg_loss, mrl_loss

K = 10


# ----------------------------------------------------------------------------------------------------
# Longhand references


def official_mixup_process_loop(x, one_hot, rng, copies, alpha):
    """The official forward_multimixup input branch: per copy np beta, then np permutation, then mix."""
    images, targets, lams, perms = [], [], [], []
    for _ in range(copies):
        lam = rng.beta(alpha, alpha) if alpha > 0 else 1.0
        idx = rng.permutation(x.shape[0])
        images.append(x * lam + x[idx] * (1 - lam))
        targets.append(one_hot * lam + one_hot[idx] * (1 - lam))
        lams.append(lam)
        perms.append(torch.as_tensor(idx))
    return torch.cat(images), torch.cat(targets), lams, perms


def longhand_mrl(z, zm, t, margin, mask):
    B = z.shape[0]
    hinge = [max(0.0, float(zm[b].max()) - float(z[b].max()) + margin) for b in range(B)]
    keep = [0.0 if any(float(t[b, k]) == 1.0 for k in range(t.shape[1])) else 1.0 for b in range(B)]
    if mask == "official_global":  # (self_mixup_mask (B,) * relu(diff + m) (B, 1)).mean() over B x B
        return sum(keep[j] * hinge[i] for i in range(B) for j in range(B)) / (B * B)
    return sum(keep[b] * hinge[b] for b in range(B)) / B


def longhand_ndcg(z, zm, t):
    """Per sample: raw first, copies sorted by relevance (stable), DCG/IDCG with log2(i + 1) discounts."""
    B = z.shape[0]
    M = zm.shape[0] // B
    out = []
    for b in range(B):
        c0 = max(F.softmax(z[b].double(), 0).tolist())
        items = []
        for j in range(M):
            row = j * B + b
            items.append((max(t[row].tolist()), max(F.softmax(zm[row].double(), 0).tolist())))
        items = sorted(items, key=lambda item: -item[0])
        dcg = c0 / math.log2(2) + sum(c / math.log2(i + 2) for i, (_, c) in enumerate(items, start=1))
        idcg = 1.0 / math.log2(2) + sum(r / math.log2(i + 2) for i, (r, _) in enumerate(items, start=1))
        out.append(min(dcg / idcg, idcg / dcg))
    return out


def logits_with_max_prob(p, num_classes=K, top=0):
    """Logits whose softmax puts probability p on class `top` and (1 - p) / (K - 1) elsewhere."""
    rest = (1.0 - p) / (num_classes - 1)
    row = torch.full((num_classes,), math.log(rest) if rest > 0 else -1e4, dtype=torch.float64)
    row[top] = math.log(p)
    return row.float()


def mixed_batch(labels, lams, perms):
    """Mixed targets of hand-chosen copies (float32, official arithmetic)."""
    one_hot = smooth_one_hot(labels, K)
    return mix_copies(torch.zeros(len(labels), 1, 1, 1), one_hot, lams, perms)[1]


# ----------------------------------------------------------------------------------------------------
# Mixing (spec §2.2, invariant 1, 6)


@pytest.mark.parametrize(("copies", "alpha"), [(1, 2.0), (3, 2.0), (3, 1.0), (2, 0.0)])
def test_mixed_copies_equal_official_mixup_process_bit_for_bit(copies, alpha):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, 4, 4, generator=g)
    labels = torch.randint(0, K, (8,), generator=g)
    one_hot = smooth_one_hot(labels, K)
    ref_x, ref_t, lams, perms = official_mixup_process_loop(
        x, one_hot, np.random.RandomState(0), copies, alpha
    )
    ours_x, ours_t = mix_copies(x, one_hot, lams, perms)
    assert ours_x.shape == (copies * 8, 3, 4, 4) and ours_t.dtype == torch.float32
    assert torch.equal(ours_x, ref_x) and torch.equal(ours_t, ref_t)
    # copy j occupies rows j*B .. (j+1)*B - 1 and mixes x[b] (weight lam_j) with x[p_j[b]]
    for j, (lam, perm) in enumerate(zip(lams, perms, strict=True)):
        for b in range(8):
            expect = lam * x[b].double() + (1 - lam) * x[perm[b]].double()
            assert torch.allclose(ours_x[j * 8 + b].double(), expect, atol=1e-6)
    assert torch.allclose(ours_t.sum(1), torch.ones(copies * 8))


def test_draws_are_seeded_beta_then_permutation_per_copy():
    lams, perms = rankmixup.draw_copies(torch.Generator().manual_seed(5), 16, 3, 2.0)
    again = rankmixup.draw_copies(torch.Generator().manual_seed(5), 16, 3, 2.0)
    assert lams == again[0] and all(torch.equal(a, b) for a, b in zip(perms, again[1], strict=True))
    assert len(set(lams)) == 3 and all(0.0 < lam < 1.0 for lam in lams)
    assert all(torch.equal(torch.sort(p).values, torch.arange(16)) for p in perms)
    # alpha <= 0: lam = 1, every copy is the clean batch
    lams0, _ = rankmixup.draw_copies(torch.Generator().manual_seed(5), 4, 2, 0.0)
    assert lams0 == [1.0, 1.0]


def test_relevance_is_max_lam_or_one():
    labels = torch.tensor([0, 1, 2, 2])
    perm = torch.tensor([1, 0, 3, 2])  # rows 0, 1: different classes; rows 2, 3: same class
    t = mixed_batch(labels, [0.2], [perm])
    assert torch.allclose(t.max(1).values, torch.tensor([0.8, 0.8, 1.0, 1.0]))
    assert (t[2:] == 1.0).any(1).all() and not (t[:2] == 1.0).any(1).any()
    # fixed point p[b] = b is "self-mixed" too
    assert (mixed_batch(labels, [0.37], [torch.arange(4)]) == 1.0).any(1).all()


# ----------------------------------------------------------------------------------------------------
# MRL (spec §2.3, invariants 3, 4)


@pytest.mark.parametrize("mask", ["official_global", "per_sample"])
def test_mrl_matches_longhand(mask):
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3, 3, 5, 6, 0])
    perm = torch.tensor([1, 0, 3, 4, 3, 6, 5, 7])  # rows 3, 4 same class; row 7 a fixed point
    t = mixed_batch(labels, [0.3], [perm])
    z, zm = torch.randn(8, K, generator=g) * 2, torch.randn(8, K, generator=g) * 2
    ours = mrl_loss(z, zm, t, margin=2.0, mask=mask)
    assert float(ours) == pytest.approx(longhand_mrl(z, zm, t, 2.0, mask), rel=1e-5)


def test_mrl_global_mask_is_not_per_sample():
    labels = torch.tensor([0, 1, 2, 2])
    t = mixed_batch(labels, [0.6], [torch.tensor([1, 0, 3, 2])])  # rows 2, 3 self-mixed: s = 1/2
    z = torch.zeros(4, K)
    zm = torch.zeros(4, K)
    zm[2:, 0] = 5.0  # only the self-mixed rows violate the ranking: hinge = (0, 0, ... ) + margin
    hinge = torch.tensor([1.0, 1.0, 6.0, 6.0])  # relu(max zm - max z + 1)
    official = mrl_loss(z, zm, t, margin=1.0)
    per_sample = mrl_loss(z, zm, t, margin=1.0, mask="per_sample")
    assert float(official) == pytest.approx(0.5 * float(hinge.mean()))  # s * mean hinge = 0.5 * 3.5
    assert float(per_sample) == pytest.approx(float((hinge * torch.tensor([1.0, 1, 0, 0])).mean()))  # 0.5
    assert float(official) != pytest.approx(float(per_sample))


def test_mrl_uses_max_logits_not_probabilities():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, K, generator=g)
    t = mixed_batch(torch.arange(6), [0.4], [torch.tensor([1, 2, 3, 4, 5, 0])])  # s = 1
    # shifting every logit by c leaves the probabilities unchanged but moves the max logit by c
    for c in (-3.0, -1.0, 0.5):
        assert float(mrl_loss(z, z + c, t, margin=2.0)) == pytest.approx(max(0.0, c + 2.0), abs=1e-6)


def test_mrl_zero_when_ranked_by_margin_or_all_self_mixed():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, K, generator=g)
    t = mixed_batch(torch.arange(6), [0.7], [torch.tensor([1, 2, 3, 4, 5, 0])])
    zm = (
        z
        - z.max(1, keepdim=True).values
        + z.max(1, keepdim=True).values
        - 2.0
        - torch.rand(6, 1, generator=g)
    )
    assert float(mrl_loss(z, zm, t, margin=2.0)) == 0.0
    same = mixed_batch(torch.zeros(6, dtype=torch.long), [0.7], [torch.tensor([1, 2, 3, 4, 5, 0])])
    assert float(mrl_loss(z, z + 10.0, same, margin=2.0)) == 0.0  # s = 0
    assert float(mrl_loss(z, z + 10.0, t, margin=2.0)) == pytest.approx(12.0)


def test_mrl_rejects_more_than_one_copy():
    z = torch.randn(4, K)
    t = mixed_batch(torch.arange(4), [0.3, 0.6, 0.9], [torch.arange(4).flip(0)] * 3)
    with pytest.raises(ReproError, match="num_mixup: 1"):
        mrl_loss(z, torch.randn(12, K), t, margin=2.0)
    with pytest.raises(ReproError, match="num_mixup: 1.*mndcg"):
        build_method({"name": "mrl", "num_mixup": 3}, num_classes=K)
    with pytest.raises(ReproError, match="official_global, per_sample"):
        build_method({"name": "mrl", "mask": "per_row"}, num_classes=K)
    with pytest.raises(ReproError):  # margin is an MRL option only
        build_method({"name": "mndcg", "margin": 2.0}, num_classes=K)


# ----------------------------------------------------------------------------------------------------
# M-NDCG (spec §2.4, invariants 5, 6)


def test_mndcg_matches_longhand_with_distinct_relevances():
    g = torch.Generator().manual_seed(4)
    B = 6
    labels = torch.arange(B)
    perms = [torch.roll(torch.arange(B), s) for s in (1, 2, 3)]  # no same-class pairs
    t = mixed_batch(labels, [0.15, 0.55, 0.7], perms)  # relevances 0.85, 0.55, 0.7: order (0, 2, 1)
    z, zm = torch.randn(B, K, generator=g) * 3, torch.randn(3 * B, K, generator=g) * 3
    expected = [1.0 - v for v in longhand_ndcg(z, zm, t)]
    assert float(mndcg_loss(z, zm, t)) == pytest.approx(sum(expected) / B, rel=1e-5)
    assert all(0.0 <= v <= 1.0 for v in expected)


def test_mndcg_is_one_when_confidence_equals_relevance():
    rel = [0.9, 0.75, 0.6]
    z = logits_with_max_prob(1.0).unsqueeze(0)  # c0 = 1 (the raw sample's relevance)
    zm = torch.stack([logits_with_max_prob(r) for r in rel])
    t = torch.zeros(3, K)  # copy j: lam_j on class 0, 1 - lam_j on class 1
    t[:, 0] = torch.tensor(rel)
    t[:, 1] = 1.0 - torch.tensor(rel)
    assert float(mndcg_loss(z, zm, t)) == pytest.approx(0.0, abs=1e-6)
    # relevance is max(lam, 1 - lam): with lam = 1 - r (0.1, 0.25, 0.4) on the raw sample's class the
    # relevances stay (0.9, 0.75, 0.6); were they lam itself, these confidences would be far from ideal
    t_small_lam = t.clone()
    t_small_lam[:, [0, 1]] = t[:, [1, 0]]
    assert float(mndcg_loss(z, zm, t_small_lam)) == pytest.approx(0.0, abs=1e-6)
    lam_as_relevance = longhand_ndcg(z, zm, torch.stack([1.0 - torch.tensor(rel)] * K, 1))
    assert 1.0 - lam_as_relevance[0] > 0.1


@pytest.mark.parametrize("scale", [0.9, 0.5, 0.25])
def test_mndcg_scaled_confidences_give_min_ratio(scale):
    rel = torch.tensor([0.9, 0.75, 0.6])
    t = torch.zeros(3, K)
    t[:, 0], t[:, 1] = rel, 1.0 - rel
    # under-confident: c = a * r, c0 = a  ->  ndcg = DCG/IDCG = a
    z = logits_with_max_prob(scale).unsqueeze(0)
    zm = torch.stack([logits_with_max_prob(scale * float(r)) for r in rel])
    assert float(mndcg_loss(z, zm, t)) == pytest.approx(1.0 - scale, abs=1e-5)


def test_mndcg_over_confidence_uses_inverse_ratio():
    rel = torch.tensor([0.9, 0.75, 0.6])
    t = torch.zeros(3, K)
    t[:, 0], t[:, 1] = rel, 1.0 - rel
    z = logits_with_max_prob(1.0).unsqueeze(0)
    zm = torch.stack([logits_with_max_prob(1.0)] * 3)  # every copy fully confident: DCG > IDCG
    discount = [1.0 / math.log2(i + 1) for i in range(1, 5)]
    dcg = sum(discount)
    idcg = discount[0] + sum(float(r) * d for r, d in zip(rel, discount[1:], strict=True))
    loss = float(mndcg_loss(z, zm, t))
    assert loss == pytest.approx(1.0 - idcg / dcg, rel=1e-5)
    assert loss > 0.0  # the paper's 1 - DCG/IDCG would be negative here


def test_mndcg_orders_by_relevance_and_ignores_copy_order():
    g = torch.Generator().manual_seed(6)
    B = 5
    perms = [torch.roll(torch.arange(B), s) for s in (1, 2, 4)]
    lams = [0.35, 0.95, 0.2]
    z, zm = torch.randn(B, K, generator=g), torch.randn(3 * B, K, generator=g)
    t = mixed_batch(torch.arange(B), lams, perms)
    base = mndcg_loss(z, zm, t)
    for order in ([2, 0, 1], [1, 2, 0], [2, 1, 0]):
        rows = torch.cat([torch.arange(j * B, (j + 1) * B) for j in order])
        assert float(mndcg_loss(z, zm[rows], t[rows])) == pytest.approx(float(base), rel=1e-6)
    # swapping the confidences of two copies without their relevances does change the loss
    swap = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B), torch.arange(2 * B, 3 * B)])
    assert float(mndcg_loss(z, zm[swap], t)) != pytest.approx(float(base), rel=1e-4)


def test_mndcg_gradient_flows_through_confidences():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(4, K, generator=g, requires_grad=True)
    zm = torch.randn(12, K, generator=g, requires_grad=True)
    t = mixed_batch(torch.arange(4), [0.3, 0.6, 0.8], [torch.roll(torch.arange(4), s) for s in (1, 2, 3)])
    mndcg_loss(z, zm, t).backward()
    assert z.grad.abs().sum() > 0 and zm.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# The training step (spec §2.2, invariants 2, 7) and the method contract


class ToyNet(nn.Module):
    def __init__(self, bn=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.fc = nn.Linear(4, K)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def make_batch(B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 8, 8, generator=g), torch.randint(0, K, (B,), generator=g)


def ctx(seed=0):
    return StepContext(epoch=0, step=0, progress=0.0, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("options", "copies"),
    [({"name": "mrl"}, 1), ({"name": "mndcg"}, 3), ({"name": "mrl", "mask": "per_sample", "margin": 1.0}, 1)],
)
def test_step_is_ce_plus_weighted_rank_loss_on_the_same_draws(options, copies):
    torch.manual_seed(0)
    model, method = ToyNet(bn=False), build_method(options, num_classes=K)
    images, labels = make_batch()
    out = method.step(model, (images, labels), ctx(9))
    lams, perms = rankmixup.draw_copies(torch.Generator().manual_seed(9), 8, copies, 2.0)
    mixed_x, mixed_t = mix_copies(images, smooth_one_hot(labels, K), lams, perms)
    logits, mixed_logits = model(images), model(mixed_x)
    rank = (
        mrl_loss(
            logits, mixed_logits, mixed_t, options.get("margin", 2.0), options.get("mask", "official_global")
        )
        if options["name"] == "mrl"
        else mndcg_loss(logits, mixed_logits, mixed_t)
    )
    expected = F.cross_entropy(logits, labels) + 0.1 * rank
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(out["logits"], logits)  # the clean logits, (B, K)
    assert out["loss_rank"] == pytest.approx(float(rank.detach())) and out["lam"] == pytest.approx(
        sum(lams) / copies
    )


def test_weight_zero_is_plain_ce_and_its_gradient():
    torch.manual_seed(1)
    model = ToyNet()
    reference = copy.deepcopy(model)
    images, labels = make_batch()
    method = build_method({"name": "mndcg", "weight": 0.0}, num_classes=K)
    out = method.step(model, (images, labels), ctx())
    out["loss"].backward()
    plain = F.cross_entropy(reference(images), labels)
    plain.backward()
    torch.testing.assert_close(out["loss"], plain)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize(("name", "copies"), [("mrl", 1), ("mndcg", 3)])
def test_batchnorm_sees_two_separate_forward_calls(name, copies):
    model = ToyNet()
    images, labels = make_batch()
    seen = []
    model.bn.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    build_method({"name": name}, num_classes=K).step(model, (images, labels), ctx())
    assert int(model.bn.num_batches_tracked) == 2
    assert seen == [8, copies * 8]  # clean first, then all M copies in one call


@pytest.mark.parametrize(
    "options", [{"name": "mrl"}, {"name": "mrl", "mask": "per_sample"}, {"name": "mndcg"}]
)
def test_contract_finite_backward_deterministic(options):
    images, labels = make_batch()
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = ToyNet()
        method = build_method(options, num_classes=K)
        out = method.step(model, (images, labels), ctx(3))
        assert torch.isfinite(out["loss"]) and out["logits"].shape == (8, K)
        out["loss"].backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        # logged scalars: Python floats or detached 0-d tensors (summed on the device by the trainer, no host sync)
        assert all(isinstance(v, float) or (torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad)
                   for k, v in out.items() if k not in ("loss", "logits"))
        results.append(out)
    torch.testing.assert_close(results[0]["loss"], results[1]["loss"], rtol=0, atol=0)
    other = build_method(options, num_classes=K).step(ToyNet(), (images, labels), ctx(4))
    assert other["lam"] != results[0]["lam"]
    mixed_x, mixed_t = build_method(options, num_classes=K).mix(
        images, labels, torch.Generator().manual_seed(3)
    )
    copies = 3 if options["name"] == "mndcg" else 1
    assert mixed_x.shape == (copies * 8, 3, 8, 8) and torch.allclose(mixed_t.sum(1), torch.ones(copies * 8))


def test_regression_task_is_rejected():
    with pytest.raises(ReproError, match="classification"):
        build_method({"name": "mndcg"}, num_classes=1, task="regression")


def test_reliability_pooling_reproduces_ece():
    from common.metrics import ece, reliability_diagram_data
    from papers.rankmixup.figures import pool_bins

    g = torch.Generator().manual_seed(8)
    logits_a, logits_b = torch.randn(300, K, generator=g) * 2, torch.randn(200, K, generator=g) * 3
    labels_a, labels_b = torch.randint(0, K, (300,), generator=g), torch.randint(0, K, (200,), generator=g)
    one = pool_bins([reliability_diagram_data(logits_a, labels_a)])
    assert one["ece"] == pytest.approx(ece(logits_a, labels_a), abs=1e-4)
    both = pool_bins(
        [reliability_diagram_data(logits_a, labels_a), reliability_diagram_data(logits_b, labels_b)]
    )
    pooled = ece(torch.cat([logits_a, logits_b]), torch.cat([labels_a, labels_b]))
    assert both["ece"] == pytest.approx(pooled, abs=1e-4) and sum(both["count"]) == 500
