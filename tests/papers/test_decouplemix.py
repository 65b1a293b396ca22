"""DecoupleMix: the invariants of shared spec decouplemix.md §5, and parity with a plain re-implementation of
the official formulation (OpenMixup `ClsMixupHead.loss` eta table + `soft_mix_cross_entropy`'s boolean row
selection and reshapes), written here independently of the vectorised loss in papers/decouplemix/method.py.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.errors import ReproError
from common.methods import StepContext, build_method
from common.mixing import smooth_one_hot, soft_target_cross_entropy
from papers.decouplemix import (
    decoupled_ce,
    decoupled_mix_loss,
    decoupled_mix_terms,
    eta_weights,
    lambda_adjust,
)

REPO = Path(__file__).resolve().parents[2]
K = 10
# (eta, mode, lam_idx) of every DM config (spec §3): ResNet-18 and ResNeXt-50 rows, ImageNet and base config
CONFIG_ROWS = [
    (0.01, "more", 0.5),
    (0.1, "less", 0.5),
    (0.01, "less", 0.0),
    (0.01, "more", 0.0),
    (0.1, "both", 1.0),
    (0.5, "both", 0.0),
]


# ----------------------------------------------------------------------------------------------------
# Plain references, following the official code's formulation step by step


def head_eta_reference(lam, eta, mode, idx, thr=0.5, lam_thr=1.0):
    """ClsMixupHead.loss: the eta list [for lam, for 1 - lam] by if/else, then rescaled by lambda_adjust."""
    below = lam < thr
    if mode == "less":
        raw = [lam, 0] if below else [0, 1 - lam]
    elif mode == "more":
        raw = [0, 1 - lam] if below else [lam, 0]
    else:
        raw = [lam, 1 - lam]
    out = []
    for v in raw:
        if v > 0:
            adjusted = 1.0 if v >= lam_thr else (lam_thr ** (-abs(idx))) * (v ** abs(idx))
            out.append(eta * adjusted)
        else:
            out.append(0)
    return out


def official_formulation(logits, y_a, y_b, lam, eta_list, eps=1e-3):
    """soft_mix_cross_entropy as the spec describes it: select rows with the most entries > eps, read the
    values of the first selected row in class order, and for value i keep (by boolean indexing, then reshape
    to C - k + 1 columns) the class holding that value plus every unmixed class; the one-class rows get
    plain soft CE; both sums are divided by N."""
    n, c = logits.shape
    label = lam * F.one_hot(y_a, c) + (1 - lam) * F.one_hot(y_b, c)
    hot = (label > eps).sum(dim=1)
    keep = hot >= hot.max()
    pred_k, label_k = logits[keep], label[keep]
    row_loss = (-label_k * F.log_softmax(pred_k, dim=-1)).sum(dim=-1)
    mixed = label_k > eps
    values = label_k[0, label_k[0] > eps]
    k = values.shape[0]
    if len(set(values.tolist())) == k and k > 1:
        for i in range(k):
            select = (label_k == values[i]) | ~mixed
            pred_i = pred_k[select].reshape(-1, c + 1 - k)
            label_i = (label_k[select].reshape(-1, c + 1 - k) > 0).float()
            row_loss = row_loss + eta_list[i] * (-label_i * F.log_softmax(pred_i, dim=-1)).sum(dim=-1)
    total = row_loss.sum() / n
    if (~keep).any():
        total = total + (-label[~keep] * F.log_softmax(logits[~keep], dim=-1)).sum() / n
    return total


def random_case(rng, n=16, c=K, lam=None):
    labels = torch.from_numpy(rng.integers(0, c, n))
    perm = torch.from_numpy(rng.permutation(n))
    if lam is None:
        lam = float(rng.beta(0.2, 0.2))
    logits = torch.from_numpy(rng.normal(0, 3, (n, c))).float()
    return logits, labels, labels[perm], lam


def loss(logits, y_a, y_b, lam, eta=0.1, mode="both", idx=1.0, **kw):
    return decoupled_mix_loss(logits, y_a, y_b, lam, eta, mode, idx, **kw)


def soft_ce(logits, y_a, y_b, lam):
    """The project's soft mixup CE (common.mixing) on lam * e(y_a) + (1 - lam) * e(y_b)."""
    return soft_target_cross_entropy(
        logits, lam * smooth_one_hot(y_a, K) + (1 - lam) * smooth_one_hot(y_b, K)
    )


# ----------------------------------------------------------------------------------------------------
# §5.8 parity with the official formulation


@pytest.mark.parametrize("eta,mode,idx", CONFIG_ROWS)
def test_parity_with_official_formulation_over_random_batches(eta, mode, idx):
    rng = np.random.default_rng(CONFIG_ROWS.index((eta, mode, idx)))
    special = [0.5, 0.3, 0.7, 5e-4, 1 - 5e-4, 0.0, 1.0, 1e-3, 1 - 1e-3, 1.001e-3]
    active = 0
    for case in range(120):
        logits, y_a, y_b, lam = random_case(
            rng, n=int(rng.integers(2, 24)), lam=special[case] if case < len(special) else None
        )
        if case % 25 == 0:  # small label sets: many same-class pairs
            y_a = y_a % 2
            y_b = y_b % 2
        weights = head_eta_reference(lam, eta, mode, idx)
        want = official_formulation(logits, y_a, y_b, lam, weights)
        got = loss(logits, y_a, y_b, lam, eta, mode, idx)
        assert abs(float(got) - float(want)) <= 1e-6 * max(1.0, abs(float(want))), (case, lam, got, want)
        active += float(got - soft_ce(logits, y_a, y_b, lam)) > 1e-4
    assert active > 40  # the decoupled term was really exercised


@pytest.mark.parametrize("eta,mode,idx", CONFIG_ROWS[:2])
def test_gradients_match_official_formulation(eta, mode, idx):
    rng = np.random.default_rng(7)
    for _ in range(20):
        logits, y_a, y_b, lam = random_case(rng)
        ours, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        loss(ours, y_a, y_b, lam, eta, mode, idx).backward()
        official_formulation(ref, y_a, y_b, lam, head_eta_reference(lam, eta, mode, idx)).backward()
        assert torch.allclose(ours.grad, ref.grad, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# §5.6 eta table


@pytest.mark.parametrize("lam", [0.2, 0.3, 0.5, 0.7, 0.95])
@pytest.mark.parametrize("mode", ["both", "more", "less"])
@pytest.mark.parametrize("idx", [0.0, 0.5, 1.0])
def test_eta_table_matches_head(lam, mode, idx):
    assert eta_weights(lam, 0.1, mode, idx) == pytest.approx(
        tuple(head_eta_reference(lam, 0.1, mode, idx)), abs=1e-15
    )


def test_eta_table_explicit_values():
    s3, s7 = math.sqrt(0.3), math.sqrt(0.7)
    assert eta_weights(0.3, 0.1, "more", 0.5) == pytest.approx((0.0, 0.1 * s7))  # 1-lam dominates
    assert eta_weights(0.7, 0.1, "more", 0.5) == pytest.approx((0.1 * s7, 0.0))
    assert eta_weights(0.3, 0.1, "less", 0.5) == pytest.approx((0.1 * s3, 0.0))  # lam is the minor one
    assert eta_weights(0.7, 0.1, "less", 0.5) == pytest.approx((0.0, 0.1 * s3))
    assert eta_weights(0.3, 0.1, "both", 1.0) == pytest.approx((0.03, 0.07))
    assert eta_weights(0.3, 0.1, "both", 0.0) == (0.1, 0.1)  # §5.1: both classes get eta
    assert eta_weights(0.5, 0.1, "more", 1.0) == pytest.approx((0.05, 0.0))  # lam >= thr: lam side
    assert eta_weights(0.3, 0.1, "both", 1.0, lam_scale_mode="none") == (0.1, 0.1)
    assert eta_weights(0.3, 0.1, "both", 1.0, lam_thr=0.5) == pytest.approx(
        (0.06, 0.1)
    )  # 0.3/0.5, 0.7 >= thr
    assert eta_weights(0.3, 0.0, "both", 1.0) == (0.0, 0.0)
    assert lambda_adjust(0.25, 1.0, 0.5) == pytest.approx(0.5) and lambda_adjust(1.0, 1.0, 0.5) == 1.0


# ----------------------------------------------------------------------------------------------------
# §5.1, §5.2: zero weights and one-class rows give the soft mixup CE


def test_zero_weights_give_soft_mixup_ce():
    rng = np.random.default_rng(1)
    for _ in range(20):
        logits, y_a, y_b, lam = random_case(rng)
        assert abs(float(loss(logits, y_a, y_b, lam, eta=0.0)) - float(soft_ce(logits, y_a, y_b, lam))) < 1e-6
        assert float(decoupled_mix_terms(logits, y_a, y_b, lam, 0.0, "both", 1.0)[1]) == 0.0


def test_batch_of_same_class_pairs_is_soft_ce_divided_by_n():
    rng = np.random.default_rng(2)
    logits, y_a, _, _ = random_case(rng)
    got = loss(logits, y_a, y_a, 0.3, eta=0.5, mode="both", idx=0.0)
    assert abs(float(got) - float(F.cross_entropy(logits, y_a))) < 1e-6


def test_rows_by_hand_one_class_rows_are_plain_and_two_class_rows_add_both_terms():
    """§5.1 with mode both, idx 0 (weights eta, eta): a per-row loop with explicit column deletion."""
    torch.manual_seed(0)
    logits = torch.randn(6, K) * 2
    y_a = torch.tensor([1, 2, 3, 4, 5, 6])
    y_b = torch.tensor([1, 7, 0, 4, 9, 2])  # rows 0 and 3 are one-class
    lam, eta = 0.3, 0.2
    total = 0.0
    for b in range(6):
        logp = F.log_softmax(logits[b], dim=0)
        row = -(lam * logp[y_a[b]] + (1 - lam) * logp[y_b[b]]) if y_a[b] != y_b[b] else -logp[y_a[b]]
        if y_a[b] != y_b[b]:
            for c, o in ((y_a[b], y_b[b]), (y_b[b], y_a[b])):
                kept = [j for j in range(K) if j != o]  # delete the other mixed class
                row = row - eta * F.log_softmax(logits[b, kept], dim=0)[kept.index(int(c))]
        total += float(row)
    got = loss(logits, y_a, y_b, lam, eta=eta, mode="both", idx=0.0)
    assert abs(float(got) - total / 6) < 1e-6


# ----------------------------------------------------------------------------------------------------
# §5.3 decoupled CE = CE with the other logit at -inf; zero gradient there


def test_decoupled_ce_is_ce_with_other_logit_at_minus_inf():
    torch.manual_seed(3)
    z = torch.randn(8, K) * 3
    cls, other = torch.randint(0, K, (8,)), torch.randint(0, K, (8,))
    other = torch.where(other == cls, (cls + 1) % K, other)
    masked = z.clone()
    masked[torch.arange(8), other] = float("-inf")
    want = F.cross_entropy(masked, cls, reduction="none")
    assert torch.allclose(decoupled_ce(z, cls, other), want, atol=1e-6)


def test_decoupled_ce_gradient_on_the_other_logit_is_exactly_zero():
    torch.manual_seed(4)
    z = (torch.randn(8, K) * 3).requires_grad_()
    cls = torch.arange(8) % K
    other = (cls + 3) % K
    decoupled_ce(z, cls, other).sum().backward()
    assert torch.all(z.grad[torch.arange(8), other] == 0.0)
    assert torch.all(z.grad[torch.arange(8), cls] != 0.0)
    # in the full loss (weight only on y_a's decoupled term), z[y_b]'s gradient is the mixup CE's alone
    y_a, y_b, lam = cls, other, 0.3
    full, plain = z.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    loss(full, y_a, y_b, lam, eta=0.5, mode="less", idx=0.0, eta_assignment="by_component").backward()
    soft_ce(plain, y_a, y_b, lam).backward()
    rows = torch.arange(8)
    assert torch.allclose(full.grad[rows, y_b], plain.grad[rows, y_b], rtol=0, atol=1e-7)
    assert not torch.allclose(full.grad[rows, y_a], plain.grad[rows, y_a], atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# §5.4 shift invariance, §5.5 skipped batches


def test_adding_a_constant_to_a_row_leaves_the_loss_unchanged():
    rng = np.random.default_rng(5)
    for eta, mode, idx in CONFIG_ROWS:
        logits, y_a, y_b, lam = random_case(rng, lam=0.3)
        shift = torch.from_numpy(rng.normal(0, 50, (len(y_a), 1))).float()
        a, b = (
            loss(logits, y_a, y_b, lam, eta, mode, idx),
            loss(logits + shift, y_a, y_b, lam, eta, mode, idx),
        )
        assert abs(float(a) - float(b)) < 1e-4


@pytest.mark.parametrize("lam", [0.5, 0.0, 1.0, 5e-4, 1 - 5e-4, 1e-3, 1 - 1e-3])
def test_no_decoupled_term_at_half_or_within_eps_of_the_ends(lam):
    rng = np.random.default_rng(6)
    logits, y_a, y_b, _ = random_case(rng)
    mce, dec = decoupled_mix_terms(logits, y_a, y_b, lam, 0.5, "both", 0.0)
    assert float(dec) == 0.0
    assert abs(float(mce) - float(soft_ce(logits, y_a, y_b, lam))) < 1e-6
    # just inside the range the term is on
    _, dec_on = decoupled_mix_terms(logits, y_a, y_b, 0.499, 0.5, "both", 0.0)
    assert float(dec_on) > 0


# ----------------------------------------------------------------------------------------------------
# §5.7 the official pairing quirk and the by_component variant


def by_hand(logits, y_a, y_b, lam, w_for_a, w_for_b):
    """Mixup CE + w_for_a * L_dec(y_a) + w_for_b * L_dec(y_b) on two-class rows, / N."""
    two = (y_a != y_b).float()
    dec = w_for_a * decoupled_ce(logits, y_a, y_b) + w_for_b * decoupled_ce(logits, y_b, y_a)
    return soft_ce(logits, y_a, y_b, lam) + (two * dec).sum() / len(y_a)


def test_official_pairing_follows_class_order_of_first_two_class_row():
    torch.manual_seed(8)
    logits = torch.randn(5, K)
    y_a = torch.tensor([3, 2, 8, 1, 4])
    lam = 0.3
    w_a, w_b = eta_weights(lam, 0.1, "less", 0.5)  # (eta sqrt(0.3), 0): only the lam component
    assert w_a > 0 and w_b == 0
    # row 0 is one-class; the first two-class row is row 1 with y_a = 2 < y_b = 7: weights by component
    y_b = torch.tensor([3, 7, 0, 6, 4])
    got = loss(logits, y_a, y_b, lam, 0.1, "less", 0.5)
    assert abs(float(got) - float(by_hand(logits, y_a, y_b, lam, w_a, w_b))) < 1e-6
    # swap the class ids of that row (now y_a = 7 > y_b = 2): w_a moves to the (1 - lam) class in EVERY row
    y_a2, y_b2 = y_a.clone(), y_b.clone()
    y_a2[1], y_b2[1] = 7, 2
    got = loss(logits, y_a2, y_b2, lam, 0.1, "less", 0.5)
    assert abs(float(got) - float(by_hand(logits, y_a2, y_b2, lam, w_b, w_a))) < 1e-6
    assert abs(float(got) - float(by_hand(logits, y_a2, y_b2, lam, w_a, w_b))) > 1e-3
    # by_component keeps w_a on the lam class whatever the first row
    for ya, yb in ((y_a, y_b), (y_a2, y_b2)):
        got = loss(logits, ya, yb, lam, 0.1, "less", 0.5, eta_assignment="by_component")
        assert abs(float(got) - float(by_hand(logits, ya, yb, lam, w_a, w_b))) < 1e-6


def test_reordering_rows_changes_official_loss_but_not_by_component():
    torch.manual_seed(9)
    logits = torch.randn(4, K)
    y_a, y_b = (
        torch.tensor([1, 5, 2, 9]),
        torch.tensor([4, 0, 6, 3]),
    )  # rows 0, 2: y_a < y_b; rows 1, 3: y_a > y_b
    order = torch.tensor([1, 0, 2, 3])
    for mode, idx in (("more", 0.5), ("less", 0.0), ("both", 1.0)):
        args = (0.2, 0.1, mode, idx)
        off = [float(decoupled_mix_loss(logits[o], y_a[o], y_b[o], *args)) for o in (torch.arange(4), order)]
        comp = [
            float(decoupled_mix_loss(logits[o], y_a[o], y_b[o], *args, eta_assignment="by_component"))
            for o in (torch.arange(4), order)
        ]
        assert abs(off[0] - off[1]) > 1e-4 and abs(comp[0] - comp[1]) < 1e-6
        assert abs(off[0] - comp[0]) < 1e-6  # first row has y_a < y_b: official = by component
    # mode both with idx 0: equal weights, the order cannot matter
    args = (0.2, 0.1, "both", 0.0)
    assert (
        abs(
            float(decoupled_mix_loss(logits, y_a, y_b, *args))
            - float(decoupled_mix_loss(logits[order], y_a[order], y_b[order], *args))
        )
        < 1e-6
    )


def test_official_and_by_component_differ_in_about_half_the_active_batches():
    rng = np.random.default_rng(10)
    differ = active = 0
    for _ in range(200):
        logits, y_a, y_b, lam = random_case(rng)
        off = float(loss(logits, y_a, y_b, lam, 0.1, "less", 0.5))
        comp = float(loss(logits, y_a, y_b, lam, 0.1, "less", 0.5, eta_assignment="by_component"))
        active += abs(off - soft_ce(logits, y_a, y_b, lam).item()) > 1e-6
        differ += abs(off - comp) > 1e-6
    assert active > 100 and 0.3 * active < differ < 0.7 * active


# ----------------------------------------------------------------------------------------------------
# The registered methods


def make(name, label_smoothing=0.0, **options):
    return build_method({"name": name, **options}, num_classes=K, label_smoothing=label_smoothing)


DM_METHODS = {"decouple_mixup": "mixup", "decouple_cutmix": "cutmix", "decouple_resizemix": "resizemix"}
DM_OPTIONS = {
    "decouple_mixup": {"mixup_alpha": 0.2},
    "decouple_cutmix": {"cutmix_alpha": 0.2, "prob": 1.0},
    "decouple_resizemix": {"geometry": "openmixup", "alpha": 0.2},
}


@pytest.mark.parametrize("name", sorted(DM_METHODS))
def test_label_smoothing_is_a_clear_error(name):
    with pytest.raises(ReproError, match="label smoothing.*train.label_smoothing=0"):
        make(name, label_smoothing=0.1)


def test_defaults_are_the_official_base_config():
    p = make("decouple_mixup").params
    assert (p.eta, p.eta_mode, p.eta_thr, p.lam_idx, p.lam_thr, p.lam_scale_mode, p.eta_assignment) == (
        0.1,
        "both",
        0.5,
        1.0,
        1.0,
        "pow",
        "official_class_order",
    )


def test_bad_options_are_errors():
    for options, match in (
        ({"eta_mode": "most"}, "eta_mode"),
        ({"eta": -1.0}, "eta"),
        ({"eta_assignment": "by_class"}, "eta_assignment"),
        ({"lam_thr": 0.0}, "lam_thr"),
        ({"lam_scale_mode": "exp"}, "lam_scale_mode"),
        ({"mode": "elem"}, "mode='batch'"),
    ):
        with pytest.raises(ReproError, match=match):
            make("decouple_mixup", **options)


def toy_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, K))


@pytest.mark.parametrize("name", sorted(DM_METHODS))
def test_eta_zero_is_the_base_method_on_the_same_draws(name):
    model, x, labels = toy_model(), torch.randn(16, 3, 32, 32), torch.arange(16) % K
    dm = make(name, eta=0.0, **DM_OPTIONS[name])
    base = make(DM_METHODS[name], **DM_OPTIONS[name])
    for seed in range(4):
        ours = dm.step(model, (x, labels), StepContext(0, 0, 0.0, torch.Generator().manual_seed(seed)))
        want = base.step(model, (x, labels), StepContext(0, 0, 0.0, torch.Generator().manual_seed(seed)))
        assert torch.equal(ours["logits"], want["logits"])  # same mixed images: the mixing code is reused
        assert abs(ours["loss"].item() - want["loss"].item()) < 1e-6 and ours["loss_dec"].item() == 0.0


@pytest.mark.parametrize("name", sorted(DM_METHODS))
def test_step_is_the_dm_loss_on_the_base_methods_mixed_batch(name):
    model, x, labels = toy_model(), torch.randn(16, 3, 32, 32), torch.arange(16) % K
    dm = make(name, eta=0.5, eta_mode="less", lam_idx=0.5, **DM_OPTIONS[name])
    seen = 0
    for seed in range(6):
        out = dm.step(model, (x, labels), StepContext(0, 0, 0.0, torch.Generator().manual_seed(seed)))
        x_mix, target = dm.mix(x, labels, torch.Generator().manual_seed(seed))
        x_again, y_b, lam = dm.mix_pairs(x, labels, torch.Generator().manual_seed(seed))
        assert torch.equal(x_mix, x_again) and out["lam"] == lam
        # the pairs and lambda reproduce the base method's soft target exactly
        assert torch.allclose(target, lam * F.one_hot(labels, K) + (1 - lam) * F.one_hot(y_b, K), atol=1e-6)
        want = official_formulation(model(x_mix), labels, y_b, lam, head_eta_reference(lam, 0.5, "less", 0.5))
        assert abs(out["loss"].item() - want.item()) < 1e-5
        seen += float(out["loss_dec"]) > 0
        out["loss"].backward()
        assert torch.isfinite(model[1].weight.grad).all()
    assert seen >= 2


def test_bf16_logits_are_computed_in_float32():
    rng = np.random.default_rng(11)
    logits, y_a, y_b, _ = random_case(rng)
    got = loss(logits.bfloat16(), y_a, y_b, 0.3)
    assert got.dtype == torch.float32
    assert abs(float(got) - float(loss(logits.bfloat16().float(), y_a, y_b, 0.3))) < 1e-6


# ----------------------------------------------------------------------------------------------------
# One short training run through the trainer


def test_smoke_config_trains_through_the_trainer(tmp_path):
    from common.train import main

    config = REPO / "papers/decouplemix/configs/smoke/cifar10_resnet18_200ep.yaml"
    out = tmp_path / "decouple_cutmix"
    assert (
        main(
            [
                "--config",
                str(config),
                "--method",
                "decouple_cutmix",
                "--output",
                str(out),
                "train.epochs=1",
                "train.max_steps_per_epoch=3",
                "train.batch_size=32",
                "data.num_workers=0",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "decouple_cutmix" and 0 <= metrics["final"]["top1"] <= 100
    row = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert row["train_loss_dec"] > 0
    assert row["train_loss"] == pytest.approx(row["train_loss_mce"] + row["train_loss_dec"], rel=1e-5)
