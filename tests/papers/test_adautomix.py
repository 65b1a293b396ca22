"""AdAutoMix (papers/adautomix) against a line-by-line transcription of the official code and the spec's invariants
(shared spec specs/adautomix.md §6).

The official `AdAutoMix.py` / `Ada_mix_pine.py` need mmcv 1.x, OpenMixup's registry and call `.cuda()` inside
`co_caculate_attention`, so they are not run here; `official_mask` and `official_step` below transcribe them
loop for loop (separate matmuls per pair, the `co_mixup` accumulation, `forward_q`, `forward_k`, the parity branch
of `forward_train`) on the same modules and fixed draws.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from common.methods import StepContext, build_method
from common.mixing import sample_beta, soft_target_cross_entropy
from papers.adautomix import method as ada
from papers.adautomix.testing import contract_setup

K = 10


def setup(batch=8, **options):
    method, model, (x, y) = contract_setup(K, batch=batch, **options)
    return method, model.train(), x, y


# ------------------------------------------------------------------------------ official transcriptions
def official_mask(gen: ada.AdaptiveMask, feats: list, lam: list) -> torch.Tensor:
    """AdaptiveMask.forward: normal_mix (N = 2) or co_mix (N > 2) with the official loops, then upsample and
    softmax over the sources."""
    b, _, h, w = feats[0].shape
    d = gen.inter
    if gen.lam_concat:
        lams = [lam[0], 1 - lam[0]] if len(feats) == 2 else lam
        feats = [torch.cat([f, torch.full((b, 1, h, w), float(li))], dim=1) for f, li in zip(feats, lams)]
    q = [gen.conv_q(f).view(b, d, -1).permute(0, 2, 1) for f in feats]
    k = [gen.conv_k(f).view(b, d, -1) for f in feats]
    v = [gen.conv_v(f).view(b, 1, -1).permute(0, 2, 1) for f in feats]
    masks = []
    if len(feats) == 2:
        attn = [torch.matmul(q[0], k[1]) / d**0.5, torch.matmul(q[1], k[0]) / d**0.5]
        for i in range(2):
            masks.append(torch.matmul(attn[i].softmax(dim=-1), v[i]).view(b, 1, h, w))
    else:
        for i in range(len(q)):
            co_attn = torch.zeros(b, h * w, h * w)
            for j in range(len(k)):
                if i != j:
                    co_attn += torch.matmul(q[i], k[j])
            co_attn = (co_attn / d**0.5).softmax(dim=-1)
            masks.append(torch.matmul(co_attn, v[i]).view(b, 1, h, w))
    mask = torch.cat(masks, dim=1)
    mask = F.interpolate(mask, scale_factor=gen.scale_factor, mode=gen.upsample)
    return mask.softmax(dim=1)


def stage3(model, x):
    h = model.stem(x)
    for block in model.stages[:3]:
        h = block(h)
    return h


def pooled(model, x):
    return model.forward_features(x).mean(dim=(2, 3))


def official_step(method, model, x, y, d: ada.Draws, even: bool, margin=0.03, beta=0.3, r=0.5):
    """forward_train -> co_mixup / mixup, forward_k, forward_q and the loss summary, written out."""
    gen, head_mix = method.owned["generator"], method.owned["head_mix"]
    k_model, head_mix_k = method.owned["k"], method.owned["head_mix_k"]
    feature = stage3(k_model, x)
    n = len(d.lam_mb)
    mask_mb = official_mask(gen, [feature[i] for i in d.perms_mb], d.lam_mb)
    mask_bb = official_mask(gen, [feature[i] for i in d.perms_bb], d.lam_bb).clone().detach()
    lam_bb = d.lam_bb
    if n > 2:
        if margin >= lam_bb[0] or margin > 1 - lam_bb[0]:
            for i in range(n):
                mask_bb[:, i, :, :] = lam_bb[i]
    elif margin >= lam_bb[0] or margin >= 1 - lam_bb[0]:
        mask_bb[:, 0, :, :] = lam_bb[0]
        mask_bb[:, 1, :, :] = 1 - lam_bb[0]
    img_mix_mb, img_mix_bb = torch.zeros_like(x), torch.zeros_like(x)
    for i in range(n):
        img_mix_mb += x[d.perms_mb[i], :] * mask_mb[:, i, :, :].unsqueeze(1)
        img_mix_bb += x[d.perms_bb[i], :] * mask_bb[:, i, :, :].unsqueeze(1)
    # forward_k
    pred_mix_k = head_mix_k(pooled(k_model, img_mix_mb))
    loss_mix_k = F.cross_entropy(pred_mix_k, y[d.perms_mb[0]]) * d.lam_mb[0]
    for i in range(1, n):
        loss_mix_k += F.cross_entropy(pred_mix_k, y[d.perms_mb[i]]) * d.lam_mb[i]
    cos = 0.0
    for i in range(n):
        pred_i = head_mix_k(pooled(k_model, x[d.perms_mb[i], :]))
        cos += F.cosine_similarity(pred_mix_k, pred_i, dim=-1) * d.lam_mb[i]
    cos = torch.mean(cos)
    # forward_q
    loss_one = F.cross_entropy(model(x), y)
    if n > 2:
        co_mixed_x = x[d.perms_bb[0]] * lam_bb[0]
        for i in range(1, n):
            co_mixed_x += x[d.perms_bb[i]] * lam_bb[i]
        pred_co = head_mix(pooled(model, co_mixed_x))
        loss_co = sum(F.cross_entropy(pred_co, y[d.perms_bb[i]]) * lam_bb[i] for i in range(n))
        loss_re = loss_one * (1 - r) + loss_co * r
    else:
        loss_re = loss_one
    pred_mix_q = head_mix(pooled(model, img_mix_bb))
    loss_mix_q = sum(F.cross_entropy(pred_mix_q, y[d.perms_bb[i]]) * lam_bb[i] for i in range(n))
    loss_k = (-1.0) * beta * loss_mix_k + (1 - beta) * cos if even else loss_mix_k
    return loss_mix_q + loss_re + loss_k, img_mix_bb


def fixed_draws(batch, n, seed, lam=None):
    g = torch.Generator().manual_seed(seed)
    d = ada.draw(batch, n, 1.0, False, g)
    if lam is not None:
        d.lam_mb = d.lam_bb = lam
    return d


def owned_grads(method):
    return {name: p.grad.clone() for name, p in method.owned.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------ the generator
@pytest.mark.parametrize("n,lam_concat,mode", [(2, False, "bilinear"), (3, False, "bilinear"), (3, True, "nearest"),
                                               (4, True, "bilinear"), (2, True, "nearest")])
def test_generator_is_the_official_adaptive_mask(n, lam_concat, mode):
    torch.manual_seed(n)
    gen = ada.AdaptiveMask(16, lam_concat=lam_concat, upsample=mode, scale_factor=4)
    for p in gen.parameters():  # larger weights than the N(0, 0.01) init, so the attention is not uniform
        torch.nn.init.normal_(p, 0.0, 0.3)
    feats = [torch.randn(5, 16, 4, 4) for _ in range(n)]
    lam = torch.distributions.Dirichlet(torch.ones(n)).sample().tolist() if n > 2 else [0.3, 0.7]
    ours, nan = gen(torch.stack(feats), lam)
    assert torch.allclose(ours, official_mask(gen, feats, lam), atol=1e-6)
    assert ours.shape == (5, n, 16, 16) and int(nan) == 0
    # invariant 1: a convex combination at every pixel
    assert bool((ours >= 0).all()) and torch.allclose(ours.sum(1), torch.ones(5, 16, 16), atol=1e-6)


def test_mask_is_uniform_for_identical_sources_and_permutes_with_the_batch():
    torch.manual_seed(0)
    gen = ada.AdaptiveMask(8)
    for p in gen.parameters():
        torch.nn.init.normal_(p, 0.0, 0.5)
    f = torch.randn(6, 8, 4, 4)
    mask, _ = gen(torch.stack([f, f, f]), [0.2, 0.3, 0.5])
    assert torch.allclose(mask, torch.full_like(mask, 1 / 3), atol=1e-6)
    feats = torch.randn(3, 6, 8, 4, 4)
    perm = torch.randperm(6)
    assert torch.allclose(gen(feats[:, perm], [0.2, 0.3, 0.5])[0], gen(feats, [0.2, 0.3, 0.5])[0][perm], atol=1e-6)


def test_lam_reaches_the_mask_only_with_lam_concat():
    torch.manual_seed(0)
    feats = torch.randn(3, 4, 8, 4, 4)
    plain = ada.AdaptiveMask(8, lam_concat=False)
    assert torch.equal(plain(feats, [0.2, 0.3, 0.5])[0], plain(feats, [0.6, 0.1, 0.3])[0])  # bit-identical
    concat = ada.AdaptiveMask(8, lam_concat=True)
    for p in concat.parameters():
        torch.nn.init.normal_(p, 0.0, 0.5)
    assert not torch.allclose(concat(feats, [0.2, 0.3, 0.5])[0], concat(feats, [0.6, 0.1, 0.3])[0])


def test_nan_logits_fall_back_to_the_official_constants_and_are_counted():
    gen = ada.AdaptiveMask(4)
    with torch.no_grad():
        gen.conv_v.bias.fill_(float("nan"))
    mask, nan = gen(torch.randn(3, 2, 4, 2, 2), [0.2, 0.3, 0.5])
    assert int(nan) == 3 * 2 * 4 and torch.allclose(mask, torch.full_like(mask, 1 / 3))  # all 0.3: uniform


# ------------------------------------------------------------------------------ draws, margin, losses
def test_draws_follow_the_official_order_and_laws():
    g = torch.Generator().manual_seed(7)
    d = ada.draw(6, 3, 1.0, False, g)
    ref = torch.Generator().manual_seed(7)
    p_bb0, p_mb0 = torch.randperm(6, generator=ref), torch.randperm(6, generator=ref)
    betas = sample_beta(1.0, 3, ref)
    p_mb2 = torch.randperm(6, generator=ref)
    bb = [torch.randperm(6, generator=ref) for _ in range(3)]
    assert [p.tolist() for p in d.perms_mb] == [p_mb0.tolist(), p_bb0.tolist(), p_mb2.tolist()]
    assert [p.tolist() for p in d.perms_bb] == [p.tolist() for p in bb]
    assert d.lam_mb == d.lam_bb == pytest.approx((betas / betas.sum()).tolist())
    assert sum(d.lam_mb) == pytest.approx(1.0)
    two = ada.draw(6, 2, 1.0, False, torch.Generator().manual_seed(7))
    assert two.perms_mb[0].tolist() == list(range(6)) and two.perms_mb[1].tolist() == p_mb0.tolist()
    assert two.lam_mb[0] == pytest.approx(float(betas[0])) and two.lam_bb[0] == pytest.approx(float(betas[1]))
    sizes = {len(ada.draw(6, 4, 1.0, True, torch.Generator().manual_seed(s)).lam_mb) for s in range(40)}
    assert sizes == {2, 3, 4}


def test_margin_test_official_and_the_ports_flipped_one():
    for l0, official, port in [(0.02, True, True), (0.5, False, True), (0.975, True, False), (0.96, False, True)]:
        lam = [l0, (1 - l0) / 2, (1 - l0) / 2]
        assert ada.margin_hit(lam, 0.03, "official") is official
        assert ada.margin_hit(lam, 0.03, "openmixup_port") is port
    assert ada.margin_hit([0.98, 0.02], 0.03, "official") and not ada.margin_hit([0.5, 0.5], 0.03, "official")


def test_mixed_ce_is_soft_target_ce():
    torch.manual_seed(0)
    logits, y = torch.randn(6, K), torch.randint(0, K, (6,))
    perms, lam = [torch.arange(6), torch.randperm(6), torch.randperm(6)], [0.5, 0.3, 0.2]
    target = sum(l * F.one_hot(y[p], K).float() for p, l in zip(perms, lam))
    assert torch.allclose(ada.mixed_ce(logits, y, perms, lam), soft_target_cross_entropy(logits, target), atol=1e-6)


def test_cosine_term_is_one_when_the_mix_predicts_like_its_sources():
    z = torch.randn(5, K)
    assert float(ada.weighted_cosine(z, [z, 2 * z, z], [0.2, 0.3, 0.5])) == pytest.approx(1.0, abs=1e-6)
    assert float(ada.weighted_cosine(z, [-z, -z], [0.4, 0.6])) == pytest.approx(-1.0, abs=1e-6)


# ------------------------------------------------------------------------------ the step
@pytest.mark.parametrize("n,even,lam", [(3, True, None), (3, False, None), (3, True, [0.02, 0.49, 0.49]),
                                        (2, True, None), (2, False, [0.99, 0.01])])
def test_step_is_the_official_forward_train_on_fixed_draws(n, even, lam):
    method, model, x, y = setup(mix_samples=n)
    for p in method.owned["generator"].parameters():  # a non-trivial mask
        torch.nn.init.normal_(p, 0.0, 0.2)
    d = fixed_draws(8, n, seed=3, lam=lam)
    out = method.forward_train(model, x, y, d, adversarial=even)
    out["loss"].backward()
    ours = owned_grads(method)
    method.owned.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    ref, _ = official_step(method, model, x, y, d, even)
    ref.backward()
    assert float(out["loss"]) == pytest.approx(float(ref), rel=1e-5)
    theirs = owned_grads(method)
    assert ours.keys() == theirs.keys() == {n for n, _ in method.owned.named_parameters()
                                            if n.startswith(("generator", "head_mix."))}
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-6, rtol=1e-4), name
    assert out["margin_fallback"] == float(lam is not None)


def test_margin_case_makes_the_bb_mix_the_linear_mix_exactly():
    method, _, x, _ = setup()
    d = fixed_draws(8, 3, seed=1, lam=[0.01, 0.6, 0.39])
    mixes = method.masks(x, d)
    assert mixes["fallback"] and torch.equal(mixes["x_bb"], mixes["x_lin"])
    d.lam_bb = d.lam_mb = [0.4, 0.35, 0.25]
    assert not method.masks(x, d)["fallback"]
    port, *_ = setup(margin_test="openmixup_port")
    assert port.masks(x, d)["fallback"]  # the port's test: plain Mixup whenever lam_0 < 0.97


def test_gradients_reach_what_each_loss_trains_and_the_generator_flips_on_its_ce():
    """beta = 1: the adversarial generator loss is -CE_k, the cooperative one +CE_k. The generator's gradient
    flips exactly (so L_q gives it nothing); q's gradient is the same on both parities (L_g gives it nothing);
    k gets no gradient."""
    grads = {}
    for even in (True, False):
        method, model, x, y = setup(beta=1.0)
        for p in method.owned["generator"].parameters():
            torch.nn.init.normal_(p, 0.0, 0.2)
        out = method.forward_train(model, x, y, fixed_draws(8, 3, seed=5), adversarial=even)
        out["loss"].backward()
        grads[even] = (owned_grads(method), {n: p.grad.clone() for n, p in model.named_parameters()})
        assert all(p.grad is None for p in method.owned["k"].parameters())
        assert all(p.grad is None for p in method.owned["head_mix_k"].parameters())
    gen_even = {n: g for n, g in grads[True][0].items() if n.startswith("generator")}
    assert any(float(g.abs().sum()) > 0 for g in gen_even.values())
    for name, g in gen_even.items():
        assert torch.allclose(g, -grads[False][0][name], atol=1e-7), name
    for name, g in grads[True][1].items():
        assert torch.allclose(g, grads[False][1][name], atol=1e-7), name
    assert torch.allclose(grads[True][0]["head_mix.weight"], grads[False][0]["head_mix.weight"], atol=1e-7)


def test_parity_adversarial_on_even_steps_and_never_in_the_ablation():
    method, model, x, y = setup()
    flags = [method.step(model, (x, y), StepContext(0, s, 0.0, torch.Generator().manual_seed(s)))["adversarial"]
             for s in range(4)]
    assert flags == [1.0, 0.0, 1.0, 0.0]
    ablation, model, x, y = setup(adversarial=False)
    assert ablation.step(model, (x, y), StepContext(0, 0, 0.0, torch.Generator()))["adversarial"] == 0.0


def test_cos_sign_flips_only_the_cosine_term():
    losses = {}
    for sign in (1.0, -1.0):
        method, model, x, y = setup(cos_sign=sign)
        losses[sign] = method.forward_train(model, x, y, fixed_draws(8, 3, seed=2), adversarial=True)
    a, b = losses[1.0], losses[-1.0]
    assert float(a["cos"]) == pytest.approx(float(b["cos"]))
    assert float(a["loss"] - b["loss"]) == pytest.approx(2 * 0.7 * float(a["cos"]), rel=1e-5)


def test_dedup_k_forwards_gives_the_same_loss():
    out = {}
    for dedup in (False, True):
        method, model, x, y = setup(dedup_k_forwards=dedup)
        out[dedup] = method.forward_train(model, x, y, fixed_draws(8, 3, seed=4), adversarial=True)
    assert float(out[True]["loss"]) == pytest.approx(float(out[False]["loss"]), rel=1e-5)


# ------------------------------------------------------------------------------ momentum copy
def test_momentum_schedule_matches_the_cosine_schedule_hook():
    m0, m1, total = 0.999, 0.999999, 1000
    at = [ada.momentum_at(it, total, m0, m1, (0.1, 1.0)) for it in (0, 99, 100, 1000)]
    assert at[0] == at[1] == m0
    assert at[2] == pytest.approx(m1 - (m1 - m0) * (math.cos(math.pi * 0.1) + 1) / 2)
    assert at[2] == pytest.approx(0.999024, abs=1e-6)  # not re-normalised to the window: starts near 0.99902
    assert at[3] == pytest.approx(m1)


@pytest.mark.parametrize("m", [0.0, 1.0])
def test_momentum_update_moves_parameters_never_buffers(m):
    method, model, x, _ = setup(momentum=m, end_momentum=m)
    k_model = method.owned["k"]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        method.owned["head_mix"].weight.add_(1.0)
    k_model.train()(x)  # k's own BN running statistics move
    buffers = {n: b.clone() for n, b in k_model.named_buffers()}
    before = {n: p.clone() for n, p in k_model.named_parameters()}
    method.after_update(model, StepContext(0, 5, 0.5, torch.Generator(), total_steps=10))
    for (name, pk), pq in zip(k_model.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(pk, pq if m == 0.0 else before[name]), name
    assert torch.equal(method.owned["head_mix_k"].weight,
                       method.owned["head_mix"].weight if m == 0.0 else method.owned["head_mix_k"].weight)
    assert all(torch.equal(b, buffers[n]) for n, b in k_model.named_buffers())
    assert not any(torch.equal(b, dict(model.named_buffers())[n]) for n, b in buffers.items() if "running_mean" in n)


def test_state_dict_round_trip():
    method, *_ = setup()
    state = method.state_dict()
    other, *_ = setup()
    with torch.no_grad():
        for p in other.owned.parameters():
            p.add_(1.0)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(method.owned.state_dict().values(),
                                                 other.owned.state_dict().values()))


def test_options_are_validated():
    from common.errors import ReproError

    for bad in ({"margin_test": "flipped"}, {"cos_sign": 0.5}, {"mix_samples": 1}, {"upsample": "bicubic"}):
        with pytest.raises(ReproError):
            build_method({"name": "adautomix", **bad}, num_classes=K)


# ------------------------------------------------------------------------------ through the trainer
def test_trainer_optimises_the_generator_and_evaluates_k_as_the_ema(tmp_path, monkeypatch):
    from common.models import build_model
    from common.train import main

    calls = []
    original = ada.AdAutoMix.after_update
    monkeypatch.setattr(ada.AdAutoMix, "after_update",
                        lambda self, model, ctx: (calls.append((ctx.step, ctx.total_steps)), original(self, model, ctx)))
    out = tmp_path / "run"
    assert main(["--output", str(out), "data.name=cifar10-mini", "data.num_workers=0",
                 "model.name=preact_resnet18_cifar", "model.kwargs={width: 4}", "train.epochs=2",
                 "train.batch_size=16", "train.max_steps_per_epoch=3", "optim.lr=0.1",
                 "method={name: adautomix}"]) == 0
    assert calls == [(s, 6) for s in range(6)]  # after every update, with the run's step count
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert "test_ema_top1" in rows[-1] and "median_last10_ema_top1" in metrics and "final_ema" in metrics
    assert rows[0]["train_adversarial"] == pytest.approx(2 / 3)  # steps 0 and 2 of 0..2
    state = torch.load(out / "checkpoint" / "last.pt", weights_only=True)
    modules = state["method"]["modules"]
    # the optimiser holds the model's parameters, the generator's six and head_mix's two (k is frozen)
    n_model = sum(1 for _ in build_model("preact_resnet18_cifar", num_classes=10, width=4).parameters())
    assert len(state["optimizer"]["state"]) == n_model + 8
    assert not torch.equal(modules["k.stem.weight"], state["model"]["stem.weight"])  # k lags q
