"""TransMix: Attend to Mix for Vision Transformers (Chen, Sun, He, Torr, Yuille, Bai; CVPR 2022, arXiv 2111.09833).

Official code: Beckschen/TransMix (`transmix.py` class `Mixup_transmix`, `train.py`, and its patched timm
0.5.4 `vision_transformer.py` that returns the last block's attention). This step mirrors
`Mixup_transmix.__call__` + `transmix_label`:

* images are mixed exactly as timm's per-batch Mixup/CutMix (flip partners, switch probability, label
  smoothing in the target, box lambda corrected to the pasted area);
* on CutMix batches only, each sample's partner weight becomes
  ``w = 0.5 * area share + 0.5 * attention share``, where the attention share is the fraction of the class
  token's last-block attention (head-averaged, from the same forward pass, detached) that falls on
  patches whose top-left pixel lies in the box (nearest downsampling of the pixel mask, as the official
  ``nn.Upsample``);
* the loss is soft-target cross-entropy against ``(1 - w) * ybar + w * ybar[flip]``.

Deviations (see papers/transmix/README.md): randomness comes from the run's torch generator instead of
NumPy's global one (same law); the box uses the official ``cy + cut // 2`` upper edge (timm <= 0.9, as in the
official code base), not timm 1.0's ``(cut + 1) // 2``; the headline configs use ``switch_prob = 0.8`` (what
the authors intended and the released DeiT-B config runs) although the released DeiT-S config silently ran
with 0.5 (a hyphenated YAML key its loader ignored); the ``deits_release_switch05`` variant reproduces that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.attention import capture_cls_attention, check_cls_attention
from common.errors import ReproError
from common.methods import MixCutMix, register_method
from common.mixing import cutmix_box, flip_partner, smooth_one_hot, soft_target_cross_entropy

__all__ = ["TransMix", "cutmix_box", "token_box_mask", "transmix_target", "transmix_weights"]

# (TransMix weight - area weight) histogram, logged per epoch for the paper's weight-shift figure
DELTA_EDGES = torch.linspace(-0.5, 0.5, 41)


def token_box_mask(box, image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> torch.Tensor:
    """(gh * gw,) float mask of tokens "in the box": nearest downsampling of the pixel mask.

    Token (i, j) is in iff pixel (floor(i * H / gh), floor(j * W / gw)) is in the box — the top-left pixel
    of its patch when H / gh is an integer — exactly what `nn.Upsample(size=g)` does in the official code.
    """
    H, W = image_hw
    yl, yh, xl, xh = (int(v) for v in box)
    pixels = torch.zeros(1, 1, H, W)
    pixels[..., yl:yh, xl:xh] = 1.0
    return F.interpolate(pixels, size=grid_hw, mode="nearest").flatten()


def transmix_weights(attn: torch.Tensor, box, image_hw: tuple[int, int]):
    """Per-sample partner weights of TransMix for one batch-wide CutMix box.

    Args:
        attn: (B, N) class-token attention over the N patch tokens (any positive scale; it is normalised).
        box: (yl, yh, xl, xh) in pixels.
        image_hw: (H, W).
    Returns:
        w (B,), lam_area (float, the box's share of the image), lam_attn (B,), all partner shares.
    """
    N = attn.shape[1]
    g = math.isqrt(N)
    if g * g != N:
        raise ReproError(f"TransMix expects a square token grid, got {N} patch tokens.")
    yl, yh, xl, xh = (int(v) for v in box)
    lam_area = (yh - yl) * (xh - xl) / float(image_hw[0] * image_hw[1])
    mask = token_box_mask(box, image_hw, (g, g)).to(attn.device, torch.float32)
    attn = attn.float()
    w_in = attn @ mask
    w_out = attn @ (1.0 - mask)
    lam_attn = w_in / (w_in + w_out).clamp_min(torch.finfo(torch.float32).tiny)
    return 0.5 * lam_area + 0.5 * lam_attn, lam_area, lam_attn


def transmix_target(labels: torch.Tensor, num_classes: int, attn: torch.Tensor, box, image_hw, smoothing=0.1):
    """TransMix target for a CutMix batch whose box content came from the flipped partner (row B-1-b).

    Args:
        labels: (B,) integer labels of the un-mixed batch.
        attn: (B, N) class-token attention of the mixed images.
        box: (yl, yh, xl, xh) pixel box, the same for every sample.
    Returns:
        (B, K) soft targets ``(1 - w) * ybar + w * ybar[flip]`` with ``ybar`` the smoothed one-hot labels.
    """
    partner = flip_partner(labels.shape[0], labels.device)
    ybar = smooth_one_hot(labels, num_classes, smoothing)
    w, _, _ = transmix_weights(attn, box, image_hw)
    w = w.to(ybar.device).view(-1, 1)
    return (1.0 - w) * ybar + w * ybar[partner]


@register_method("transmix")
class TransMix(MixCutMix):
    """timm Mixup/CutMix whose CutMix label weights come half from the box area, half from attention."""

    @dataclass
    class Params(MixCutMix.Params):
        mixup_alpha: float = 0.8  # released configs: mixup 0.8
        cutmix_alpha: float = 1.0  # cutmix 1.0
        switch_prob: float = 0.8  # intended value (DeiT-B config); the DeiT-S config effectively ran 0.5
        prob: float = 1.0

    def __init__(self, params, num_classes, label_smoothing=0.0, task="classification"):
        super().__init__(params, num_classes, label_smoothing, task)
        if params.mode != "batch" or params.partner != "flip":
            raise ReproError("transmix follows the official per-batch flip pairing: use mode=batch, partner=flip.")
        self.reset_stats()

    def check_model(self, model) -> None:
        check_cls_attention(model, self.name)

    def reset_stats(self) -> None:
        self._hist = torch.zeros(len(DELTA_EDGES) - 1, dtype=torch.float64)
        self._n, self._sum, self._cutmix_batches = 0, 0.0, 0

    def epoch_stats(self) -> dict | None:
        """Distribution of (TransMix weight - area weight) over this epoch's CutMix samples; then reset."""
        stats = {"delta_hist": self._hist.tolist(), "delta_edges": DELTA_EDGES.tolist(), "n": self._n,
                 "delta_mean": float(self._sum) / self._n if self._n else None, "cutmix_batches": self._cutmix_batches}
        self.reset_stats()
        return stats

    def step(self, model, batch, ctx):
        images, _ = batch
        H, W = images.shape[-2:]
        mixed = self.mixed_batch(*batch, ctx.generator)  # the preset's own mixing: draws, boxes, area targets
        draws, target = mixed.draws, mixed.clean_target
        if not (bool(draws.use_cutmix[0]) and float(draws.lam[0]) < 1.0):  # CPU draws: no device sync
            logits = model(mixed.images)  # Mixup (or un-mixed) batch: plain timm target, no attention needed
            return {"loss": soft_target_cross_entropy(logits, mixed.target), "logits": logits,
                    "lam": float(mixed.lam.mean())}
        with capture_cls_attention(model) as grab:  # same forward pass; only the last block is read
            logits = model(mixed.images)
        box = tuple(int(v) for v in mixed.boxes[0])
        w, lam_area, _ = transmix_weights(grab.attention, box, (H, W))
        w = w.to(target.device).view(-1, 1)
        t_mix = (1.0 - w) * target + w * target[flip_partner(images.shape[0], target.device)]
        # statistics stay on the model's device (no host sync per step); epoch_stats reads them once per epoch.
        # bucketize + bincount counts as torch.histogram(bins=DELTA_EDGES) does (last bin closed), on any device
        delta = (w.view(-1) - lam_area).detach().double()
        edges = DELTA_EDGES.to(delta.device, torch.float64)
        bins = (torch.bucketize(delta.clamp(-0.5, 0.5), edges, right=True) - 1).clamp(0, len(edges) - 2)
        self._hist = self._hist.to(delta.device) + torch.bincount(bins, minlength=len(edges) - 1).double()
        self._n += delta.numel()
        self._sum = self._sum + delta.sum()
        self._cutmix_batches += 1
        loss = soft_target_cross_entropy(logits, t_mix)
        return {"loss": loss, "logits": logits, "lam": 1.0 - w.detach().mean(),
                "transmix_minus_area": delta.mean()}
