"""ResizeMix: the invariants of shared spec resizemix.md §5 for both geometries, and plain-loop references.

Images hold a distinct value per (sample, channel, pixel), so equality of values is equality of source pixels.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.errors import ReproError
from common.methods import StepContext, build_method
from common.mixing import draw_mix, sample_beta, smooth_one_hot
from papers import resizemix
from papers.resizemix.method import ResizeMixDraws

K = 10


def ks_uniform(values, lo, hi):
    """Kolmogorov-Smirnov distance between the sample and U(lo, hi)."""
    u = np.sort((np.asarray(values) - lo) / (hi - lo))
    n = len(u)
    return max(float(np.max(np.arange(1, n + 1) / n - u)), float(np.max(u - np.arange(n) / n)))


KS_CRITICAL = 1.95 / math.sqrt(3000)  # two-sided 0.1 % level for n = 3000


def distinct_images(B, C=3, H=32, W=32):
    return torch.arange(B * C * H * W, dtype=torch.float32).view(B, C, H, W)


def nearest_index(i, size, rate):
    """PyTorch nearest with a scale factor: source index floor(i * float32(1 / rate)), at most size - 1."""
    return min(int(np.floor(np.float32(i) * np.float32(1.0 / rate))), size - 1)


def getbox_loop(side, center, size):
    """The authors' `getbox_new` on one axis, in plain integers."""
    start = min(max(center - side // 2, 0), size)
    end = min(max(start + side, 0), size)
    start = min(max(end - side, 0), size)
    return start, end


def resizemix_loop(x, perm, rate, centers):
    """Authors' geometry in loops: shrink each partner pixel by pixel and paste it at its own box."""
    B, _, H, W = x.shape
    h, w = int(H * rate), int(W * rate)
    out = x.clone()
    for b in range(B):
        yl, _ = getbox_loop(h, int(centers[b, 0]), H)
        xl, _ = getbox_loop(w, int(centers[b, 1]), W)
        for i in range(h):
            for j in range(w):
                out[b, :, yl + i, xl + j] = x[
                    int(perm[b]), :, nearest_index(i, H, rate), nearest_index(j, W, rate)
                ]
    return out


def random_case(seed, B=6, H=32, W=32, rate=None):
    g = torch.Generator().manual_seed(seed)
    rate = float(0.1 + 0.7 * torch.rand(1, generator=g, dtype=torch.float64)) if rate is None else rate
    centers = torch.stack([torch.randint(0, H, (B,), generator=g), torch.randint(0, W, (B,), generator=g)], 1)
    return torch.randperm(B, generator=g), rate, centers


# ------------------------------------------------------------------------------------ authors' geometry
@pytest.mark.parametrize("rate", [0.1, 0.3, 1 / 3, 0.37, 0.5, 0.61, 0.8, 0.7999])
def test_shrunk_size_is_interpolate_size(rate):
    x = torch.zeros(1, 1, 32, 27)
    assert F.interpolate(x, scale_factor=rate, mode="nearest").shape[-2:] == resizemix.shrunk_hw(
        (32, 27), rate
    )


def test_scale_factor_grid_differs_from_output_size_grid():
    # the reference loop uses 1 / rate; at rate 0.3 the output-size grid (32 / 9) picks other pixels, so the
    # element-wise tests below fail for an implementation that resizes to a size instead of a scale factor
    rate, h = 0.3, 9
    by_scale = [nearest_index(i, 32, rate) for i in range(h)]
    by_size = [min(int(np.floor(np.float32(i) * np.float32(32 / h))), 31) for i in range(h)]
    assert by_scale != by_size
    x = torch.arange(32.0).view(1, 1, 32, 1).expand(1, 1, 32, 32)
    assert F.interpolate(x, scale_factor=rate, mode="nearest")[0, 0, :, 0].long().tolist() == by_scale


@pytest.mark.parametrize("seed", range(6))
def test_boxes_match_getbox_loop_and_lie_inside_with_patch_size(seed):
    g = torch.Generator().manual_seed(seed)
    H, W = 32, 24
    h, w = int(torch.randint(0, H + 1, (1,), generator=g)), int(torch.randint(0, W + 1, (1,), generator=g))
    centers = torch.stack(
        [torch.randint(0, H, (64,), generator=g), torch.randint(0, W, (64,), generator=g)], 1
    )
    centers[:4] = torch.tensor([[0, 0], [H - 1, W - 1], [0, W - 1], [H - 1, 0]])  # the four corners
    boxes = resizemix.resizemix_boxes((h, w), centers, (H, W))
    for b, (cy, cx) in enumerate(centers.tolist()):
        assert tuple(boxes[b].tolist()) == (*getbox_loop(h, cy, H), *getbox_loop(w, cx, W))
    yl, yh, xl, xh = boxes.unbind(1)
    assert (yh - yl == h).all() and (xh - xl == w).all()
    assert (yl >= 0).all() and (yh <= H).all() and (xl >= 0).all() and (xh <= W).all()


def test_box_is_centred_away_from_borders_and_shifted_not_clipped_near_them():
    boxes = resizemix.resizemix_boxes((10, 10), torch.tensor([[16, 16], [1, 30]]), (32, 32))
    assert boxes[0].tolist() == [11, 21, 11, 21]  # start = c - side // 2
    assert boxes[1].tolist() == [0, 10, 22, 32]  # shifted inside: still 10 x 10


@pytest.mark.parametrize("seed", range(5))
def test_images_match_plain_loop_element_for_element(seed):
    x = distinct_images(6, H=32, W=32)
    perm, rate, centers = random_case(seed)
    h, w = resizemix.shrunk_hw((32, 32), rate)
    boxes = resizemix.resizemix_boxes((h, w), centers, (32, 32))
    assert torch.equal(
        resizemix.resizemix_images(x, perm, rate, boxes), resizemix_loop(x, perm, rate, centers)
    )


def test_every_pasted_pixel_is_the_nearest_shrunk_partner_pixel_and_outside_untouched():
    x = distinct_images(5, H=32, W=28)
    perm, rate, centers = random_case(7, B=5, H=32, W=28, rate=0.3)
    h, w = resizemix.shrunk_hw((32, 28), rate)
    boxes = resizemix.resizemix_boxes((h, w), centers, (32, 28))
    out = resizemix.resizemix_images(x, perm, rate, boxes)
    for b, (yl, yh, xl, xh) in enumerate(boxes.tolist()):
        rows = [nearest_index(i, 32, rate) for i in range(h)]
        cols = [nearest_index(j, 28, rate) for j in range(w)]
        expected = x[int(perm[b])][:, rows][:, :, cols]
        assert torch.equal(out[b, :, yl:yh, xl:xh], expected)
        assert torch.equal(out[b, :, yl, xl], x[int(perm[b]), :, 0, 0])  # top-left of the whole source
        outside = torch.ones(32, 28, dtype=torch.bool)
        outside[yl:yh, xl:xh] = False
        assert torch.equal(out[b][:, outside], x[b][:, outside])


def test_positions_are_per_image():
    _, rate, centers = random_case(3, B=32, rate=0.5)
    boxes = resizemix.resizemix_boxes(resizemix.shrunk_hw((32, 32), rate), centers, (32, 32))
    assert len({tuple(b) for b in boxes.tolist()}) > 10


def test_wrong_box_size_and_rate_are_errors():
    x = distinct_images(2)
    boxes = resizemix.resizemix_boxes((9, 9), torch.zeros(2, 2, dtype=torch.long), (32, 32))
    with pytest.raises(ReproError, match="must be 16x16"):
        resizemix.resizemix_images(x, torch.arange(2), 0.5, boxes)
    with pytest.raises(ReproError, match=r"\(0, 1\]"):
        resizemix.resizemix_images(x, torch.arange(2), 1.5, boxes)
    with pytest.raises(ReproError, match="does not fit"):
        resizemix.resizemix_boxes((33, 2), torch.zeros(2, 2, dtype=torch.long), (32, 32))


# ------------------------------------------------------------------------------------ OpenMixup geometry
def openmixup_box_spec(tau, cy, cx, S):
    """Spec §2.3 for a square image, written as the spec states it."""
    c = math.floor(S * tau)
    clip = lambda v: int(np.clip(v, 0, S))
    box = (clip(cy - c // 2), clip(cy + c // 2), clip(cx - c // 2), clip(cx + c // 2))
    return box, 1 - (box[1] - box[0]) * (box[3] - box[2]) / (S * S)


@pytest.mark.parametrize("tau", [0.1, 0.25, 0.33, 0.5, 0.77, 0.8])
def test_openmixup_box_matches_spec_including_clipping(tau):
    for cy in range(0, 32, 3):
        for cx in (0, 5, 16, 31):
            box, lam = resizemix.openmixup_box(tau, (cy, cx), (32, 32))
            want_box, want_lam = openmixup_box_spec(tau, cy, cx, 32)
            assert box == want_box and lam == pytest.approx(want_lam, abs=1e-12)
    box, _ = resizemix.openmixup_box(tau, (16, 16), (32, 32))  # unclipped: side 2 * (floor(S tau) // 2)
    assert box[1] - box[0] == 2 * (int(32 * tau) // 2) == box[3] - box[2]


def test_openmixup_nonsquare_clips_rows_with_height_and_columns_with_width():
    box, lam = resizemix.openmixup_box(0.5, (30, 10), (32, 16))
    assert box == (22, 32, 6, 14)
    assert lam == pytest.approx(1 - 10 * 8 / (32 * 16))


@pytest.mark.parametrize("box", [(4, 20, 8, 24), (0, 7, 25, 32), (3, 4, 0, 32)])
def test_openmixup_images_squeeze_the_whole_partner_into_the_clipped_box(box):
    x = distinct_images(4)
    perm = torch.tensor([2, 0, 3, 1])
    out = resizemix.openmixup_images(x, perm, box)
    yl, yh, xl, xh = box
    h, w = yh - yl, xh - xl
    for b in range(4):
        for i in range(h):
            for j in range(w):
                si = min(int(np.floor(np.float32(i) * np.float32(32 / h))), 31)
                sj = min(int(np.floor(np.float32(j) * np.float32(32 / w))), 31)
                assert torch.equal(out[b, :, yl + i, xl + j], x[int(perm[b]), :, si, sj])
        outside = torch.ones(32, 32, dtype=torch.bool)
        outside[yl:yh, xl:xh] = False
        assert torch.equal(out[b][:, outside], x[b][:, outside])


# --------------------------------------------------------------------------------------- the method
def method(**options):
    return build_method({"name": "resizemix", **options}, num_classes=K)


def drawn_boxes(draws, image_hw=(32, 32), batch_size=8):
    """The (B, 4) boxes a draw implies, from the pure functions."""
    if draws.centers.shape[0] == batch_size:  # authors: one box per image
        return resizemix.resizemix_boxes(resizemix.shrunk_hw(image_hw, draws.rate), draws.centers, image_hw)
    box, _ = resizemix.openmixup_box(draws.rate, tuple(draws.centers[0].tolist()), image_hw)
    return torch.tensor([box] * batch_size)


@pytest.mark.parametrize("geometry", ["authors", "openmixup"])
def test_label_weight_is_one_minus_patch_share_and_targets_sum_to_one(geometry):
    m = method(geometry=geometry)
    labels = torch.arange(8) % K
    x = distinct_images(8)
    for seed in range(20):
        draws = m.draw(torch.Generator().manual_seed(seed), 8, (32, 32))
        x_mix, target, lam = m.apply(x, labels, draws)
        boxes = drawn_boxes(draws)
        areas = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
        assert len(set(areas.tolist())) == 1  # one label weight for the batch
        assert lam == pytest.approx(1 - int(areas[0]) / 1024, abs=1e-12)
        assert 0 <= 1 - lam <= draws.rate**2 <= 0.8**2 + 1e-12
        changed = (x_mix != x).all(1)  # (B, H, W): every channel of a pasted pixel comes from another image
        fixed = draws.perm == torch.arange(8)
        for b in range(8):
            inside = torch.zeros(32, 32, dtype=torch.bool)
            yl, yh, xl, xh = boxes[b].tolist()
            inside[yl:yh, xl:xh] = True
            assert not changed[b][~inside].any()
            if not fixed[b]:
                assert changed[b][inside].all()
        assert torch.allclose(target.sum(1), torch.ones(8))
        own = target[torch.arange(8), labels]
        assert torch.allclose(own[~fixed], torch.full_like(own[~fixed], lam))
        assert torch.allclose(own[fixed], torch.ones_like(own[fixed]))


@pytest.mark.parametrize("geometry", ["authors", "openmixup"])
def test_empty_patch_means_no_mixing(geometry):
    x, labels = distinct_images(4, H=4, W=4), torch.tensor([1, 2, 3, 4])
    m = method(geometry=geometry)
    draws = ResizeMixDraws(
        torch.tensor([1, 2, 3, 0]), True, 0.2, torch.tensor([[1, 2]] * 4)
    )  # floor(4*0.2)=0
    x_mix, target, lam = m.apply(x, labels, draws)
    assert torch.equal(x_mix, x) and lam == 1.0
    assert torch.equal(target, smooth_one_hot(labels, K))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, K))
    out = m.step(model, (x, labels), StepContext(0, 0, 0.0, torch.Generator().manual_seed(0)))  # 4 * 0.1..0.8
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("geometry", ["authors", "openmixup"])
def test_identity_partner_pastes_a_shrunk_copy_of_itself_with_its_own_label(geometry):
    x, labels = distinct_images(4), torch.tensor([3, 1, 4, 1])
    m = method(geometry=geometry)
    draws = ResizeMixDraws(torch.arange(4), True, 0.5, torch.tensor([[10, 20]] * 4))
    x_mix, target, _ = m.apply(x, labels, draws)
    assert torch.equal(target, smooth_one_hot(labels, K))
    yl, xl = 10 - 8, 20 - 8  # a 16 x 16 patch centred at (10, 20), inside in both geometries
    assert torch.equal(x_mix[:, :, yl, xl], x[:, :, 0, 0])
    assert torch.equal(x_mix[:, :, yl + 1, xl + 1], x[:, :, 2, 2])  # nearest at rate 1/2: every other pixel


@pytest.mark.parametrize("options", [{}, {"geometry": "openmixup", "alpha": 1.0}, {"geometry": "openmixup"}])
def test_scale_law_is_uniform_on_scope(options):
    m = method(**options)
    g = torch.Generator().manual_seed(0)
    rates = np.array([m.draw(g, 2, (32, 32)).rate for _ in range(3000)])
    assert rates.min() >= 0.1 and rates.max() <= 0.8
    assert ks_uniform(rates, 0.1, 0.8) < KS_CRITICAL


def test_alpha_law_is_beta_with_uniform_redraw_outside_scope():
    # OpenMixup use_alpha: t0 ~ Beta(alpha, alpha); outside [lo, hi] a uniform draw replaces it
    m = method(geometry="openmixup", alpha=0.2)
    ours, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    kept = 0
    for _ in range(200):
        rate = m.draw(ours, 4, (32, 32)).rate
        torch.randperm(4, generator=ref)
        _, uniform = torch.rand(2, generator=ref, dtype=torch.float64).tolist()
        t0 = float(sample_beta(0.2, 1, ref)[0])
        torch.randint(0, 32, (2,), generator=ref)
        kept += 0.1 <= t0 <= 0.8
        assert rate == (t0 if 0.1 <= t0 <= 0.8 else 0.1 + (0.8 - 0.1) * uniform)
    assert 0 < kept < 200  # both branches were exercised


@pytest.mark.parametrize("prob, low, high", [(1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0.5, 0.4, 0.6)])
def test_prob_gates_whole_batches(prob, low, high):
    m = method(prob=prob)
    g = torch.Generator().manual_seed(0)
    applied = np.mean([m.draw(g, 4, (32, 32)).apply for _ in range(500)])
    assert low <= applied <= high


def test_partners_are_the_same_as_cutmix_for_the_same_seed():
    ours = method().draw(torch.Generator().manual_seed(5), 16, (32, 32)).perm
    cut = draw_mix(torch.Generator().manual_seed(5), 16, (32, 32), 0.0, 0.2, partner="randperm").partner
    assert torch.equal(ours, cut)


@pytest.mark.parametrize("geometry", ["authors", "openmixup"])
def test_step_loss_is_two_weighted_cross_entropies_and_deterministic(geometry):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, K))
    x, labels = torch.randn(8, 3, 32, 32), torch.randint(0, K, (8,))
    m = method(geometry=geometry)
    out = m.step(model, (x, labels), StepContext(0, 0, 0.0, torch.Generator().manual_seed(1)))
    draws = m.draw(torch.Generator().manual_seed(1), 8, (32, 32))
    x_mix, _, lam = m.apply(x, labels, draws)
    logits = model(x_mix)
    want = lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels[draws.perm])
    assert lam < 1 and out["lam"] == lam
    assert torch.allclose(out["loss"], want, atol=1e-6) and torch.equal(out["logits"], logits)
    out["loss"].backward()
    assert model[1].weight.grad.abs().sum() > 0


def test_bad_options_are_errors():
    with pytest.raises(ReproError, match="geometry"):
        method(geometry="mmpretrain")
    with pytest.raises(ReproError, match="scope"):
        method(scope=[0.8, 0.1])
    with pytest.raises(ReproError, match="prob"):
        method(prob=1.5)
    with pytest.raises(ReproError, match="alpha"):
        method(alpha=0.0)
    with pytest.raises(ReproError, match="geometries|geometry"):
        method(geometry="Authors")
