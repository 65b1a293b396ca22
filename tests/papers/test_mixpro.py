"""MixPro: every invariant of shared spec mixpro.md §5, longhand references on fixed draws, gradients, bad inputs."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data import Mixup

from common.attention import explicit_cls_attention
from common.errors import ReproError
from common.methods import StepContext, build_method
from common.mixing import (
    MixDraws,
    flip_partner,
    sample_beta,
    smooth_one_hot,
    soft_target_cross_entropy,
)
from common.models import build_model
from papers import mixpro
from papers.mixpro.method import MaskMixDraws

REPO = Path(__file__).resolve().parents[2]
K, H, P_SIZE, S = 10, 32, 4, 8  # 32-px images, 4-px patches (8 x 8 tokens), 8-px cells (4 x 4 cells)
G, F_CELL, P = H // S, S // P_SIZE, H // P_SIZE
SMOOTH = 0.1


def method(name="mixpro", **options):
    opts = {"name": name, "mask_size": S, "patch_size": P_SIZE, **options}
    return build_method(opts, num_classes=K, label_smoothing=SMOOTH)


def batch(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, H, H, generator=g), torch.randint(0, K, (B,), generator=g)


def cells_from_perms(perms, n, grid=G):
    """Official utils.MaskMix as loops: the first n indices of each sample's permutation are set, row-major."""
    cells = torch.zeros(len(perms), grid, grid, dtype=torch.bool)
    for b, perm in enumerate(perms):
        for idx in list(perm)[:n]:
            cells[b, int(idx) // grid, int(idx) % grid] = True
    return cells


def longhand_mix(x, perm, cells, s=S):
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                keep = bool(cells[b, i // s, j // s])
                out[b, :, i, j] = x[b, :, i, j] if keep else x[int(perm[b]), :, i, j]
    return out


def longhand_target(labels, perm, lam_area, smoothing=SMOOTH):
    B = len(labels)
    out = torch.zeros(B, K, dtype=torch.float64)
    off = smoothing / K
    for b in range(B):
        for k in range(K):
            own = 1 - smoothing + off if k == labels[b] else off
            other = 1 - smoothing + off if k == labels[int(perm[b])] else off
            out[b, k] = lam_area * own + (1 - lam_area) * other
    return out


def longhand_pal(attn, cells, target, logits, lam_area, f=F_CELL, p=P):
    """Spec §2.5 element by element (float64): token (i, j) belongs to cell (i // f, j // f)."""
    B = attn.shape[0]
    lams, attns, factors = [], [], []
    for b in range(B):
        inside = total = 0.0
        for i in range(p):
            for j in range(p):
                a = float(attn[b, i * p + j])
                total += a
                if cells[b, i // f, j // f]:
                    inside += a
        lam_attn = inside / total
        z = [float(v) for v in logits[b]]
        m = max(z)
        e = [math.exp(v - m) for v in z]
        probs = [v / sum(e) for v in e]
        t = [float(v) for v in target[b]]
        dot = sum(a * c for a, c in zip(t, probs, strict=True))
        cos = dot / max(math.sqrt(sum(a * a for a in t)) * math.sqrt(sum(c * c for c in probs)), 1e-8)
        lams.append(cos * lam_attn + (1 - cos) * lam_area)
        attns.append(lam_attn)
        factors.append(cos)
    return torch.tensor(lams, dtype=torch.float64), torch.tensor(attns), torch.tensor(factors)


def longhand_loss(logits, labels, partner_labels, lam):
    total = 0.0
    for b in range(len(labels)):
        z = [float(v) for v in logits[b]]
        lse = max(z) + math.log(sum(math.exp(v - max(z)) for v in z))
        ce_own, ce_partner = lse - z[int(labels[b])], lse - z[int(partner_labels[b])]
        total += float(lam[b]) * ce_own + (1 - float(lam[b])) * ce_partner
    return total / len(labels)


def random_attention(B, seed=0, n=P * P):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, n, generator=g) * 0.9 / n


def maskmix_draws(B=6, seed=0, n=None):
    """Fixed MaskMix draws: a permutation with a fixed point, and n cells (random n unless given)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(B, generator=g)
    perm[perm == 0] = perm[0]
    perm[0] = 0  # row 0 is mixed with itself
    n = int(torch.randint(1, G * G + 1, (1,), generator=g)) if n is None else n
    perms = [torch.randperm(G * G, generator=g) for _ in range(B)]
    return MaskMixDraws(perm, 0.0, True, ratio=n / (G * G), cells=cells_from_perms(perms, n)), perms


# ----------------------------------------------------------------------------------------------------
# Longhand comparisons on fixed draws


@pytest.mark.parametrize("seed", range(4))
def test_images_targets_and_pal_match_longhand(seed):
    x, y = batch(6, seed)
    draws, _ = maskmix_draws(6, seed)
    m = method()
    x_mix, target, lam_area = m.apply(x, y, draws)
    assert torch.equal(x_mix, longhand_mix(x, draws.perm, draws.cells))
    assert lam_area == pytest.approx(int(draws.cells[0].sum()) / G**2)
    assert torch.allclose(target.double(), longhand_target(y, draws.perm, lam_area), atol=1e-7)
    attn, logits = random_attention(6, seed), torch.randn(6, K, generator=torch.Generator().manual_seed(seed))
    tokens = mixpro.token_mask(draws.cells, F_CELL, P)
    lam, lam_attn, factor = mixpro.pal_weights(attn, tokens, target, logits, lam_area)
    ref_lam, ref_attn, ref_factor = longhand_pal(attn, draws.cells, target, logits, lam_area)
    assert torch.allclose(lam_attn.double(), ref_attn.double(), atol=1e-6)
    assert torch.allclose(factor.double(), ref_factor.double(), atol=1e-6)
    assert torch.allclose(lam.double(), ref_lam, atol=1e-6)
    partner = y[draws.perm]
    loss = mixpro.pal_loss(logits, y, partner, lam)
    assert loss.item() == pytest.approx(longhand_loss(logits, y, partner, ref_lam), abs=1e-5)


def test_official_numpy_draw_order_gives_the_same_masks():
    """Parity with utils.MaskMix's NumPy order: beta, then one permutation per sample (sample 0 first)."""
    rs = np.random.RandomState(3)
    B, alpha = 5, 1.0
    ratio = rs.beta(alpha, alpha)
    n = int(np.ceil(G * G * ratio))
    perms = [rs.permutation(G * G) for _ in range(B)]
    official = np.zeros((B, G * G), dtype=int)
    for b in range(B):
        official[b][perms[b][:n]] = 1
    official = np.stack([o.reshape(G, G).repeat(S, axis=0).repeat(S, axis=1) for o in official])
    tokens_official = np.stack([o.reshape(G, G).repeat(F_CELL, 0).repeat(F_CELL, 1) for o in
                                np.stack([np.isin(np.arange(G * G), p[:n]).astype(int) for p in perms])])
    cells = cells_from_perms([torch.from_numpy(p) for p in perms], n)
    assert torch.equal(mixpro.pixel_mask(cells, S, H)[:, 0].long(), torch.from_numpy(official).long())
    assert torch.equal(mixpro.token_mask(cells, F_CELL, P).long(), torch.from_numpy(tokens_official).flatten(1).long())


def test_step_draw_order_is_randperm_rand_beta_then_cell_permutations():
    m = method(maskmix_prob=1.0)
    draws = m.draw_step(torch.Generator().manual_seed(11), 6, H)
    g = torch.Generator().manual_seed(11)
    perm = torch.randperm(6, generator=g)
    u = float(torch.rand(1, generator=g, dtype=torch.float64))
    r = float(sample_beta(1.0, 1, g)[0])
    order = torch.rand(6, G * G, generator=g).argsort(dim=1)
    n = math.ceil(G * G * r)
    assert draws.maskmix and torch.equal(draws.perm, perm) and draws.u == u and draws.ratio == r
    assert torch.equal(draws.cells, cells_from_perms(list(order), n))


# ----------------------------------------------------------------------------------------------------
# Spec §5 invariants


@pytest.mark.parametrize("alpha", [1.0, 0.4, 3.0])
def test_inv1_same_count_every_sample_and_lam_area_at_least_r(alpha):
    for seed in range(30):
        r, cells = mixpro.draw_maskmix(torch.Generator().manual_seed(seed), 7, G, alpha)
        n = math.ceil(G * G * r)
        assert cells.shape == (7, G, G) and cells.dtype == torch.bool
        assert cells.flatten(1).sum(1).tolist() == [n] * 7
        draws = MaskMixDraws(torch.arange(7), 0.0, True, ratio=r, cells=cells)
        assert draws.lam_area == n / G**2 and draws.lam_area >= r


def test_inv1_cell_positions_are_uniform_and_independent_across_samples():
    counts = torch.zeros(G * G)
    same = 0
    for seed in range(400):
        _, cells = mixpro.draw_maskmix(torch.Generator().manual_seed(seed), 2, G, 1.0)
        counts += cells[0].flatten().float() / cells[0].sum()
        same += bool(torch.equal(cells[0], cells[1]))
    assert torch.allclose(counts / 400, torch.full((G * G,), 1 / G**2), atol=0.02)
    assert same < 60  # a shared subset for the batch would make every pair equal


@pytest.mark.parametrize("seed", range(3))
def test_inv2_pixels_come_bit_exactly_from_one_source_and_mask_is_constant_on_cells(seed):
    x, y = batch(6, seed)
    draws, _ = maskmix_draws(6, seed)
    x_mix, _, _ = method().apply(x, y, draws)
    mask = mixpro.pixel_mask(draws.cells, S, H).expand_as(x)
    assert torch.equal(x_mix[mask], x[mask]) and torch.equal(x_mix[~mask], x[draws.perm][~mask])
    blocks = mask[:, 0].reshape(6, G, S, G, S)
    assert bool((blocks == blocks[:, :, :1, :, :1]).all())


def test_inv3_tokens_follow_cells_and_pixel_share_equals_lam_area():
    draws, _ = maskmix_draws(6, 5)
    tokens = mixpro.token_mask(draws.cells, F_CELL, P).view(6, P, P)
    up = draws.cells.repeat_interleave(F_CELL, 1).repeat_interleave(F_CELL, 2).float()
    assert torch.equal(tokens, up)
    pixels = mixpro.pixel_mask(draws.cells, S, H).float().mean(dim=(1, 2, 3))
    assert torch.equal(pixels, torch.full((6,), draws.lam_area))
    # each patch is pure: its pixels all carry its token's mask value
    patch_mask = mixpro.pixel_mask(draws.cells, S, H)[:, 0].reshape(6, P, P_SIZE, P, P_SIZE).float()
    assert torch.equal(patch_mask.amin(dim=(2, 4)), tokens) and torch.equal(patch_mask.amax(dim=(2, 4)), tokens)


def test_inv4_uniform_attention_gives_the_area_label_for_any_logits():
    draws, _ = maskmix_draws(6, 2)
    _, y = batch(6)
    target = mixpro.area_target(y, draws.perm, draws.lam_area, K, SMOOTH)
    attn = torch.full((6, P * P), 0.7 / (P * P))
    logits = torch.randn(6, K) * 4
    lam, lam_attn, _ = mixpro.pal_weights(attn, mixpro.token_mask(draws.cells, F_CELL, P), target, logits,
                                          draws.lam_area)
    assert torch.allclose(lam_attn, torch.full((6,), draws.lam_area), atol=1e-7)
    assert torch.allclose(lam, torch.full((6,), draws.lam_area), atol=1e-7)


def test_inv5_everything_in_unit_interval_and_lam_between_shares():
    for seed in range(10):
        draws, _ = maskmix_draws(8, seed)
        _, y = batch(8, seed)
        target = mixpro.area_target(y, draws.perm, draws.lam_area, K, SMOOTH)
        logits = torch.randn(8, K, generator=torch.Generator().manual_seed(seed)) * 5
        lam, lam_attn, factor = mixpro.pal_weights(random_attention(8, seed) ** 3,
                                                   mixpro.token_mask(draws.cells, F_CELL, P), target, logits,
                                                   draws.lam_area)
        for v in (lam, lam_attn, factor):
            assert bool(((v >= 0) & (v <= 1)).all())
        assert bool((factor > 0).all())  # smoothing keeps the target strictly positive
        lo = torch.minimum(lam_attn, torch.tensor(draws.lam_area))
        hi = torch.maximum(lam_attn, torch.tensor(draws.lam_area))
        assert bool(((lam >= lo - 1e-6) & (lam <= hi + 1e-6)).all())


def test_inv6_prediction_equal_to_area_target_gives_attention_label():
    draws, _ = maskmix_draws(6, 3, n=7)
    _, y = batch(6, 3)
    target = mixpro.area_target(y, draws.perm, draws.lam_area, K, SMOOTH)
    attn = random_attention(6, 1)
    lam, lam_attn, factor = mixpro.pal_weights(attn, mixpro.token_mask(draws.cells, F_CELL, P), target,
                                               target.log() + 2.5, draws.lam_area)
    assert torch.allclose(factor, torch.ones(6), atol=1e-6)
    assert torch.allclose(lam, lam_attn, atol=1e-6)
    assert not torch.allclose(lam_attn, torch.full((6,), draws.lam_area), atol=1e-3)  # the test can fail


def test_inv7_same_class_partner_and_fixed_point():
    x, y = batch(6, 4)
    draws, _ = maskmix_draws(6, 4)
    y = y.clone()
    y[3] = y[int(draws.perm[3])]
    x_mix, _, _ = method().apply(x, y, draws)
    assert int(draws.perm[0]) == 0 and torch.equal(x_mix[0], x[0])
    logits = torch.randn(6, K)
    ce = F.cross_entropy(logits, y, reduction="none")
    for lam_value in (0.0, 0.3, 1.0):
        lam = torch.full((6,), lam_value)
        per_sample = lam * ce + (1 - lam) * F.cross_entropy(logits, y[draws.perm], reduction="none")
        for b in (0, 3):
            assert per_sample[b].item() == pytest.approx(ce[b].item(), abs=1e-6)
        assert mixpro.pal_loss(logits, y, y[draws.perm], lam).item() == pytest.approx(per_sample.mean().item(),
                                                                                      abs=1e-6)


def test_inv8_all_cells_kept_is_the_identity():
    x, y = batch(6, 6)
    draws, _ = maskmix_draws(6, 6, n=G * G)
    x_mix, target, lam_area = method().apply(x, y, draws)
    assert torch.equal(x_mix, x) and lam_area == 1.0
    assert torch.allclose(target, smooth_one_hot(y, K, SMOOTH))
    lam, lam_attn, _ = mixpro.pal_weights(random_attention(6), mixpro.token_mask(draws.cells, F_CELL, P), target,
                                          torch.randn(6, K), lam_area)
    assert torch.allclose(lam_attn, torch.ones(6)) and torch.allclose(lam, torch.ones(6))


def test_inv9_area_target_rows_sum_to_one():
    for seed in range(5):
        draws, _ = maskmix_draws(6, seed)
        _, y = batch(6, seed)
        t = mixpro.area_target(y, draws.perm, draws.lam_area, K, SMOOTH)
        assert torch.allclose(t.sum(1), torch.ones(6), atol=1e-6) and bool((t > 0).all())


def analytic_logit_grad(logits, y, y2, lam_attn, lam_area, target, detach):
    """d loss / d z by hand: the constant-target soft-CE gradient, plus (official) the factor's term of §2.6."""
    B = logits.shape[0]
    p = logits.double().softmax(1)
    t = target.double()
    cos = (t * p).sum(1) / (t.norm(dim=1) * p.norm(dim=1))
    lam = cos * lam_attn.double() + (1 - cos) * lam_area
    onehot, onehot2 = F.one_hot(y, K).double(), F.one_hot(y2, K).double()
    grad = (p - (lam[:, None] * onehot + (1 - lam[:, None]) * onehot2)) / B
    if detach:
        return grad
    ce = -(p.log() * onehot).sum(1)
    ce2 = -(p.log() * onehot2).sum(1)
    dcos_dp = t / (t.norm(dim=1, keepdim=True) * p.norm(dim=1, keepdim=True)) - cos[:, None] * p / (
        p.norm(dim=1, keepdim=True) ** 2)
    dcos_dz = p * (dcos_dp - (dcos_dp * p).sum(1, keepdim=True))  # softmax Jacobian, symmetric
    return grad + ((lam_attn.double() - lam_area) * (ce - ce2) / B)[:, None] * dcos_dz


@pytest.mark.parametrize("detach", [False, True])
def test_inv10_loss_value_and_logit_gradient(detach):
    _, y = batch(6, 7)
    draws, _ = maskmix_draws(6, 7, n=5)
    target = mixpro.area_target(y, draws.perm, draws.lam_area, K, SMOOTH)
    logits = (torch.randn(6, K, generator=torch.Generator().manual_seed(1)) * 2).requires_grad_()
    lam, lam_attn, _ = mixpro.pal_weights(random_attention(6, 7) ** 2, mixpro.token_mask(draws.cells, F_CELL, P),
                                          target, logits, draws.lam_area, detach_factor=detach)
    y2 = y[draws.perm]
    loss = mixpro.pal_loss(logits, y, y2, lam)
    hard = lam[:, None] * F.one_hot(y, K) + (1 - lam[:, None]) * F.one_hot(y2, K)
    assert loss.item() == pytest.approx(soft_target_cross_entropy(logits, hard.detach()).item(), abs=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    want = analytic_logit_grad(logits.detach(), y, y2, lam_attn, draws.lam_area, target, detach)
    assert torch.allclose(grad.double(), want, atol=1e-6)
    constant = analytic_logit_grad(logits.detach(), y, y2, lam_attn, draws.lam_area, target, True)
    assert torch.allclose(grad.double(), constant, atol=1e-6) == detach  # the extra term is there iff not detached


def small_vit():
    torch.manual_seed(0)
    return build_model("vit_tiny_patch4_32", num_classes=K, depth=2, drop_path_rate=0.0)


@pytest.mark.parametrize("detach", [False, True])
def test_inv10_step_uses_same_pass_attention_and_official_gradient(detach):
    """Parameter gradients of the step equal a reference built from explicitly recomputed attention; with
    detach_pal_factor they equal soft CE against the target held constant, without it they differ."""
    m = method(maskmix_prob=1.0, detach_pal_factor=detach)
    model = small_vit().eval()  # eval: no dropout, so the explicit recomputation sees the same forward
    x, y = batch(8, 8)
    out = m.step(model, (x, y), StepContext(0, 0, 0.0, torch.Generator().manual_seed(5)))
    params = list(model.parameters())
    grads = torch.autograd.grad(out["loss"], params)

    draws = m.draw_step(torch.Generator().manual_seed(5), 8, H)
    x_mix, target, lam_area = m.apply(x, y, draws)
    attn = explicit_cls_attention(model, x_mix)
    logits = model(x_mix)
    lam, _, _ = mixpro.pal_weights(attn, mixpro.token_mask(draws.cells, F_CELL, P), target, logits, lam_area,
                                   detach_factor=detach)
    ref = mixpro.pal_loss(logits, y, y[draws.perm], lam)
    ref_grads = torch.autograd.grad(ref, params, retain_graph=True)
    hard = lam[:, None] * F.one_hot(y, K) + (1 - lam[:, None]) * F.one_hot(y[draws.perm], K)
    const_grads = torch.autograd.grad(soft_target_cross_entropy(logits, hard.detach()), params)
    assert out["loss"].item() == pytest.approx(ref.item(), abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, ref_grads, strict=True))
    same_as_const = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, const_grads, strict=True))
    assert same_as_const == detach
    stats = m.epoch_stats()
    assert stats["pal_samples"] == 8 and stats["maskmix_batches"] == 1 and 0 < stats["factor_mean"] <= 1


def numpy_timm_draws(seed, B):
    """timm's per-batch NumPy order (rand, rand, beta, randint, randint) as MixDraws with flip partners."""
    rs = np.random.RandomState(seed)
    rs.rand()  # gate (prob 1.0)
    use_cut = rs.rand() < 0.5
    lam = rs.beta(1.0, 1.0) if use_cut else rs.beta(0.8, 0.8)
    cy, cx = (rs.randint(0, H), rs.randint(0, H)) if use_cut else (0, 0)
    return MixDraws(partner=flip_partner(B), lam=torch.full((B,), lam, dtype=torch.float64),
                    use_cutmix=torch.full((B,), bool(use_cut)), cy=torch.full((B,), cy), cx=torch.full((B,), cx))


def test_inv11_other_branch_is_bit_identical_to_timm_mixup():
    """Mixup batches, and CutMix batches whose box side is even (timm 1.0's box upper edge rounds odd sides up,
    timm 0.4.12 of the official code does not), equal timm.data.Mixup's output on the same NumPy draws."""
    x, y = batch(6, 9)
    m = method(maskmix_prob=0.0)
    seen = set()
    for seed in range(60):
        draws = numpy_timm_draws(seed, 6)
        cut = bool(draws.use_cutmix[0])
        if cut and int(H * math.sqrt(1 - float(draws.lam[0]))) % 2:
            continue
        ours_x, ours_t, _ = m.apply(x, y, MaskMixDraws(torch.arange(6), 0.9, False, mix=draws))
        np.random.seed(seed)
        timm_mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=SMOOTH, num_classes=K)
        timm_x, timm_t = timm_mix(x.clone(), y.clone())
        assert torch.equal(ours_x, timm_x) and torch.allclose(ours_t, timm_t, atol=1e-7)
        seen.add(cut)
    assert seen == {True, False}


def test_inv11_randperm_and_branch_draw_are_consumed_before_timm_draws():
    x, y = batch(6, 10)
    m = method(maskmix_prob=0.0)
    model = build_model("resnet18_cifar", num_classes=K)  # no attention needed on this branch
    out = m.step(model, (x, y), StepContext(0, 0, 0.0, torch.Generator().manual_seed(2)))
    g = torch.Generator().manual_seed(2)
    torch.randperm(6, generator=g)
    torch.rand(1, generator=g, dtype=torch.float64)
    plain = build_method({"name": "mixup_cutmix"}, num_classes=K, label_smoothing=SMOOTH)
    x_mix, t_mix = plain.mix(x, y, g)
    assert out["maskmix"] == 0.0
    assert torch.allclose(out["loss"], soft_target_cross_entropy(model(x_mix), t_mix), atol=1e-6)


def test_branch_frequency_follows_maskmix_prob():
    m = method(maskmix_prob=0.5)
    g = torch.Generator().manual_seed(0)
    hits = sum(m.draw_step(g, 4, H).maskmix for _ in range(800))
    assert 340 < hits < 460
    assert not any(method(maskmix_prob=0.0).draw_step(g, 4, H).maskmix for _ in range(50))
    assert all(method(maskmix_prob=1.0).draw_step(g, 4, H).maskmix for _ in range(50))


def test_maskmix_without_pal_uses_soft_ce_on_area_target_and_any_model():
    m = method("maskmix", maskmix_prob=1.0)
    assert m.params.pal is False
    model = build_model("resnet18_cifar", num_classes=K)  # no class token: fine without PAL
    m.check_model(model)
    x, y = batch(6, 11)
    out = m.step(model, (x, y), StepContext(0, 0, 0.0, torch.Generator().manual_seed(4)))
    x_mix, target, lam = m.apply(x, y, m.draw_step(torch.Generator().manual_seed(4), 6, H))
    assert out["lam"] == lam
    assert torch.allclose(out["loss"], soft_target_cross_entropy(model(x_mix), target), atol=1e-6)


def test_same_generator_same_step_and_mix_for_figures():
    m = method()
    x, y = batch(6, 12)
    for seed in range(6):
        a = m.mix(x, y, torch.Generator().manual_seed(seed))
        b = m.mix(x, y, torch.Generator().manual_seed(seed))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------------------------------
# Bad inputs (§2.7 and the model check)


def test_inv12_mask_rule_errors_name_the_three_sizes():
    assert mixpro.mask_geometry(224, 56, 14) == (4, 4, 16)
    assert mixpro.mask_geometry(32, 8, 4) == (4, 2, 8)
    with pytest.raises(ReproError, match=r"mask_size=64, patch_size=16, img_size=224.*Admissible mask sizes: "
                                         r"\[16, 32, 112, 224\]"):
        mixpro.mask_geometry(224, 64, 16)
    with pytest.raises(ReproError, match="mask_size=56, patch_size=16, img_size=224"):
        mixpro.mask_geometry(224, 56, 16)
    assert mixpro.mask_geometry(224, 64, 16, allow_ragged=True) == (4, 4, 14)  # explicitly allowed
    with pytest.raises(ReproError, match="mask_size=10 must be a positive multiple of method.patch_size=4"):
        method(mask_size=10)
    m = method(mask_size=12)  # 12 % 4 == 0, but 32 % 12 != 0: refused at the first step
    with pytest.raises(ReproError, match="mask_size=12, patch_size=4, img_size=32"):
        m.step(small_vit(), batch(4), StepContext(0, 0, 0.0, torch.Generator().manual_seed(0)))


def test_ragged_mask_when_allowed_crops_the_last_cells():
    m = method(mask_size=12, allow_ragged_mask=True, maskmix_prob=1.0)
    x, y = batch(4, 13)
    draws = m.draw_step(torch.Generator().manual_seed(1), 4, H)
    assert draws.cells.shape == (4, 3, 3)  # ceil(32 / 12)
    x_mix, _, _ = m.apply(x, y, draws)
    assert torch.equal(x_mix, longhand_mix(x, draws.perm, draws.cells, s=12))


def test_model_checks():
    m = method()
    with pytest.raises(ReproError, match="class token"):
        m.check_model(build_model("resnet18_cifar", num_classes=K))
    with pytest.raises(ReproError, match="global_pool"):
        m.check_model(build_model("vit_tiny_patch4_32", num_classes=K, depth=1, global_pool="avg"))
    with pytest.raises(ReproError, match="method.patch_size=8 but the model's patches are"):
        method(mask_size=16, patch_size=8).check_model(small_vit())
    m.check_model(small_vit())


def test_odd_batch_needs_maskmix_only():
    x, y = batch(5)
    with pytest.raises(ReproError, match="even batch"):
        method().mix(x, y, torch.Generator().manual_seed(0))
    x_mix, _ = method(maskmix_prob=1.0).mix(x, y, torch.Generator().manual_seed(0))
    assert x_mix.shape == x.shape


# ----------------------------------------------------------------------------------------------------
# One short training run through the trainer


@pytest.mark.parametrize("label", ["mixpro"])
def test_smoke_config_trains_through_the_trainer(tmp_path, label):
    from common.train import main

    config = REPO / "papers/mixpro/configs/smoke/cifar10_vit.yaml"
    out = tmp_path / label
    assert main(["--config", str(config), "--method", label, "--output", str(out), "train.epochs=1",
                 "train.max_steps_per_epoch=3", "train.batch_size=32", "data.num_workers=0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "mixpro" and 0 <= metrics["final"]["top1"] <= 100
    row = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    stats = row["method_stats"]
    assert stats["batches"] == 3 and 0.0 <= row["train_maskmix"] <= 1.0
    assert stats["pal_samples"] == 32 * stats["maskmix_batches"]
