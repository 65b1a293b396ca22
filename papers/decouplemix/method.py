"""Harnessing Hard Mixed Samples with Decoupled Regularizer (DecoupleMix, DM).

Liu, Li, Wang, Tan, Wu, Li; NeurIPS 2023, arXiv 2203.10761 (first titled "Decoupled Mixup for Data-efficient
Learning"). Official code: Westlake-AI/openmixup, `openmixup/models/heads/cls_mixup_head.py`
(`ClsMixupHead.loss`, `lambda_adjust`: the eta weights) and `openmixup/models/losses/cross_entropy_loss.py`
(`soft_mix_cross_entropy`: the loss). This file mirrors those two functions (shared spec decouplemix.md §2);
where the paper and the code differ, the code is followed (§2.5, papers/decouplemix/README.md).

DM is a loss, not a mixing policy: any static mixing method supplies ``(y_a, y_b, lam)`` (``lam`` the weight
of ``y_a``, corrected for cut methods) and DM adds, for each of the two mixed classes, a cross-entropy over a
softmax from which the *other* mixed class is removed:

    loss = 1/N sum_rows [ L_mce + two_class * (w(y_a) * L_dec(y_a | y_b) + w(y_b) * L_dec(y_b | y_a)) ]

* ``L_mce = -sum_c T[c] log_softmax(z)[c]`` with ``T = lam e(y_a) + (1 - lam) e(y_b)``;
* ``L_dec(c | o) = logsumexp_{c' != o} z[c'] - z[c]``: the CE of ``c`` with ``z[o] = -inf`` (masked, so the
  gradient w.r.t. ``z[o]`` is exactly zero);
* two-class rows: ``y_a != y_b`` and both target values above ``eps = 1e-3``; the others get ``L_mce`` only,
  still divided by the full batch ``N`` (the head's ``avg_factor = N``);
* the weights come from ``eta_weights`` (the head's eta table); the decoupled term is skipped for the batch
  when the two target values coincide (``lam = 0.5``);
* which weight goes to which class (``eta_assignment``): ``official_class_order`` (default) reproduces the
  official code, which pairs ``[w_a, w_b]`` with the target values of the first two-class row read in
  ascending class-index order, so ``w_a`` lands on the ``(1 - lam)`` class for the whole batch when that row
  has ``y_a > y_b`` (spec §2.3 item 4); ``by_component`` always gives ``w_a`` to ``y_a`` (the evident
  intent).

Deviations: the official boolean-index/reshape selection is replaced by masking (same values, tested against a
plain re-implementation of the official formulation); label smoothing is rejected (the official decoupled
target degenerates to all ones with it, spec §2.3); ``eta = 0`` means plain mixup CE (the official loss
rejects it); only one ``lam`` per batch (the official pairing reads values shared by every row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.errors import ReproError
from common.methods import register_method
from common.mixing import apply_mix, smooth_one_hot
from papers.cutmix.method import CutMix
from papers.mixup.method import Mixup
from papers.resizemix.method import ResizeMix

ETA_MODES = ("both", "more", "less")
ASSIGNMENTS = ("official_class_order", "by_component")
SCALE_MODES = ("pow", "none")


def lambda_adjust(value: float, lam_thr: float = 1.0, lam_idx: float = 1.0) -> float:
    """The head's ``lambda_adjust``, 'pow' mode: 1 if value >= lam_thr, else (value/lam_thr) ** |lam_idx|."""
    if value >= lam_thr:
        return 1.0
    return lam_thr ** (-abs(lam_idx)) * value ** abs(lam_idx)


def eta_weights(
    lam: float,
    eta: float,
    eta_mode: str,
    lam_idx: float,
    eta_thr: float = 0.5,
    lam_thr: float = 1.0,
    lam_scale_mode: str = "pow",
) -> tuple[float, float]:
    """The eta table (spec §2.2): weights ``(w_a, w_b)`` meant for the lam- and the (1-lam)-component.

    'both' weights both; 'more' only the dominant one (the lam-component iff lam >= eta_thr); 'less' only
    the minor one. A chosen weight is ``eta * lambda_adjust(v)`` ('pow') or ``eta`` ('none') for its value
    ``v in {lam, 1 - lam}``, and 0 when ``v = 0`` (the head only rescales positive entries). ``eta = 0`` gives
    (0, 0): plain mixup CE.
    """
    if eta_mode not in ETA_MODES:
        raise ReproError(f"eta_mode must be one of {', '.join(ETA_MODES)}, got {eta_mode!r}.")
    if lam_scale_mode not in SCALE_MODES:
        raise ReproError(
            f"lam_scale_mode must be one of {', '.join(SCALE_MODES)}, got {lam_scale_mode!r} "
            "('exp' exists in OpenMixup but no DM config uses it)."
        )
    if eta == 0:
        return 0.0, 0.0
    lam_a = lam >= eta_thr  # the lam-component dominates
    use = {"both": (True, True), "more": (lam_a, not lam_a), "less": (not lam_a, lam_a)}[eta_mode]

    def weight(value: float) -> float:
        if value <= 0:
            return 0.0
        return eta * (lambda_adjust(value, lam_thr, lam_idx) if lam_scale_mode == "pow" else 1.0)

    return (weight(lam) if use[0] else 0.0, weight(1.0 - lam) if use[1] else 0.0)


def decoupled_ce(
    logits: torch.Tensor, cls: torch.Tensor, other: torch.Tensor, active: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-row CE of class ``cls`` over the softmax with class ``other`` removed (its logit set to -inf).

    Args:
        logits: (N, C) logits.
        cls, other: (N,) class indices (``other`` is masked only on ``active`` rows).
        active: (N,) bool rows where the mask applies (default: where ``cls != other``); elsewhere plain CE.
    Returns:
        (N,) float32 ``logsumexp_{c' != other} z[c'] - z[cls]``.
    """
    z = logits.float()
    if active is None:
        active = cls != other
    drop = F.one_hot(other, z.shape[1]).bool() & active.unsqueeze(1)
    target_logit = z.gather(1, cls.view(-1, 1)).squeeze(1)
    return torch.logsumexp(z.masked_fill(drop, float("-inf")), dim=1) - target_logit


def decoupled_mix_terms(
    logits: torch.Tensor,
    y_a: torch.Tensor,
    y_b: torch.Tensor,
    lam: float,
    eta: float,
    eta_mode: str,
    lam_idx: float,
    eta_assignment: str = "official_class_order",
    eta_thr: float = 0.5,
    lam_thr: float = 1.0,
    lam_scale_mode: str = "pow",
    eps: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DM loss in two parts, each summed over rows and divided by N: (mixup CE, weighted decoupled CE).

    Args:
        logits: (N, C) logits of the mixed batch (any float dtype; computed in float32).
        y_a, y_b: (N,) labels of each row and of its partner.
        lam: weight of ``y_a`` (one value for the batch; the corrected lambda for cut methods).
        the rest: see ``eta_weights`` and the module docstring.
    """
    if eta_assignment not in ASSIGNMENTS:
        raise ReproError(f"eta_assignment must be one of {', '.join(ASSIGNMENTS)}, got {eta_assignment!r}.")
    lam = float(lam)
    z = logits.float()
    n, num_classes = z.shape
    y_a, y_b = y_a.to(z.device).long(), y_b.to(z.device).long()
    # the official target lam * e(y_a) + (1 - lam) * e(y_b) is float32; its two values decide what follows
    values = torch.tensor([lam, 1.0 - lam], dtype=torch.float32)  # CPU: no device sync
    value_a, value_b = (float(v) for v in values)
    two_values = bool((values > eps).all())  # compared in float32, as the official `label > eps`
    target = value_a * F.one_hot(y_a, num_classes).float() + value_b * F.one_hot(y_b, num_classes).float()
    mce = -(target * F.log_softmax(z, dim=1)).sum(dim=1).sum() / n
    w_a, w_b = eta_weights(lam, eta, eta_mode, lam_idx, eta_thr, lam_thr, lam_scale_mode)
    if (w_a == 0 and w_b == 0) or value_a == value_b or not two_values:
        return mce, torch.zeros_like(mce)  # no weight, lam = 0.5, or no row with two classes above eps
    two_class = y_a != y_b
    weights = torch.tensor([w_a, w_b], dtype=torch.float32, device=z.device)
    if eta_assignment == "official_class_order":
        # w_a goes to the class holding the smaller class index's value in the first two-class row: if there
        # y_a > y_b, the (1 - lam) class gets w_a for the whole batch (argmax: first True; no host sync)
        first = two_class.int().argmax()
        weights = torch.where(y_a[first] > y_b[first], weights.flip(0), weights)
    dec_a, dec_b = decoupled_ce(z, y_a, y_b, two_class), decoupled_ce(z, y_b, y_a, two_class)
    dec = weights[0] * dec_a + weights[1] * dec_b
    return mce, torch.where(two_class, dec, torch.zeros_like(dec)).sum() / n


def decoupled_mix_loss(
    logits,
    y_a,
    y_b,
    lam,
    eta,
    eta_mode,
    lam_idx,
    eta_assignment="official_class_order",
    eta_thr=0.5,
    lam_thr=1.0,
    lam_scale_mode="pow",
    eps=1e-3,
) -> torch.Tensor:
    """DM loss = mixup soft CE + weighted decoupled CE, batch mean over N (see `decoupled_mix_terms`)."""
    mce, dec = decoupled_mix_terms(
        logits, y_a, y_b, lam, eta, eta_mode, lam_idx, eta_assignment, eta_thr, lam_thr, lam_scale_mode, eps
    )
    return mce + dec


@dataclass
class DecoupleParams:
    """DM options; defaults of OpenMixup's cifar100/mixups/decouple/r18_mixups_CE_soft_decouple.py."""

    eta: float = 0.1  # eta_weight['eta']
    eta_mode: str = "both"  # eta_weight['mode']: both | more | less
    eta_thr: float = 0.5  # eta_weight['thr'], 0.5 in every config
    lam_idx: float = 1.0  # head lam_idx: weights scale with value ** |lam_idx|
    lam_thr: float = 1.0  # head lam_thr, 1 in every config
    lam_scale_mode: str = "pow"  # head lam_scale_mode: pow | none
    eta_assignment: str = "official_class_order"  # official_class_order (official quirk) | by_component


class Decoupled:
    """Mixin: a mixing method's images and ``(y_b, lam)``, trained with the DM loss instead of the mixup CE.

    The mixing class supplies ``mix_pairs(images, labels, generator) -> (x_mix, y_b, lam)`` through its own
    draw/apply code; nothing of the mixing is re-implemented here.
    """

    def __init__(self, params, num_classes, label_smoothing=0.0, task="classification"):
        super().__init__(params, num_classes, label_smoothing, task)
        p = params
        if label_smoothing:
            raise ReproError(
                f"method {self.name!r} cannot use label smoothing (train.label_smoothing={label_smoothing}): "
                "the official decoupled target degenerates to all ones with it (spec §2.3); "
                "set train.label_smoothing=0."
            )
        if p.eta < 0:
            raise ReproError(f"method.eta must be >= 0 (0 = plain mixup CE), got {p.eta}.")
        if not 0 < p.lam_thr <= 1 or not 0 <= p.eta_thr <= 1:
            raise ReproError(
                f"method.lam_thr must be in (0, 1] and eta_thr in [0, 1], got {p.lam_thr}, {p.eta_thr}."
            )
        for key, allowed in (
            ("eta_mode", ETA_MODES),
            ("eta_assignment", ASSIGNMENTS),
            ("lam_scale_mode", SCALE_MODES),
        ):
            if getattr(p, key) not in allowed:
                raise ReproError(
                    f"method.{key} must be one of {', '.join(allowed)}, got {getattr(p, key)!r}."
                )

    def loss_terms(self, logits, y_a, y_b, lam):
        p = self.params
        return decoupled_mix_terms(
            logits,
            y_a,
            y_b,
            lam,
            p.eta,
            p.eta_mode,
            p.lam_idx,
            p.eta_assignment,
            p.eta_thr,
            p.lam_thr,
            p.lam_scale_mode,
        )

    def step(self, model, batch, ctx):
        images, labels = batch
        x_mix, y_b, lam = self.mix_pairs(images, labels, ctx.generator)
        logits = model(x_mix)
        mce, dec = self.loss_terms(logits, labels, y_b, lam)
        return {
            "loss": mce + dec,
            "logits": logits,
            "lam": lam,
            "loss_mce": mce.detach(),
            "loss_dec": dec.detach(),
        }


class DecoupledMixCutMix(Decoupled):
    """DM over a `MixCutMix` preset: its `draw` and `common.mixing.apply_mix`, one lambda per batch."""

    def __init__(self, params, num_classes, label_smoothing=0.0, task="classification"):
        super().__init__(params, num_classes, label_smoothing, task)
        if params.mode != "batch":
            raise ReproError(
                f"method {self.name!r} needs mode='batch' (one lam per batch, as OpenMixup), "
                f"got {params.mode!r}."
            )

    def mix_pairs(self, images, labels, generator):
        draws = self.draw(generator, images.shape[0], images.shape[-2:])
        target = smooth_one_hot(labels, self.num_classes)
        x_mix, _, lam, _ = apply_mix(images, target, draws, correct_lam=self.params.correct_lam)
        return x_mix, labels[draws.partner.to(labels.device)], float(lam[0])


@register_method("decouple_mixup")
class DecoupleMixup(DecoupledMixCutMix, Mixup):
    """DM + Mixup (official Mixup semantics: randperm partners, every batch)."""

    @dataclass
    class Params(DecoupleParams, Mixup.Params):
        pass


@register_method("decouple_cutmix")
class DecoupleCutMix(DecoupledMixCutMix, CutMix):
    """DM + CutMix (corrected lambda). The official CutMix gate (prob 0.5) is the default; OpenMixup mixes
    every batch, so the DM configs set prob: 1.0."""

    @dataclass
    class Params(DecoupleParams, CutMix.Params):
        pass


@register_method("decouple_resizemix")
class DecoupleResizeMix(Decoupled, ResizeMix):
    """DM + ResizeMix (either geometry of papers/resizemix; OpenMixup's for the DM configs)."""

    @dataclass
    class Params(DecoupleParams, ResizeMix.Params):
        pass

    def mix_pairs(self, images, labels, generator):
        draws = self.draw(generator, images.shape[0], images.shape[-2:])
        x_mix, _, lam = self.apply(images, labels, draws)
        return x_mix, labels[draws.perm.to(labels.device)], float(lam)
