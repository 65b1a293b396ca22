"""Mixing primitives shared by every method: partners, lambda draws, CutMix boxes, pasting, targets, loss.

Pure tensor functions: randomness comes in as arguments (a `MixDraws` record), so each function can be
checked element for element against a plain loop or against timm. `draw_mix` makes those draws from a
`torch.Generator`; the draws are O(B) scalars and are made on the CPU so that a seed gives the same
batch on any device, while the mixing itself runs on the images' device, vectorised.

Vocabulary (see shared spec mixup_cutmix.md): row b is the *target image*, row `partner[b]` its
*partner*; the box content comes from the partner; `lam` is the weight of the un-permuted label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import ReproError

Box = tuple[int, int, int, int]  # (yl, yh, xl, xh), half-open, in pixels


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot targets with timm's label smoothing (off = eps/K, on = 1 - eps + eps/K).

    Args:
        labels: (B,) integer labels.
    Returns:
        (B, K) float32 targets whose rows sum to 1.
    """
    off = smoothing / num_classes
    target = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=torch.float32)
    return target.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


def flip_partner(batch_size: int, device=None) -> torch.Tensor:
    """timm's pairing: row b is mixed with row B-1-b. Needs an even batch (the middle row would pair itself)."""
    if batch_size % 2:
        raise ReproError(
            f"flip pairing needs an even batch size, got {batch_size}; use an even train.batch_size "
            "(the loader drops the last incomplete batch)."
        )
    return torch.arange(batch_size - 1, -1, -1, device=device)


def randperm_partner(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Official Mixup/CutMix pairing: a random permutation (fixed points allowed)."""
    return torch.randperm(batch_size, generator=generator)


def sample_beta(alpha: float, size: int, generator: torch.Generator) -> np.ndarray:
    """Draw `size` values from Beta(alpha, alpha), seeded from `generator` (float64).

    torch's Beta sampler takes no generator, so a NumPy generator is seeded from one draw of it.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return np.random.default_rng(seed).beta(alpha, alpha, size=size)


def cutmix_box(lam: float, cy: int, cx: int, image_hw: tuple[int, int]) -> tuple[Box, float]:
    """The CutMix box of timm's `rand_bbox` + `cutmix_bbox_and_lam` (and of the official CutMix code).

    Args:
        lam: the drawn mixing coefficient; the box side is floor(size * sqrt(1 - lam)).
        cy, cx: the box centre (row, column) in pixels.
        image_hw: (H, W).
    Returns:
        ((yl, yh, xl, xh), lam_c): the box clipped to the image, and the corrected lambda
        1 - box area / image area (the weight of the un-permuted image).
    """
    H, W = image_hw
    ratio = float(np.sqrt(1.0 - lam))
    cut_h, cut_w = int(H * ratio), int(W * ratio)
    # the unclipped side is 2 * (cut // 2): one pixel short of cut when it is odd, as in timm
    yl, yh = int(np.clip(cy - cut_h // 2, 0, H)), int(np.clip(cy + cut_h // 2, 0, H))
    xl, xh = int(np.clip(cx - cut_w // 2, 0, W)), int(np.clip(cx + cut_w // 2, 0, W))
    lam_c = 1.0 - (yh - yl) * (xh - xl) / float(H * W)
    return (yl, yh, xl, xh), lam_c


def cutmix_boxes(lam: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, image_hw: tuple[int, int]):
    """Vectorised `cutmix_box` for one box per sample.

    Args:
        lam, cy, cx: (B,) tensors.
    Returns:
        boxes (B, 4) int64 as (yl, yh, xl, xh); lam_c (B,) float64.
    """
    H, W = image_hw
    ratio = torch.sqrt(1.0 - lam.double())
    cut_h, cut_w = (H * ratio).long(), (W * ratio).long()  # truncation, like int()
    yl = (cy - cut_h // 2).clamp(0, H)
    yh = (cy + cut_h // 2).clamp(0, H)
    xl = (cx - cut_w // 2).clamp(0, W)
    xh = (cx + cut_w // 2).clamp(0, W)
    lam_c = 1.0 - ((yh - yl) * (xh - xl)).double() / float(H * W)
    return torch.stack([yl, yh, xl, xh], dim=1), lam_c


def box_masks(boxes: torch.Tensor, image_hw: tuple[int, int], device=None) -> torch.Tensor:
    """Boolean masks (B, 1, H, W), True inside each sample's box."""
    H, W = image_hw
    boxes = boxes.to(device)
    rows = torch.arange(H, device=device).view(1, H, 1)
    cols = torch.arange(W, device=device).view(1, 1, W)
    yl, yh, xl, xh = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    return ((rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)).unsqueeze(1)


def paste_box(x: torch.Tensor, partner: torch.Tensor, box: Box) -> torch.Tensor:
    """CutMix with one box for the batch: row b gets x[partner[b]] inside `box`, x[b] elsewhere."""
    yl, yh, xl, xh = box
    out = x.clone()
    out[:, :, yl:yh, xl:xh] = x[partner.to(x.device)][:, :, yl:yh, xl:xh]
    return out


def mixup_images(x: torch.Tensor, partner: torch.Tensor, lam) -> torch.Tensor:
    """lam * x + (1 - lam) * x[partner]; `lam` a float or a (B,) tensor (per-sample coefficients)."""
    x_partner = x[partner.to(x.device)]
    if isinstance(lam, torch.Tensor):
        lam = lam.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return x * lam + x_partner * (1.0 - lam)


def mix_targets(target: torch.Tensor, partner: torch.Tensor, lam) -> torch.Tensor:
    """lam * target + (1 - lam) * target[partner]; rows keep summing to 1."""
    if isinstance(lam, torch.Tensor):
        lam = lam.to(target.device, target.dtype).view(-1, 1)
    return target * lam + target[partner.to(target.device)] * (1.0 - lam)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean_b( -sum_k target[b,k] * log_softmax(logits[b])_k ), as timm's SoftTargetCrossEntropy."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


@dataclass
class MixDraws:
    """Every random value one Mixup/CutMix step uses (timm's law), for one batch.

    Per-sample fields are (B,) tensors; in 'batch' mode all rows hold the same values.
    `lam` is the drawn coefficient (1 where mixing is off); `use_cutmix` chooses the branch per row;
    `cy`, `cx` are box centres (ignored on Mixup rows).
    """

    partner: torch.Tensor
    lam: torch.Tensor
    use_cutmix: torch.Tensor
    cy: torch.Tensor
    cx: torch.Tensor
    mode: str = "batch"


def draw_mix(
    generator: torch.Generator,
    batch_size: int,
    image_hw: tuple[int, int],
    mixup_alpha: float,
    cutmix_alpha: float,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    mode: str = "batch",
    partner: str = "flip",
) -> MixDraws:
    """Draw one batch's mixing randomness with timm `Mixup`'s law (`_params_per_batch` / `_per_elem`).

    'batch': one gate, branch, lambda and box for the batch; 'elem': one per sample; 'pair': one per
    flip pair (rows b and B-1-b share them). Partners: 'flip' (timm) or 'randperm' (official code).
    """
    if mode not in ("batch", "pair", "elem"):
        raise ReproError(f"mix mode must be batch, pair or elem, got {mode!r}.")
    if partner not in ("flip", "randperm"):
        raise ReproError(f"partner must be 'flip' or 'randperm', got {partner!r}.")
    if mode == "pair" and partner != "flip":
        raise ReproError("mode 'pair' mixes each flip pair both ways; it needs partner 'flip'.")
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ReproError("mixing needs mixup_alpha > 0 or cutmix_alpha > 0 (use method 'erm' for neither).")
    H, W = image_hw
    pairing = flip_partner(batch_size) if partner == "flip" else randperm_partner(batch_size, generator)
    n = {"batch": 1, "pair": batch_size // 2, "elem": batch_size}[mode]
    u = torch.rand(2, n, generator=generator, dtype=torch.float64)
    apply, switch = u[0] < prob, u[1] < switch_prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = switch
    else:
        use_cutmix = torch.full((n,), cutmix_alpha > 0)
    lam_cut = torch.from_numpy(sample_beta(cutmix_alpha, n, generator)) if cutmix_alpha > 0 else None
    lam_mix = torch.from_numpy(sample_beta(mixup_alpha, n, generator)) if mixup_alpha > 0 else None
    if lam_cut is None:
        lam = lam_mix
    elif lam_mix is None:
        lam = lam_cut
    else:
        lam = torch.where(use_cutmix, lam_cut, lam_mix)
    lam = torch.where(apply, lam, torch.ones_like(lam))
    cy = torch.randint(0, H, (n,), generator=generator)
    cx = torch.randint(0, W, (n,), generator=generator)
    if mode == "pair":  # the second half mirrors the first: row B-1-b shares row b's draws
        lam, use_cutmix, cy, cx = (torch.cat([v, v.flip(0)]) for v in (lam, use_cutmix, cy, cx))
    elif mode == "batch":
        lam, use_cutmix, cy, cx = (v.expand(batch_size) for v in (lam, use_cutmix, cy, cx))
    return MixDraws(partner=pairing, lam=lam, use_cutmix=use_cutmix, cy=cy, cx=cx, mode=mode)


def apply_mix(x: torch.Tensor, target: torch.Tensor, draws: MixDraws, correct_lam: bool = True):
    """Mix a batch and its soft targets with given draws (timm's `_mix_batch` / `_mix_elem` / `_mix_pair`).

    Args:
        x: (B, C, H, W) images.
        target: (B, K) soft (possibly smoothed) one-hot targets.
        draws: the batch's `MixDraws`.
        correct_lam: use 1 - box area / image area as the CutMix label weight (timm and the official code).
    Returns:
        x_mix (B, C, H, W), target_mix (B, K), lam (B,) float64: the final label weight of row b's own label,
        and boxes (B, 4) (zero-size on Mixup or un-mixed rows).
    """
    H, W = x.shape[-2], x.shape[-1]
    lam = draws.lam.double().clone()
    boxes, lam_box = cutmix_boxes(draws.lam, draws.cy, draws.cx, (H, W))
    is_cut = draws.use_cutmix & (draws.lam < 1.0)
    is_mix = ~draws.use_cutmix & (draws.lam < 1.0)
    boxes = torch.where(is_cut.view(-1, 1), boxes, torch.zeros_like(boxes))
    if correct_lam:
        lam = torch.where(is_cut, lam_box, lam)
    if draws.mode == "batch":
        # one branch and one box for the whole batch: a slice copy or one fused blend
        if not bool(draws.lam[0] < 1.0):
            return x, target, lam, boxes
        if bool(is_cut[0]):
            x_mix = paste_box(x, draws.partner, tuple(int(v) for v in boxes[0]))
        else:
            x_mix = mixup_images(x, draws.partner, float(draws.lam[0]))
        return x_mix, mix_targets(target, draws.partner, float(lam[0])), lam, boxes
    # per-sample: blend weights (1 on CutMix rows) then paste boxes (empty on Mixup rows)
    x_partner = x[draws.partner.to(x.device)]
    blend = torch.where(is_mix, draws.lam.double(), torch.ones_like(lam)).to(x.device, x.dtype).view(-1, 1, 1, 1)
    x_mix = x * blend + x_partner * (1.0 - blend)
    x_mix = torch.where(is_mix.to(x.device).view(-1, 1, 1, 1), x_mix, x)
    x_mix = torch.where(box_masks(boxes, (H, W), x.device), x_partner, x_mix)
    return x_mix, mix_targets(target, draws.partner, lam), lam, boxes
