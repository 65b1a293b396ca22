"""SMMix: every invariant of shared spec smmix.md §5, and longhand references on fixed draws."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from common.attention import explicit_attention_matrix
from common.errors import ReproError
from common.methods import StepContext, build_method
from common.mixing import flip_partner, smooth_one_hot
from common.models import build_model
from papers import smmix
from papers.smmix.model import SMMixVisionTransformer

REPO = Path(__file__).resolve().parents[2]
K, H, P = 10, 32, 4
SIDE = H // P  # 8 x 8 token grid, 4 px cells
EPS = 0.1


def rand_attention(B, side=SIDE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, side * side, generator=g)


def batch(B=8, seed=0, side_px=H):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, side_px, side_px, generator=g), torch.randint(0, K, (B,), generator=g)


def small_model(drop_path=0.0, **kwargs):
    torch.manual_seed(0)
    return build_model("smmix_vit_tiny_patch4_32", num_classes=K, depth=2, drop_path_rate=drop_path, **kwargs)


# ------------------------------------------------------------------------------------------ longhand
def longhand_windows(attn, side, s):
    """Brute force over windows, row-major by top-left; strict comparisons keep the first on ties."""
    B = attn.shape[0]
    out_min, out_max = [], []
    for b in range(B):
        grid = attn[b].double().view(side, side)
        best_min = best_max = None
        for r in range(side - s + 1):
            for c in range(side - s + 1):
                total = sum(float(grid[r + i, c + j]) for i in range(s) for j in range(s))
                if best_min is None or total < best_min[0]:
                    best_min = (total, r, c)
                if best_max is None or total > best_max[0]:
                    best_max = (total, r, c)
        out_min.append(best_min[1:])
        out_max.append(best_max[1:])
    return out_min, out_max


def longhand_mix(x, target_rc, source_rc, s, side):
    """Pixel loops: row b gets partner B-1-b's source window over its own target window."""
    B, C, Hx, _ = x.shape
    c = Hx // side
    out = x.clone()
    for b in range(B):
        (rt, ct), (rs, cs) = target_rc[b], source_rc[B - 1 - b]
        for ch in range(C):
            for i in range(s * c):
                for j in range(s * c):
                    out[b, ch, rt * c + i, ct * c + j] = x[B - 1 - b, ch, rs * c + i, cs * c + j]
    return out


def longhand_sce(logits, target):
    B, Kc = logits.shape
    total = 0.0
    for b in range(B):
        z = [float(v) for v in logits[b]]
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        total += -sum(float(target[b, k]) * (z[k] - lse) for k in range(Kc))
    return total / B


def longhand_kl(logits, q):
    B, Kc = logits.shape
    total = 0.0
    for b in range(B):
        z = [float(v) for v in logits[b]]
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        total += sum(float(q[b, k]) * (math.log(float(q[b, k])) - (z[k] - lse)) for k in range(Kc))
    return total / B


def longhand_targets(labels, lam):
    B = labels.shape[0]
    t = torch.zeros(B, K, dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            own = 1 - EPS + EPS / K if labels[b] == k else EPS / K
            other = 1 - EPS + EPS / K if labels[B - 1 - b] == k else EPS / K
            t[b, k] = lam * own + (1 - lam) * other
    return t


# ------------------------------------------------------------------------------------ draws (§5.1)
def test_window_sizes_are_the_official_lists():
    assert smmix.window_sizes(14) == list(range(3, 11))  # DeiT/16 at 224 px
    assert smmix.window_sizes(7) == [1, 2, 3, 4, 5]  # PVT's last stage
    assert smmix.window_sizes(8) == [2, 3, 4, 5, 6]  # our 32 px / 4 px ViTs


def test_draw_order_and_law_from_the_generator():
    sizes = smmix.window_sizes(SIDE)
    for seed in range(40):
        d = smmix.draw_smmix(torch.Generator().manual_seed(seed), SIDE, sizes, 0.8, 0.5)
        g = torch.Generator().manual_seed(seed)  # the same order written out: u, then s (or the Beta lam)
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        assert d.use_smmix == (u < 0.5)
        if d.use_smmix:
            assert d.window == sizes[int(torch.randint(len(sizes), (), generator=g))]
            assert sizes[0] <= d.window <= sizes[-1]
            assert d.lam == 1 - d.window**2 / SIDE**2
        else:
            seed_beta = int(torch.randint(0, 2**62, (1,), generator=g))
            assert d.lam == np.random.default_rng(seed_beta).beta(0.8, 0.8) and 0 <= d.lam <= 1
    always = [smmix.draw_smmix(torch.Generator().manual_seed(s), SIDE, sizes, 0.8, 1.0) for s in range(10)]
    never = [smmix.draw_smmix(torch.Generator().manual_seed(s), SIDE, sizes, 0.8, 0.0) for s in range(10)]
    assert all(d.use_smmix for d in always) and not any(d.use_smmix for d in never)
    assert {d.window for d in always} <= set(sizes)


def test_window_side_law_is_uniform():
    sizes = smmix.window_sizes(14)
    counts = dict.fromkeys(sizes, 0)
    g = torch.Generator().manual_seed(0)
    for _ in range(4000):
        d = smmix.draw_smmix(g, 14, sizes, 0.8, 1.0)
        counts[d.window] += 1
    assert all(abs(n / 4000 - 1 / len(sizes)) < 0.03 for n in counts.values())


# ---------------------------------------------------------------------------- windows (§5.2, §5.5, §5.6)
@pytest.mark.parametrize("side,s", [(8, 2), (8, 4), (8, 6), (14, 3), (14, 10), (7, 1), (7, 5)])
def test_windows_match_brute_force(side, s):
    attn = rand_attention(6, side, seed=side * 100 + s)
    partner = flip_partner(6)
    target_tokens, source_tokens = smmix.select_windows(attn, side, s, partner)
    lo, hi = longhand_windows(attn, side, s)
    for b in range(6):
        rt, ct = lo[b]
        rs, cs = hi[5 - b]  # the source window is the partner's most-attended one
        assert target_tokens[b].tolist() == [(rt + i) * side + ct + j for i in range(s) for j in range(s)]
        assert source_tokens[b].tolist() == [(rs + i) * side + cs + j for i in range(s) for j in range(s)]


def test_window_scores_are_window_sums():
    attn = rand_attention(3, 8, seed=5)
    scores = smmix.window_scores(attn, 8, 3)
    assert scores.shape == (3, 36)
    grid = attn.view(3, 8, 8)
    for b in range(3):
        for r in range(6):
            for c in range(6):
                assert scores[b, r * 6 + c].item() == pytest.approx(grid[b, r:r + 3, c:c + 3].sum().item(), rel=1e-6)


def test_uniform_attention_takes_the_top_left_windows():
    """§5.4 with an exactly representable 1/64: every window sum ties, both windows are the first."""
    x, _ = batch(6, seed=1)
    attn = torch.full((6, SIDE * SIDE), 1.0 / 64)
    partner = flip_partner(6)
    for s in smmix.window_sizes(SIDE):
        x_mix, mask = smmix.mix_windows(x, partner, *smmix.select_windows(attn, SIDE, s, partner), SIDE)
        c = P
        assert torch.equal(x_mix[:, :, :s * c, :s * c], x.flip(0)[:, :, :s * c, :s * c])
        outside = torch.ones(H, H, dtype=torch.bool)
        outside[:s * c, :s * c] = False
        assert torch.equal(x_mix[:, :, outside], x[:, :, outside])
        assert mask.view(6, SIDE, SIDE)[:, :s, :s].all() and mask.sum().item() == 6 * s * s


def test_single_peak_attention():
    """§5.5: a one-token partner attention gives the first window containing it; the own target avoids its peak."""
    B, s = 8, 3
    g = torch.Generator().manual_seed(3)
    peaks = torch.randint(0, SIDE, (B, 2), generator=g)
    peaks[0] = torch.tensor([0, 0])
    peaks[1] = torch.tensor([7, 7])
    peaks[2] = torch.tensor([1, 6])
    attn = torch.zeros(B, SIDE * SIDE)
    attn[torch.arange(B), peaks[:, 0] * SIDE + peaks[:, 1]] = 1.0
    partner = flip_partner(B)
    target_tokens, source_tokens = smmix.select_windows(attn, SIDE, s, partner)
    for b in range(B):
        i, j = peaks[B - 1 - b].tolist()
        r, c = max(0, i - s + 1), max(0, j - s + 1)
        assert source_tokens[b, 0].item() == r * SIDE + c
        own = peaks[b, 0].item() * SIDE + peaks[b, 1].item()
        first_free = next((r0, c0) for r0 in range(SIDE - s + 1) for c0 in range(SIDE - s + 1)
                          if not (r0 <= peaks[b, 0] < r0 + s and c0 <= peaks[b, 1] < c0 + s))
        assert target_tokens[b, 0].item() == first_free[0] * SIDE + first_free[1]
        assert own not in target_tokens[b].tolist()


# ------------------------------------------------------------------------------------ mixing (§5.2, §5.3)
@pytest.mark.parametrize("s,seed", [(2, 0), (4, 1), (6, 2), (5, 3)])
def test_mixed_images_match_pixel_loops(s, seed):
    x, _ = batch(6, seed=seed)
    attn = rand_attention(6, seed=seed + 10)
    partner = flip_partner(6)
    x_mix, mask = smmix.mix_windows(x, partner, *smmix.select_windows(attn, SIDE, s, partner), SIDE)
    lo, hi = longhand_windows(attn, SIDE, s)
    assert torch.equal(x_mix, longhand_mix(x, lo, hi, s, SIDE))  # bit-identical copies, same layout
    for b in range(6):
        grid = mask[b].view(SIDE, SIDE)
        rows, cols = torch.nonzero(grid, as_tuple=True)
        assert grid.sum().item() == s * s
        assert (rows.max() - rows.min() + 1).item() == s and (cols.max() - cols.min() + 1).item() == s
        assert (rows.min().item(), cols.min().item()) == lo[b]
    target_mask = ~mask
    assert not (mask & target_mask).any() and (mask | target_mask).all()


def test_mixing_at_224_px_with_16_px_cells():
    x, _ = batch(4, seed=7, side_px=224)
    attn = rand_attention(4, 14, seed=8)
    partner = flip_partner(4)
    x_mix, _ = smmix.mix_windows(x, partner, *smmix.select_windows(attn, 14, 4, partner), 14)
    lo, hi = longhand_windows(attn, 14, 4)
    for b in range(4):
        (rt, ct), (rs, cs) = lo[b], hi[3 - b]
        assert torch.equal(x_mix[b, :, rt * 16:(rt + 4) * 16, ct * 16:(ct + 4) * 16],
                           x[3 - b, :, rs * 16:(rs + 4) * 16, cs * 16:(cs + 4) * 16])
        keep = torch.ones(224, 224, dtype=torch.bool)
        keep[rt * 16:(rt + 4) * 16, ct * 16:(ct + 4) * 16] = False
        assert torch.equal(x_mix[b][:, keep], x[b][:, keep])


def test_images_not_divisible_by_the_grid_are_rejected():
    x, _ = batch(4, side_px=30)
    tokens = torch.zeros(4, 4, dtype=torch.long)
    with pytest.raises(ReproError, match="multiple of the token grid"):
        smmix.mix_windows(x, flip_partner(4), tokens, tokens, SIDE)


# ------------------------------------------------------------------------------------ targets (§5.1, §5.7)
@pytest.mark.parametrize("s", [2, 3, 6])
def test_targets_match_longhand(s):
    _, labels = batch(8, seed=s)
    lam = 1 - s * s / SIDE**2
    t, y_t, y_s = smmix.smmix_targets(labels, K, lam, flip_partner(8), smoothing=EPS)
    assert torch.allclose(t.double(), longhand_targets(labels, lam), atol=1e-7)
    assert torch.allclose(t.sum(1), torch.ones(8)) and bool((t >= 0).all())
    assert torch.equal(y_t, smooth_one_hot(labels, K, EPS)) and torch.equal(y_s, y_t.flip(0))


def test_consistency_target_mixes_logits_then_softmaxes():
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(6, K, generator=g) * 3
    lam = 0.75
    q = smmix.consistency_target(z0, lam, flip_partner(6))
    for b in range(6):
        mixed = [lam * float(z0[b, k]) + (1 - lam) * float(z0[5 - b, k]) for k in range(K)]
        norm = sum(math.exp(v) for v in mixed)
        assert q[b].tolist() == pytest.approx([math.exp(v) / norm for v in mixed], abs=1e-6)
    assert torch.allclose(q.sum(1), torch.ones(6))
    # not the mix of the two softmaxes
    assert not torch.allclose(q, lam * z0.softmax(1) + (1 - lam) * z0.flip(0).softmax(1), atol=1e-3)
    const = torch.randn(1, K, generator=g).expand(6, K)
    assert torch.allclose(smmix.consistency_target(const, 0.3, flip_partner(6)), const.softmax(1).expand(6, K))


# -------------------------------------------------------------------------------------------- loss (§5.8)
def test_loss_matches_longhand():
    g = torch.Generator().manual_seed(11)
    z, z_t, z_s = (torch.randn(6, K, generator=g) for _ in range(3))
    _, labels = batch(6, seed=4)
    lam = 1 - 9 / 64
    t, y_t, y_s = smmix.smmix_targets(labels, K, lam, flip_partner(6), EPS)
    q = smmix.consistency_target(torch.randn(6, K, generator=g), lam, flip_partner(6))
    total, parts = smmix.smmix_loss(z, z_t, z_s, t, y_t, y_s, q)
    want_cls = longhand_sce(z, t)
    want_fine = 0.5 * (longhand_sce(z_t, y_t) + longhand_sce(z_s, y_s))
    want_con = longhand_kl(z, q)
    assert parts["loss_cls"].item() == pytest.approx(want_cls, abs=1e-5)
    assert parts["loss_fine"].item() == pytest.approx(want_fine, abs=1e-5)
    assert parts["loss_consistency"].item() == pytest.approx(want_con, abs=1e-5)
    assert total.item() == pytest.approx(want_cls + want_fine + want_con, abs=1e-5)
    weighted, _ = smmix.smmix_loss(z, z_t, z_s, t, y_t, y_s, q, fine_weight=0.0, consistency_weight=2.0)
    assert weighted.item() == pytest.approx(want_cls + 2 * want_con, abs=1e-5)


def test_kl_term_vanishes_at_the_consistency_target():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, K, generator=g).softmax(1)
    z = q.log() + 5.0  # softmax(z) = q
    t = smooth_one_hot(torch.arange(4), K, EPS)
    _, parts = smmix.smmix_loss(z, z, z, t, t, t, q)
    assert abs(parts["loss_consistency"].item()) < 1e-6
    _, parts = smmix.smmix_loss(z + torch.randn(4, K, generator=g), z, z, t, t, t, q)
    assert parts["loss_consistency"].item() > 1e-3


# ------------------------------------------------------------------------------- model and motivating pass
def test_motivating_pass_is_eval_no_grad_and_leaves_train_mode():
    """§5.9 and §2.3: eval mode inside (drop path off), no graph, train mode after; a = patch-patch column mean."""
    model = small_model(drop_path=0.5).train()
    x, _ = batch(4, seed=3)
    modes = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: modes.append(module.training))
    z0, attn = smmix.motivating_pass(model, x)
    assert modes == [False] and model.training and all(m.training for m in model.modules())
    assert not z0.requires_grad and not attn.requires_grad and z0.grad_fn is None
    z0_again, attn_again = smmix.motivating_pass(model, x)  # eval: deterministic despite drop path 0.5
    assert torch.equal(z0, z0_again) and torch.equal(attn, attn_again)
    model.eval()
    full = explicit_attention_matrix(model, x)  # (B, heads, T, T), explicit path of common.attention
    want = full[:, :, 1:, 1:].mean(dim=(1, 2))
    assert torch.allclose(attn, want, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(z0, model(x), atol=1e-6)
    # each head's row sums to 1 over all T keys, so the patch columns hold a little less than 1
    assert bool((attn.sum(1) < 1).all()) and bool((attn.sum(1) > 0.5).all())


def test_token_head_outputs_are_masked_means():
    model = small_model().eval()
    x, _ = batch(4, seed=6)
    mask = torch.zeros(4, SIDE * SIDE, dtype=torch.bool)
    mask[:, [0, 1, 8, 9]] = True
    mask[2, :] = False
    mask[2, 30:39] = True
    with torch.no_grad():
        z, z_t, z_s = model(x, source_mask=mask)
        tokens = model.forward_features(x)
        assert torch.allclose(z, model.head(tokens[:, 0]), atol=1e-6)
        for b in range(4):
            inside = [n for n in range(64) if mask[b, n]]
            outside = [n for n in range(64) if not mask[b, n]]
            mean_s = sum(tokens[b, 1 + n] for n in inside) / len(inside)
            mean_t = sum(tokens[b, 1 + n] for n in outside) / len(outside)
            assert torch.allclose(z_s[b], model.token_head(mean_s), atol=1e-5)
            assert torch.allclose(z_t[b], model.token_head(mean_t), atol=1e-5)
    assert model.token_head.bias.abs().sum() == 0 and model.token_head.weight.std() < 0.05


def test_token_head_leaves_the_backbone_initialisation_alone():
    torch.manual_seed(0)
    plain = build_model("vit_tiny_patch4_32", num_classes=K, depth=2)
    with_head = small_model()
    for (name, a), (_, b) in zip(plain.state_dict().items(), with_head.state_dict().items(), strict=False):
        assert torch.equal(a, b), name
    assert set(with_head.state_dict()) - set(plain.state_dict()) == {"token_head.weight", "token_head.bias"}


# ------------------------------------------------------------------------------------------ the step
def longhand_step_loss(model, x, y, generator_seed):
    """The whole SMMix step rebuilt from the model's explicit pieces, loops and a fresh generator."""
    sizes = smmix.window_sizes(SIDE)
    d = smmix.draw_smmix(torch.Generator().manual_seed(generator_seed), SIDE, sizes, 0.8, 1.0)
    s, lam = d.window, 1 - d.window**2 / SIDE**2
    model.eval()
    with torch.no_grad():
        z0 = model(x)
        attn = explicit_attention_matrix(model, x)[:, :, 1:, 1:].mean(dim=(1, 2))
    model.train()
    lo, hi = longhand_windows(attn, SIDE, s)
    x_mix = longhand_mix(x, lo, hi, s, SIDE)
    B = x.shape[0]
    mask = torch.zeros(B, SIDE * SIDE, dtype=torch.bool)
    for b in range(B):
        for i in range(s):
            for j in range(s):
                mask[b, (lo[b][0] + i) * SIDE + lo[b][1] + j] = True
    z, z_t, z_s = model(x_mix, source_mask=mask)
    ybar = smooth_one_hot(y, K, EPS)
    q = torch.zeros(B, K)
    for b in range(B):
        q[b] = (lam * z0[b] + (1 - lam) * z0[B - 1 - b]).softmax(0)
    t = longhand_targets(y, lam)
    with torch.no_grad():
        value = (longhand_sce(z, t) + 0.5 * (longhand_sce(z_t, ybar) + longhand_sce(z_s, ybar.flip(0)))
                 + longhand_kl(z, q))
    return value, lam, s


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_smmix_step_matches_longhand(seed):
    model = small_model().train()  # drop path 0: the train forward is deterministic
    method = build_method({"name": "smmix", "switch_prob": 1.0}, num_classes=K, label_smoothing=EPS)
    method.check_model(model)
    x, y = batch(8, seed=seed)
    out = method.step(model, (x, y), StepContext(0, 0, 0.0, torch.Generator().manual_seed(seed)))
    want, lam, s = longhand_step_loss(model, x, y, seed)
    assert out["smmix_batch"] == 1.0 and out["lam"] == lam
    assert out["loss"].item() == pytest.approx(want, abs=1e-4)
    out["loss"].backward()
    assert model.token_head.weight.grad is not None and model.token_head.weight.grad.abs().sum() > 0
    assert model.training
    stats = method.epoch_stats()
    assert stats["smmix_batches"] == 1 and stats["window_counts"] == {str(s): 1}


@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_loss_finite_at_smallest_and_largest_windows(ratio):
    model = small_model(drop_path=0.1).train()
    method = build_method({"name": "smmix", "switch_prob": 1.0, "min_side_ratio": ratio, "max_side_ratio": ratio},
                          num_classes=K, label_smoothing=EPS)
    x, y = batch(8, seed=2)
    out = method.step(model, (x, y), StepContext(0, 0, 0.0, torch.Generator().manual_seed(0)))
    assert math.isfinite(out["loss"].item()) and out["lam"] == 1 - int(SIDE * ratio) ** 2 / SIDE**2
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_mixup_branch_is_plain_mixup_without_token_head():
    """§5.10: switch 0 gives per-batch Mixup with the drawn lam and never calls the token head."""
    model = small_model().eval()  # eval: the reference forward sees the same network
    calls = []
    model.token_head.register_forward_hook(lambda *args: calls.append(1))
    method = build_method({"name": "smmix", "switch_prob": 0.0}, num_classes=K, label_smoothing=EPS)
    x, y = batch(8, seed=9)
    out = method.step(model, (x, y), StepContext(0, 0, 0.0, torch.Generator().manual_seed(4)))
    lam = smmix.draw_smmix(torch.Generator().manual_seed(4), SIDE, smmix.window_sizes(SIDE), 0.8, 0.0).lam
    assert out["lam"] == lam and out["smmix_batch"] == 0.0
    x_mix = x * lam + x.flip(0) * (1 - lam)
    target = longhand_targets(y, lam)
    with torch.no_grad():
        assert out["loss"].item() == pytest.approx(longhand_sce(model(x_mix), target), abs=1e-5)
    assert calls == []
    plain = build_method({"name": "mixup_cutmix", "mixup_alpha": 0.8, "cutmix_alpha": 0.0},
                         num_classes=K, label_smoothing=EPS)
    x_plain, t_plain = plain.mix(x, y, torch.Generator().manual_seed(0))
    assert x_plain.shape == x_mix.shape and torch.allclose(t_plain.sum(1), torch.ones(8))


def test_same_generator_same_step_and_official_draw_parity():
    model = small_model(drop_path=0.0).train()
    method = build_method({"name": "smmix"}, num_classes=K, label_smoothing=EPS)
    x, y = batch(8, seed=1)
    losses = [method.step(model, (x, y), StepContext(0, 0, 0.0, torch.Generator().manual_seed(21)))["loss"].item()
              for _ in range(2)]
    assert losses[0] == losses[1]
    # the official order (NumPy u, then Python random.choice over [(s, s), ...]) fed to the pure functions
    rs, py = np.random.RandomState(0), random.Random(0)
    u = rs.rand()
    sizes = [(s, s) for s in smmix.window_sizes(14)]
    if u < 0.5:
        s = py.choice(sizes)[0]
        attn = rand_attention(4, 14, seed=3)
        x224, _ = batch(4, side_px=224)
        x_mix, mask = smmix.mix_windows(x224, flip_partner(4), *smmix.select_windows(attn, 14, s, flip_partner(4)), 14)
        assert mask.sum().item() == 4 * s * s and not torch.equal(x_mix, x224)
    else:
        assert 0 <= rs.beta(0.8, 0.8) <= 1


# ------------------------------------------------------------------------------------------ bad input
def test_odd_batch_is_rejected():
    method = build_method({"name": "smmix"}, num_classes=K)
    x, y = batch(7)
    with pytest.raises(ReproError, match="even batch"):
        method.step(small_model(), (x, y), StepContext(0, 0, 0.0, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("name,kwargs,match", [
    ("vit_tiny_patch4_32", {"depth": 2}, "smmix_vit_tiny_patch4_32"),
    ("resnet18_cifar", {}, "token head"),
    ("smmix_vit_tiny_patch4_32", {"depth": 2, "global_pool": "avg"}, "global_pool"),
    ("smmix_vit_tiny_patch4_32", {"depth": 2, "class_token": False, "global_pool": "avg"}, "class token|global_pool"),
])
def test_unsuitable_models_are_rejected(name, kwargs, match):
    method = build_method({"name": "smmix"}, num_classes=K)
    with pytest.raises(ReproError, match=match):
        method.check_model(build_model(name, num_classes=K, **kwargs))


@pytest.mark.parametrize("options,match", [
    ({"side": 14}, "token grid is 8"),
    ({"min_side_ratio": 0.1, "max_side_ratio": 0.12}, "do not fit"),
])
def test_window_options_that_do_not_fit_the_model_are_rejected(options, match):
    method = build_method({"name": "smmix", **options}, num_classes=K)
    with pytest.raises(ReproError, match=match):
        method.check_model(small_model())


@pytest.mark.parametrize("options", [{"switch_prob": 1.5}, {"mixup_alpha": 0.0}, {"max_side_ratio": 1.0},
                                     {"min_side_ratio": 0.6, "max_side_ratio": 0.5}, {"side": 1},
                                     {"cutmix_alpha": 1.0}])
def test_bad_options_are_rejected(options):
    with pytest.raises(ReproError):
        build_method({"name": "smmix", **options}, num_classes=K)


def test_regression_task_is_rejected():
    with pytest.raises(ReproError, match="classification"):
        build_method({"name": "smmix"}, num_classes=1, task="regression")


def test_registered_models_build_with_the_right_grids():
    for name, grid, dim in [("smmix_vit_tiny_patch4_32", 8, 192), ("smmix_deit_small_patch16_224", 14, 384)]:
        model = build_model(name, num_classes=5, depth=1)
        assert isinstance(model, SMMixVisionTransformer) and model.token_grid == (grid, grid)
        assert model.token_head.in_features == dim and model.token_head.out_features == 5
    with pytest.raises(ReproError, match="pretrained"):
        build_model("smmix_deit_tiny_patch16_224", num_classes=5, pretrained=True)


def test_figure_mix_without_a_model_uses_uniform_attention():
    method = build_method({"name": "smmix", "switch_prob": 1.0}, num_classes=K, label_smoothing=EPS)
    x, y = batch(8, seed=3)
    x_mix, t = method.mix(x, y, torch.Generator().manual_seed(0))
    s = smmix.draw_smmix(torch.Generator().manual_seed(0), SIDE, smmix.window_sizes(SIDE), 0.8, 1.0).window
    assert torch.equal(x_mix[:, :, :s * P, :s * P], x.flip(0)[:, :, :s * P, :s * P])
    assert torch.allclose(t.double(), longhand_targets(y, 1 - s * s / 64), atol=1e-7)


# ------------------------------------------------------------------------------------------ the trainer
def test_smoke_config_trains_through_the_trainer(tmp_path):
    from common.train import main

    config = REPO / "papers/smmix/configs/smoke/cifar10_vit.yaml"
    out = tmp_path / "smmix"
    assert main(["--config", str(config), "--method", "smmix", "--output", str(out), "train.epochs=1",
                 "train.max_steps_per_epoch=4", "train.batch_size=32", "data.num_workers=0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "smmix" and 0 <= metrics["final"]["top1"] <= 100
    row = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    stats = row["method_stats"]
    assert stats["smmix_batches"] + stats["mixup_batches"] == 4
    assert row["train_smmix_batch"] == pytest.approx(stats["smmix_batches"] / 4)
    assert math.isfinite(row["train_loss"])
    # the logged consistency loss is the per-step KL averaged over all 4 batches (Mixup batches log 0): it matches
    # the method's own mean over its SMMix batches, is positive when there were any, and is part of the loss
    n = stats["smmix_batches"]
    assert row["train_loss_consistency"] == pytest.approx(stats.get("mean_loss_consistency", 0.0) * n / 4, rel=1e-5)
    assert (row["train_loss_consistency"] > 0) == (n > 0)
    assert row["train_loss"] > row["train_loss_fine"] + row["train_loss_consistency"]
