"""Mixup/CutMix primitives: invariants of spec mixup_cutmix.md §5, a plain-loop reference, and timm parity."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data import Mixup as TimmMixup

from common.errors import ReproError
from common.mixing import (
    MixDraws,
    apply_mix,
    cutmix_box,
    cutmix_boxes,
    draw_mix,
    flip_partner,
    mix_targets,
    mixup_images,
    paste_box,
    smooth_one_hot,
    soft_target_cross_entropy,
)

K = 10


def batch(B=8, H=12, W=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, H, W, generator=g), torch.randint(0, K, (B,), generator=g)


def reference_box(lam, cy, cx, H, W):
    """Spec §2.3 written out longhand."""
    r = (1 - lam) ** 0.5
    ch, cw = int(H * r), int(W * r)
    yl, yh = min(max(cy - ch // 2, 0), H), min(max(cy + ch // 2, 0), H)
    xl, xh = min(max(cx - cw // 2, 0), W), min(max(cx + cw // 2, 0), W)
    return (yl, yh, xl, xh)


def test_smooth_one_hot_rows_sum_to_one_and_values():
    labels = torch.tensor([0, 3, 9])
    t = smooth_one_hot(labels, K, 0.1)
    assert torch.allclose(t.sum(1), torch.ones(3), atol=1e-6)
    assert t[1, 3].item() == pytest.approx(1 - 0.1 + 0.01)
    assert t[1, 0].item() == pytest.approx(0.01)
    assert torch.equal(smooth_one_hot(labels, K, 0.0), F.one_hot(labels, K).float())


@pytest.mark.parametrize("lam", [0.0, 0.03, 0.3, 0.5, 0.77, 0.99, 1.0])
def test_cutmix_box_matches_spec_formula_everywhere(lam):
    H, W = 12, 10
    for cy in range(H):
        for cx in range(W):
            box, lam_c = cutmix_box(lam, cy, cx, (H, W))
            assert box == reference_box(lam, cy, cx, H, W)
            yl, yh, xl, xh = box
            assert lam_c == pytest.approx(1 - (yh - yl) * (xh - xl) / (H * W))


def test_vectorised_boxes_equal_scalar_boxes():
    g = torch.Generator().manual_seed(1)
    lam = torch.rand(200, generator=g, dtype=torch.float64)
    cy, cx = torch.randint(0, 12, (200,), generator=g), torch.randint(0, 10, (200,), generator=g)
    boxes, lam_c = cutmix_boxes(lam, cy, cx, (12, 10))
    for i in range(200):
        box, lc = cutmix_box(float(lam[i]), int(cy[i]), int(cx[i]), (12, 10))
        assert tuple(boxes[i].tolist()) == box
        assert float(lam_c[i]) == pytest.approx(lc)


def test_paste_box_inside_from_partner_outside_untouched_and_lam_counts_pixels():
    x, _ = batch()
    partner = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    box, lam_c = cutmix_box(0.6, 5, 4, (12, 10))
    out = paste_box(x, partner, box)
    inside = torch.zeros(12, 10, dtype=torch.bool)
    inside[box[0]:box[1], box[2]:box[3]] = True
    assert torch.equal(out[:, :, inside], x[partner][:, :, inside])
    assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])
    # lam_c is exactly 1 - the fraction of pixels that changed source
    assert lam_c == pytest.approx(1 - inside.float().mean().item())


def test_empty_box_gives_identity_and_lam_one():
    box, lam_c = cutmix_box(0.995, 6, 5, (12, 10))  # side int(12 * 0.07) = 0
    assert box[1] - box[0] == 0 and lam_c == 1.0
    x, _ = batch()
    assert torch.equal(paste_box(x, flip_partner(8), box), x)


def test_mixup_images_elementwise_and_identity_permutation():
    x, _ = batch()
    p = torch.tensor([3, 1, 0, 2, 7, 6, 5, 4])
    out = mixup_images(x, p, 0.3)
    for b in range(8):
        assert torch.allclose(out[b], 0.3 * x[b] + 0.7 * x[p[b]], atol=1e-6)
    assert torch.allclose(mixup_images(x, torch.arange(8), 0.3), x, atol=1e-6)


def test_hard_soft_equivalence_value_and_gradient():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(8, K, generator=g, requires_grad=True)
    y = torch.randint(0, K, (8,), generator=g)
    p = torch.randperm(8, generator=g)
    lam = 0.37
    hard = lam * F.cross_entropy(z, y) + (1 - lam) * F.cross_entropy(z, y[p])
    (g_hard,) = torch.autograd.grad(hard, z)
    soft = soft_target_cross_entropy(z, mix_targets(smooth_one_hot(y, K), p, lam))
    (g_soft,) = torch.autograd.grad(soft, z)
    assert soft.item() == pytest.approx(hard.item(), abs=1e-6)
    assert torch.allclose(g_soft, g_hard, atol=1e-6)


def test_lam_one_is_identity():
    x, y = batch()
    t = smooth_one_hot(y, K, 0.1)
    draws = MixDraws(partner=flip_partner(8), lam=torch.ones(8, dtype=torch.float64),
                     use_cutmix=torch.ones(8, dtype=torch.bool), cy=torch.full((8,), 5), cx=torch.full((8,), 5))
    for mode in ("batch", "elem"):
        draws.mode = mode
        x_mix, t_mix, lam, _ = apply_mix(x, t, draws)
        assert torch.equal(x_mix, x) and torch.equal(t_mix, t) and torch.all(lam == 1)


def test_flip_rejects_odd_batch():
    with pytest.raises(ReproError, match="even batch"):
        flip_partner(7)


def test_elem_mode_matches_plain_loop():
    """Per-sample mode against a loop over samples written from the spec."""
    x, y = batch(B=10)
    t = smooth_one_hot(y, K, 0.1)
    g = torch.Generator().manual_seed(7)
    draws = draw_mix(g, 10, (12, 10), 0.8, 1.0, prob=0.8, switch_prob=0.5, mode="elem", partner="randperm")
    x_mix, t_mix, lam, _ = apply_mix(x, t, draws)
    for b in range(10):
        p, lb = int(draws.partner[b]), float(draws.lam[b])
        if lb == 1.0:
            want_x, want_lam = x[b], 1.0
        elif draws.use_cutmix[b]:
            (yl, yh, xl, xh), want_lam = cutmix_box(lb, int(draws.cy[b]), int(draws.cx[b]), (12, 10))
            want_x = x[b].clone()
            want_x[:, yl:yh, xl:xh] = x[p][:, yl:yh, xl:xh]
        else:
            want_x, want_lam = lb * x[b] + (1 - lb) * x[p], lb
        assert torch.allclose(x_mix[b], want_x, atol=1e-6)
        assert float(lam[b]) == pytest.approx(want_lam)
        assert torch.allclose(t_mix[b], want_lam * t[b] + (1 - want_lam) * t[p], atol=1e-6)
    assert torch.allclose(t_mix.sum(1), torch.ones(10), atol=1e-6) and bool((t_mix >= 0).all())


def timm_draws_batch(rng_seed, B, H, W, ma, ca, prob, switch):
    """timm `_params_per_batch` + `rand_bbox` NumPy draw order, as explicit MixDraws."""
    rs = np.random.RandomState(rng_seed)
    lam, use_cut, cy, cx = 1.0, False, 0, 0
    if rs.rand() < prob:
        if ma > 0 and ca > 0:
            use_cut = rs.rand() < switch
            lam = float(rs.beta(ca, ca) if use_cut else rs.beta(ma, ma))
        elif ma > 0:
            lam = float(rs.beta(ma, ma))
        else:
            use_cut, lam = True, float(rs.beta(ca, ca))
        if use_cut and lam != 1.0:
            cy, cx = rs.randint(0, H), rs.randint(0, W)
    full = lambda v, dt: torch.full((B,), v, dtype=dt)
    return MixDraws(partner=flip_partner(B), lam=full(lam, torch.float64), use_cutmix=full(use_cut, torch.bool),
                    cy=full(cy, torch.long), cx=full(cx, torch.long), mode="batch")


def legacy_rand_bbox(img_shape, lam, margin=0.0, count=None):
    """timm <= 0.9's `rand_bbox` (as in the TransMix code base, timm 0.5.4) and the official CutMix code:
    the upper edge is cy + cut // 2, so an odd side loses one pixel. timm 1.0 changed it to (cut + 1) // 2."""
    ratio = np.sqrt(1 - lam)
    img_h, img_w = img_shape[-2:]
    cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
    cy = np.random.randint(0, img_h, size=count)
    cx = np.random.randint(0, img_w, size=count)
    yl, yh = np.clip(cy - cut_h // 2, 0, img_h), np.clip(cy + cut_h // 2, 0, img_h)
    xl, xh = np.clip(cx - cut_w // 2, 0, img_w), np.clip(cx + cut_w // 2, 0, img_w)
    return yl, yh, xl, xh


@pytest.fixture
def timm_legacy_box(monkeypatch):
    import timm.data.mixup as timm_mixup

    monkeypatch.setattr(timm_mixup, "rand_bbox", legacy_rand_bbox)


def test_installed_timm_box_rounding_is_known():
    """Our box follows the official CutMix/TransMix code; record how the installed timm differs (odd sides)."""
    import timm.data.mixup as timm_mixup

    np.random.seed(0)
    yl, yh, xl, xh = timm_mixup.rand_bbox((3, 16, 16), 1 - (5 / 16) ** 2)  # cut = 5, odd
    assert (yh - yl, xh - xl) in {(4, 4), (5, 5)} or min(yl, xl) == 0 or max(yh, xh) == 16
    box, _ = cutmix_box(1 - (5 / 16) ** 2, 8, 8, (16, 16))
    assert box == (6, 10, 6, 10)  # side 2 * (5 // 2) = 4, as the official code


@pytest.mark.parametrize("ma,ca,switch", [(0.8, 1.0, 0.5), (1.0, 0.0, 0.5), (0.0, 1.0, 0.5), (0.8, 1.0, 1.0)])
def test_batch_mode_matches_timm_mixup(ma, ca, switch, timm_legacy_box):
    for seed in range(12):
        x, y = batch(B=8, H=16, W=16, seed=seed)
        timm_mix = TimmMixup(mixup_alpha=ma, cutmix_alpha=ca, prob=0.9, switch_prob=switch, mode="batch",
                             label_smoothing=0.1, num_classes=K)
        np.random.seed(seed)
        x_timm, t_timm = timm_mix(x.clone(), y.clone())
        draws = timm_draws_batch(seed, 8, 16, 16, ma, ca, 0.9, switch)
        x_ours, t_ours, _, _ = apply_mix(x, smooth_one_hot(y, K, 0.1), draws)
        assert torch.equal(x_ours, x_timm), f"seed {seed}"
        assert torch.allclose(t_ours, t_timm, atol=1e-6), f"seed {seed}"


def test_elem_mode_matches_timm_mixup(timm_legacy_box):
    B, H, W = 8, 16, 16
    for seed in range(8):
        x, y = batch(B=B, H=H, W=W, seed=seed)
        timm_mix = TimmMixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.7, switch_prob=0.5, mode="elem",
                             label_smoothing=0.0, num_classes=K)
        np.random.seed(seed)
        x_timm, t_timm = timm_mix(x.clone(), y.clone())
        rs = np.random.RandomState(seed)  # timm `_params_per_elem` order, then one box per cut row in row order
        use_cut = rs.rand(B) < 0.5
        lam_mix = np.where(use_cut, rs.beta(1.0, 1.0, size=B), rs.beta(0.8, 0.8, size=B))
        lam = np.where(rs.rand(B) < 0.7, lam_mix.astype(np.float32), np.ones(B, np.float32))
        cy, cx = np.zeros(B, np.int64), np.zeros(B, np.int64)
        for b in range(B):
            if lam[b] != 1.0 and use_cut[b]:
                cy[b], cx[b] = rs.randint(0, H), rs.randint(0, W)
        draws = MixDraws(partner=flip_partner(B), lam=torch.from_numpy(lam.astype(np.float64)),
                         use_cutmix=torch.from_numpy(use_cut), cy=torch.from_numpy(cy), cx=torch.from_numpy(cx),
                         mode="elem")
        x_ours, t_ours, _, _ = apply_mix(x, smooth_one_hot(y, K), draws)
        assert torch.allclose(x_ours, x_timm, atol=1e-6), f"seed {seed}"
        assert torch.allclose(t_ours, t_timm, atol=1e-6), f"seed {seed}"


def test_pair_mode_mirrors_draws():
    g = torch.Generator().manual_seed(0)
    d = draw_mix(g, 8, (16, 16), 0.8, 1.0, mode="pair")
    assert torch.equal(d.lam, d.lam.flip(0)) and torch.equal(d.cy, d.cy.flip(0))
    x, y = batch(B=8, H=16, W=16)
    _, t_mix, _, _ = apply_mix(x, smooth_one_hot(y, K), d)
    assert torch.allclose(t_mix.sum(1), torch.ones(8), atol=1e-6)
    with pytest.raises(ReproError, match="pair"):
        draw_mix(g, 8, (16, 16), 0.8, 1.0, mode="pair", partner="randperm")


def test_same_generator_same_draws():
    a = draw_mix(torch.Generator().manual_seed(5), 8, (32, 32), 0.8, 1.0, mode="elem")
    b = draw_mix(torch.Generator().manual_seed(5), 8, (32, 32), 0.8, 1.0, mode="elem")
    for f in ("partner", "lam", "use_cutmix", "cy", "cx"):
        assert torch.equal(getattr(a, f), getattr(b, f))


def test_beta_one_draws_are_uniform_and_cutmix_area_is_sane():
    g = torch.Generator().manual_seed(11)
    d = draw_mix(g, 4000, (32, 32), 0.0, 1.0, mode="elem", partner="randperm")
    # Kolmogorov-Smirnov distance to U(0, 1); 1.95 / sqrt(n) is the 0.1 % critical value
    u = np.sort(d.lam.numpy())
    n = len(u)
    ks = max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n))
    assert ks < 1.95 / np.sqrt(n)
    _, lam_c = cutmix_boxes(d.lam, d.cy, d.cx, (32, 32))
    area = (1 - lam_c).mean().item()
    # E[1 - lam] = 0.5 minus what truncation and border clipping remove: estimate that expectation
    # independently with the longhand box on NumPy draws
    rs = np.random.RandomState(0)
    ref = [reference_box(lam, cy, cx, 32, 32) for lam, cy, cx in
           zip(rs.rand(20000), rs.randint(0, 32, 20000), rs.randint(0, 32, 20000))]
    expected = np.mean([(yh - yl) * (xh - xl) / 1024 for yl, yh, xl, xh in ref])
    assert 0.25 < expected < 0.45
    assert abs(area - expected) < 0.015
