"""RankMixup: Ranking-Based Mixup Training for Network Calibration (Noh, Park, Lee, Ham; ICCV 2023, arXiv 2308.11990).

Official code: cvlab-yonsei/RankMixup (commit e5dc77f). This step mirrors `Trainer.train_epoch` of
`calibrate/engine/trainer.py` (clean forward, then `model.forward_multimixup`, loss, grad-norm clip 2.0),
`mixup_process` + `forward_multimixup` of `calibrate/net/resnet_mixup.py` (M mixed copies, one lambda and
one permutation per copy, concatenated copy by copy and run as one *separate* forward, so BatchNorm sees
the clean and the mixed batches apart), and `RankMixup_MRL` / `RankMixup_MNDCG` of
`calibrate/losses/rankmixup.py`:

* loss = CE(clean logits, labels) + 0.1 * rank loss; the mixed labels are never supervised directly;
* MRL (M = 1): hinge on **maximum logits** ``relu(max z~ - max z + margin)``, times the **global** share of
  rows whose mixed target has no entry equal to 1.0 (the official `(B,) * (B, 1)` broadcast); the
  per-sample mask (the evident intent) is the `mask: per_sample` variant;
* M-NDCG (M = 3): DCG of the confidences (raw sample first, copies ordered by relevance
  ``max_k t~ = max(lam, 1 - lam)``, or 1 for same-class pairs) over the IDCG of those relevances, scored by
  ``min(DCG/IDCG, IDCG/DCG)``; loss ``mean(1 - ndcg)``.

Where the paper and the official code differ, the code is followed (shared spec rankmixup.md §2.8).
Deviations (papers/rankmixup/README.md): lambdas and permutations come from the run's torch generator (same
law) instead of NumPy's global one; the ordering uses a stable sort (the official `torch.argsort` is not
stable; only tied relevances can differ); the validation pass does not run the mixed forward (it only fed a
logged loss); label smoothing, off in every official config, would go into the clean CE (torchvision's
place), never into the targets the mask and the relevances read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.errors import ReproError
from common.methods import Method, register_method
from common.mixing import mix_targets, mixup_images, randperm_partner, sample_beta, smooth_one_hot

__all__ = ["MNDCG", "MRL", "draw_copies", "mix_copies", "mndcg_loss", "mrl_loss"]

MRL_MASKS = ("official_global", "per_sample")


def _split_copies(logits: torch.Tensor, mixed_logits: torch.Tensor, mixed_targets: torch.Tensor) -> int:
    """Check shapes and return the number of copies M = mixed rows / clean rows."""
    if logits.dim() != 2 or mixed_logits.dim() != 2 or mixed_targets.shape != mixed_logits.shape:
        raise ReproError(
            f"expected logits (B, K), mixed_logits (M*B, K) and mixed_targets (M*B, K), got "
            f"{tuple(logits.shape)}, {tuple(mixed_logits.shape)} and {tuple(mixed_targets.shape)}."
        )
    batch, rows = logits.shape[0], mixed_logits.shape[0]
    if rows % batch or mixed_logits.shape[1] != logits.shape[1]:
        raise ReproError(
            f"mixed_logits {tuple(mixed_logits.shape)} is not M copies of logits {tuple(logits.shape)}."
        )
    return rows // batch


def mrl_loss(
    logits: torch.Tensor,
    mixed_logits: torch.Tensor,
    mixed_targets: torch.Tensor,
    margin: float,
    mask: str = "official_global",
) -> torch.Tensor:
    """Mixup-based ranking loss: a mixed image should score below its raw image by `margin` (max logits).

    Args:
        logits: (B, K) clean logits.
        mixed_logits: (B, K) logits of the one mixed copy; row b mixes x[b] (weight lam) with its partner.
        mixed_targets: (B, K) float32 mixed targets; a row with an entry exactly 1.0 is "self-mixed"
            (same-class partner), as the official `target_re == 1.0` test.
        margin: Hinge margin on the logit difference (2.0 CIFAR, 1.0 Tiny-ImageNet).
        mask: 'official_global' multiplies the mean hinge by the share of rows that are not self-mixed (what
            the official broadcast computes); 'per_sample' zeroes the hinge of self-mixed rows only.

    Returns:
        Scalar loss (float32).
    """
    if _split_copies(logits, mixed_logits, mixed_targets) != 1:
        raise ReproError(
            f"MRL compares one mixed copy with its raw image, got {mixed_logits.shape[0] // logits.shape[0]} "
            "copies (the official code crashes there too); use num_mixup: 1 for MRL, or the mndcg method."
        )
    # maximum logits, not probabilities: the official get_logit_diff (get_conf_diff is never called)
    diff = mixed_logits.float().max(dim=1).values - logits.float().max(dim=1).values
    hinge = F.relu(diff + margin)
    not_self = ~(mixed_targets == 1.0).any(dim=1)
    if mask == "official_global":
        # official: (B,) mask * (B, 1) hinge broadcasts to (B, B); its mean = share(not_self) * mean(hinge)
        return not_self.float().mean() * hinge.mean()
    if mask == "per_sample":
        return (not_self.float() * hinge).mean()
    raise ReproError(f"unknown MRL mask {mask!r}; use one of {', '.join(MRL_MASKS)}.")


def mndcg_loss(logits: torch.Tensor, mixed_logits: torch.Tensor, mixed_targets: torch.Tensor) -> torch.Tensor:
    """M-NDCG loss: confidences of the raw sample and its M mixed copies should rank like their relevances.

    Args:
        logits: (B, K) clean logits.
        mixed_logits: (M*B, K) logits of the mixed copies, copy by copy (row j*B + b = copy j of sample b).
        mixed_targets: (M*B, K) their mixed targets; relevance = max_k target (max(lam, 1-lam), or 1).

    Returns:
        Scalar ``mean_b(1 - min(DCG/IDCG, IDCG/DCG))`` (float32).
    """
    copies = _split_copies(logits, mixed_logits, mixed_targets)
    batch, num_classes = logits.shape
    conf_raw = F.softmax(logits.float(), dim=1).max(dim=1, keepdim=True).values  # (B, 1)
    conf = (
        F.softmax(mixed_logits.float().view(copies, batch, num_classes), dim=2).max(dim=2).values.t()
    )  # (B, M)
    relevance = mixed_targets.float().view(copies, batch, num_classes).max(dim=2).values.t()  # (B, M)
    # the order is a constant of the loss; stable so that ties keep the copy order (the official sort is not)
    order = torch.argsort(relevance, dim=1, descending=True, stable=True)
    gains = torch.cat([conf_raw, conf.gather(1, order)], dim=1)  # position 1 holds the raw sample
    ideal = torch.cat([torch.ones_like(conf_raw), relevance.gather(1, order)], dim=1)
    discount = torch.log2(torch.arange(2, copies + 3, device=logits.device, dtype=torch.float32))
    dcg = (gains / discount).sum(dim=1)
    idcg = (ideal / discount).sum(dim=1)
    # official: ndcg where idcg > dcg, else its inverse (the smaller ratio, <= 1 from both sides)
    ndcg = torch.where(idcg > dcg, dcg / idcg, idcg / dcg)
    return (1.0 - ndcg).mean()


def draw_copies(generator: torch.Generator, batch_size: int, copies: int, alpha: float):
    """The official draws per copy, in order: lam ~ Beta(alpha, alpha) (1 if alpha <= 0), then a permutation.

    Returns:
        lams: list of M Python floats; perms: list of M (B,) int64 CPU permutations (fixed points allowed).
    """
    lams, perms = [], []
    for _ in range(copies):  # M (1 or 3) copies, never a per-sample loop
        lams.append(float(sample_beta(alpha, 1, generator)[0]) if alpha > 0 else 1.0)
        perms.append(randperm_partner(batch_size, generator))
    return lams, perms


def mix_copies(images: torch.Tensor, targets: torch.Tensor, lams, perms):
    """Official `mixup_process` for each copy, concatenated copy by copy.

    Args:
        images: (B, C, H, W) clean batch.
        targets: (B, K) float32 one-hot targets.
        lams: M floats; perms: M (B,) permutations.

    Returns:
        (M*B, C, H, W) mixed images ``lam_j * x + (1 - lam_j) * x[p_j]`` and (M*B, K) targets mixed alike
        (Python-float lambdas on float32 tensors, the official arithmetic, so ``== 1.0`` decides as there).
    """
    mixed_images = torch.cat([mixup_images(images, perm, lam) for lam, perm in zip(lams, perms, strict=True)])
    mixed_targets = torch.cat(
        [mix_targets(targets, perm, lam) for lam, perm in zip(lams, perms, strict=True)]
    )
    return mixed_images, mixed_targets


class _RankMixup(Method):
    """Clean CE + weight * ranking loss over M mixed copies from a second, separate forward pass."""

    @dataclass
    class Params:
        alpha: float = (
            2.0  # model.mixup_alpha: 2.0 CIFAR, 1.0 Tiny-ImageNet (configs/model/resnet50_mixup.yaml)
        )
        num_mixup: int = 1  # model.num_mixup
        weight: float = 0.1  # loss.alpha in configs/loss/{mrl,mndcg}.yaml

    def __init__(self, params, num_classes, label_smoothing=0.0, task="classification"):
        super().__init__(params, num_classes, label_smoothing, task)
        if task != "classification":
            raise ReproError(
                f"method {self.name!r} ranks class confidences; it needs a classification dataset."
            )
        if params.num_mixup < 1:
            raise ReproError(f"method.num_mixup must be >= 1, got {params.num_mixup}.")
        if params.weight < 0:
            raise ReproError(f"method.weight must be >= 0, got {params.weight}.")

    def rank_loss(self, logits, mixed_logits, mixed_targets) -> torch.Tensor:
        raise NotImplementedError

    def mixed_copies(self, images, labels, generator):
        """The one mixing path of `step` and `mix`: (mixed images (n B, C, H, W), targets (n B, K), lams)."""
        lams, perms = draw_copies(generator, images.shape[0], self.params.num_mixup, self.params.alpha)
        return (*mix_copies(images, smooth_one_hot(labels, self.num_classes), lams, perms), lams)

    def mix(self, images, labels, generator):
        mixed_images, mixed_targets, _ = self.mixed_copies(images, labels, generator)
        return mixed_images, mixed_targets

    def step(self, model, batch, ctx):
        images, labels = batch
        logits = model(images)  # clean pass first, as the official train_epoch
        mixed_images, mixed_targets, lams = self.mixed_copies(images, labels, ctx.generator)
        mixed_logits = model(mixed_images)  # separate call: BatchNorm normalises the mixed batch on its own
        loss_ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        loss_rank = self.rank_loss(logits, mixed_logits, mixed_targets)
        return {
            "loss": loss_ce + self.params.weight * loss_rank,
            "logits": logits,
            "loss_ce": loss_ce.detach(),  # tensors: the trainer sums them on the device (no host sync per step)
            "loss_rank": loss_rank.detach(),
            "lam": sum(lams) / len(lams),
        }


@register_method("mrl")
class MRL(_RankMixup):
    """RankMixup with the mixup-based ranking loss (one mixed copy, margin on maximum logits)."""

    @dataclass
    class Params(_RankMixup.Params):
        num_mixup: int = 1  # must be 1: the official loss cannot broadcast more copies
        margin: float = 2.0  # loss.margin: 2.0 CIFAR (configs/loss/mrl.yaml), 1.0 Tiny-ImageNet
        mask: str = "official_global"  # official_global | per_sample

    def __init__(self, params, num_classes, label_smoothing=0.0, task="classification"):
        super().__init__(params, num_classes, label_smoothing, task)
        if params.num_mixup != 1:
            raise ReproError(
                f"method mrl needs num_mixup: 1, got {params.num_mixup}. MRL compares one mixed copy with its raw "
                "image; the official default num_mixup 3 makes the official loss crash. Use mndcg for 3 copies."
            )
        if params.mask not in MRL_MASKS:
            raise ReproError(f"method.mask must be one of {', '.join(MRL_MASKS)}, got {params.mask!r}.")
        if not math.isfinite(params.margin):
            raise ReproError(f"method.margin must be finite, got {params.margin}.")

    def rank_loss(self, logits, mixed_logits, mixed_targets):
        return mrl_loss(logits, mixed_logits, mixed_targets, self.params.margin, self.params.mask)


@register_method("mndcg")
class MNDCG(_RankMixup):
    """RankMixup with the M-NDCG loss (three mixed copies ranked by their relevance)."""

    @dataclass
    class Params(_RankMixup.Params):
        num_mixup: int = 3  # configs/model/resnet50_mixup.yaml: "3 mndcg"

    def rank_loss(self, logits, mixed_logits, mixed_targets):
        return mndcg_loss(logits, mixed_logits, mixed_targets)
