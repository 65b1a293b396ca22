"""TransMix: every invariant of shared spec transmix.md §5, and a longhand reference on fixed draws."""

import numpy as np
import pytest
import torch

from common.attention import explicit_cls_attention
from common.errors import ReproError
from common.methods import StepContext, build_method
from common.mixing import MixDraws, apply_mix, flip_partner, smooth_one_hot, soft_target_cross_entropy
from common.models import build_model
from papers import transmix

K, H, W, P = 10, 32, 32, 4  # 8 x 8 token grid
G = H // P


def draw_attention(B, seed=0, N=G * G):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, N, generator=g) * 0.9 / N  # positive rows that sum to < 1, like the raw cls row


def longhand_target(labels, attn, box, smoothing):
    """Spec §2.6 as loops: token in box iff its top-left pixel is; weights; smoothed targets."""
    B, N = attn.shape
    g = round(N**0.5)
    yl, yh, xl, xh = box
    off = smoothing / K
    out = torch.zeros(B, K, dtype=torch.float64)
    for b in range(B):
        w_in = w_out = 0.0
        for i in range(g):
            for j in range(g):
                py, px = (i * H) // g, (j * W) // g
                inside = yl <= py < yh and xl <= px < xh
                if inside:
                    w_in += float(attn[b, i * g + j])
                else:
                    w_out += float(attn[b, i * g + j])
        lam_area = (yh - yl) * (xh - xl) / (H * W)
        w = 0.5 * lam_area + 0.5 * (w_in / (w_in + w_out))
        for k in range(K):
            own = (1 - smoothing + off) if labels[b] == k else off
            partner = (1 - smoothing + off) if labels[B - 1 - b] == k else off
            out[b, k] = (1 - w) * own + w * partner
    return out


@pytest.mark.parametrize("box", [(4, 20, 8, 30), (0, 32, 0, 32), (5, 6, 7, 8), (12, 12, 3, 30), (0, 13, 19, 32)])
def test_target_matches_longhand_element_for_element(box):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, K, (6,), generator=g)
    attn = draw_attention(6, seed=2)
    ours = transmix.transmix_target(labels, K, attn, box, (H, W), smoothing=0.1)
    assert torch.allclose(ours.double(), longhand_target(labels, attn, box, 0.1), atol=1e-6)


def test_rows_sum_to_one_and_nonnegative():
    labels = torch.arange(8) % K
    t = transmix.transmix_target(labels, K, draw_attention(8), (3, 17, 9, 25), (H, W), smoothing=0.1)
    assert torch.allclose(t.sum(1), torch.ones(8), atol=1e-6) and bool((t >= 0).all())


def test_cutmix_box_is_the_official_formula():
    for lam in (0.1, 0.5, 0.73, 0.999):
        for cy, cx in ((0, 0), (31, 31), (16, 5), (3, 29)):
            box, lam_c = transmix.cutmix_box(lam, cy, cx, (H, W))
            r = (1 - lam) ** 0.5
            ch, cw = int(H * r), int(W * r)
            want = (min(max(cy - ch // 2, 0), H), min(max(cy + ch // 2, 0), H),
                    min(max(cx - cw // 2, 0), W), min(max(cx + cw // 2, 0), W))
            assert box == want
            assert lam_c == pytest.approx(1 - (want[1] - want[0]) * (want[3] - want[2]) / (H * W))


def test_zero_area_box_gives_own_target_exactly():
    labels = torch.tensor([1, 2, 3, 4])
    t = transmix.transmix_target(labels, K, draw_attention(4), (10, 10, 3, 20), (H, W), smoothing=0.1)
    assert torch.equal(t, smooth_one_hot(labels, K, 0.1))


def test_full_image_box_gives_partner_target():
    labels = torch.tensor([1, 2, 3, 4])
    t = transmix.transmix_target(labels, K, draw_attention(4), (0, H, 0, W), (H, W), smoothing=0.1)
    assert torch.allclose(t, smooth_one_hot(labels.flip(0), K, 0.1), atol=1e-7)


def test_weights_lie_between_area_and_attention_shares():
    for seed in range(5):
        attn = draw_attention(8, seed)
        w, lam_area, lam_attn = transmix.transmix_weights(attn, (2, 21, 5, 18), (H, W))
        assert bool(((lam_attn >= 0) & (lam_attn <= 1)).all()) and bool(((w >= 0) & (w <= 1)).all())
        lo, hi = torch.minimum(lam_attn, torch.tensor(lam_area)), torch.maximum(lam_attn, torch.tensor(lam_area))
        assert bool(((w >= lo - 1e-7) & (w <= hi + 1e-7)).all())


def test_uniform_attention_counts_patches_and_aligned_box_equals_cutmix():
    attn = torch.full((2, G * G), 1.0 / (G * G + 1))
    box = (3, 13, 6, 29)  # not patch aligned: patches whose top-left pixel is inside: rows 4,8,12; cols 8..28
    _, _, lam_attn = transmix.transmix_weights(attn, box, (H, W))
    assert torch.allclose(lam_attn, torch.full((2,), 3 * 6 / 64.0))
    aligned = (8, 24, 4, 20)
    labels = torch.tensor([0, 5])
    t = transmix.transmix_target(labels, K, attn, aligned, (H, W), smoothing=0.1)
    lam_c = 1 - 16 * 16 / (H * W)
    cutmix = lam_c * smooth_one_hot(labels, K, 0.1) + (1 - lam_c) * smooth_one_hot(labels.flip(0), K, 0.1)
    assert torch.allclose(t, cutmix, atol=1e-6)


def test_attention_scale_invariance_and_one_hot_attention():
    attn = draw_attention(4)
    box = (0, 12, 4, 30)
    w1, _, _ = transmix.transmix_weights(attn, box, (H, W))
    w2, _, _ = transmix.transmix_weights(attn * 37.5, box, (H, W))
    assert torch.allclose(w1, w2, atol=1e-6)
    one = torch.zeros(2, G * G)
    one[0, 1 * G + 2] = 1.0  # top-left pixel (4, 8): inside
    one[1, 5 * G + 0] = 1.0  # top-left pixel (20, 0): outside
    _, _, lam_attn = transmix.transmix_weights(one, box, (H, W))
    assert lam_attn.tolist() == [1.0, 0.0]


def test_rows_are_independent():
    attn = draw_attention(6)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    w, _, _ = transmix.transmix_weights(attn, (2, 22, 1, 17), (H, W))
    w_perm, _, _ = transmix.transmix_weights(attn[perm], (2, 22, 1, 17), (H, W))
    assert torch.allclose(w_perm, w[perm])


def test_odd_batch_is_rejected():
    with pytest.raises(ReproError, match="even batch"):
        transmix.transmix_target(torch.arange(5), K, draw_attention(5), (0, 8, 0, 8), (H, W))


def test_box_pixels_come_from_flipped_partner():
    x = torch.randn(4, 3, H, W)
    draws = MixDraws(partner=flip_partner(4), lam=torch.full((4,), 0.6, dtype=torch.float64),
                     use_cutmix=torch.ones(4, dtype=torch.bool), cy=torch.full((4,), 10), cx=torch.full((4,), 22))
    x_mix, _, _, boxes = apply_mix(x, smooth_one_hot(torch.arange(4), K), draws)
    yl, yh, xl, xh = boxes[0].tolist()
    inside = torch.zeros(H, W, dtype=torch.bool)
    inside[yl:yh, xl:xh] = True
    assert torch.equal(x_mix[:, :, inside], x.flip(0)[:, :, inside])
    assert torch.equal(x_mix[:, :, ~inside], x[:, :, ~inside])


def small_vit():
    torch.manual_seed(0)
    return build_model("vit_tiny_patch4_32", num_classes=K, depth=2, drop_path_rate=0.0)


def test_mixup_batches_ignore_attention_and_match_plain_mixup():
    """switch_prob 0: every batch is Mixup; a CNN (no attention at all) works and gives timm's Mixup target."""
    method = build_method({"name": "transmix", "switch_prob": 0.0}, num_classes=K, label_smoothing=0.1)
    model = build_model("resnet18_cifar", num_classes=K)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, H, W, generator=g), torch.randint(0, K, (4,), generator=g)
    out = method.step(model, (x, y), StepContext(0, 0, 0.0, torch.Generator().manual_seed(3)))
    plain = build_method({"name": "mixup_cutmix", "switch_prob": 0.0, "mixup_alpha": 0.8},
                         num_classes=K, label_smoothing=0.1)
    x_mix, t_mix = plain.mix(x, y, torch.Generator().manual_seed(3))
    assert torch.allclose(out["loss"], soft_target_cross_entropy(model(x_mix), t_mix), atol=1e-6)


def test_cutmix_step_uses_same_pass_attention_and_detached_label():
    """Loss and parameter gradients equal soft CE against a constant target built from explicit attention."""
    method = build_method({"name": "transmix", "switch_prob": 1.0}, num_classes=K, label_smoothing=0.1)
    model = small_vit().eval()  # eval: no dropout, so the explicit recomputation sees the same forward
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(8, 3, H, W, generator=g), torch.randint(0, K, (8,), generator=g)
    out = method.step(model, (x, y), StepContext(0, 0, 0.0, torch.Generator().manual_seed(9)))
    grads = torch.autograd.grad(out["loss"], list(model.parameters()))

    draws = method.draw(torch.Generator().manual_seed(9), 8, (H, W))
    x_mix, _, _, boxes = apply_mix(x, smooth_one_hot(y, K, 0.1), draws)
    attn = explicit_cls_attention(model, x_mix)
    target = transmix.transmix_target(y, K, attn, tuple(boxes[0].tolist()), (H, W), smoothing=0.1)
    loss = soft_target_cross_entropy(model(x_mix), target.detach())
    ref_grads = torch.autograd.grad(loss, list(model.parameters()))
    assert out["loss"].item() == pytest.approx(loss.item(), abs=1e-6)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    stats = method.epoch_stats()
    assert stats["n"] == 8 and stats["cutmix_batches"] == 1 and sum(stats["delta_hist"]) == 8


def test_cnn_is_rejected_for_cutmix_attention():
    method = build_method({"name": "transmix"}, num_classes=K)
    with pytest.raises(ReproError):
        method.check_model(build_model("resnet18_cifar", num_classes=K))


def test_official_numpy_draw_order_gives_timm_images():
    """Parity of the image side with timm's NumPy order (rand, rand, beta, randint(H), randint(W))."""
    rs = np.random.RandomState(0)
    u_apply, u_switch = rs.rand(), rs.rand()
    assert u_apply < 1.0
    use_cut = u_switch < 0.8
    lam = rs.beta(1.0, 1.0) if use_cut else rs.beta(0.8, 0.8)
    cy, cx = (rs.randint(0, H), rs.randint(0, W)) if use_cut else (0, 0)
    draws = MixDraws(partner=flip_partner(4), lam=torch.full((4,), lam, dtype=torch.float64),
                     use_cutmix=torch.full((4,), bool(use_cut)), cy=torch.full((4,), cy), cx=torch.full((4,), cx))
    x = torch.randn(4, 3, H, W)
    x_mix, _, lam_out, boxes = apply_mix(x, smooth_one_hot(torch.arange(4), K), draws)
    if use_cut:
        box, lam_c = transmix.cutmix_box(lam, cy, cx, (H, W))
        assert tuple(boxes[0].tolist()) == box and float(lam_out[0]) == pytest.approx(lam_c)
        # every pixel: the partner's inside the box, the image's own outside (a plain loop over the box)
        y1, y2, x1, x2 = box
        expected = x.clone()
        for b in range(4):
            expected[b, :, y1:y2, x1:x2] = x[3 - b, :, y1:y2, x1:x2]
        assert torch.equal(x_mix, expected)
    else:
        assert torch.allclose(x_mix, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
