"""ResizeMix: Mixing Data with Preserved Object Information and True Labels.

Qin, Fang, Zhang, Liu, Wang, Wang; arXiv 2012.11101 (2020), CVMJ 2023. Official code: JayQine/ResizeMix
(commit 45441ff). The default geometry mirrors its `run_apis/trainer.py` mixing branch and
`tools/utils.py:getbox_new` (shared spec resizemix.md §2.6, column "authors' code"):

* one scale ``rate ~ U(0.1, 0.8)`` per batch; the whole batch is shrunk with
  ``F.interpolate(x, scale_factor=rate)`` (nearest; the scale factor, not the output size, sets the
  sampling grid: patch pixel i is source pixel ``min(floor(i * float32(1 / rate)), S - 1)``), so every
  patch is ``floor(H * rate) x floor(W * rate)``;
* partner = a random permutation (fixed points allowed); each image gets its own uniform centre, and its
  box starts at ``clip(c - side // 2)``, ends at ``clip(start + side)`` and is re-started at
  ``clip(end - side)``: shifted inside the image, never clipped, so the whole patch is always pasted;
* label weight ``lam = 1 - patch area / image area`` (one value for the batch), loss
  ``lam * CE(z, y) + (1 - lam) * CE(z, y[perm])`` as one soft-target cross-entropy; every batch is mixed
  (``prob = 1``); an empty patch (``floor(S * rate) = 0``, tiny images only) means no mixing.

``geometry: openmixup`` is OpenMixup's `openmixup/models/augments/resizemix.py` (spec §2.1-2.4): one box
for the batch centred at a uniform pixel with side ``floor(S * tau)`` (unclipped side ``2 * (side // 2)``),
clipped at the border, the whole partner squeezed (nearest, to the clipped box size) into it; ``alpha``
set gives its ``use_alpha`` law (``Beta(alpha, alpha)``, redrawn uniformly outside the scope).

Deviations (papers/resizemix/README.md): draws come from the run's torch generator (the authors use
Python's ``random``, NumPy's and torch's global generators; same laws); the partner is drawn first so a
seed pairs the same images as our Mixup/CutMix; for ``H != W`` the OpenMixup box clips rows with ``H`` and
columns with ``W`` (OpenMixup swaps them); an empty OpenMixup box means no mixing (OpenMixup raises).
Label smoothing (off in every config) goes into the mixed target, as timm does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from common.errors import ReproError
from common.methods import Method, register_method
from common.mixing import (
    Box,
    box_masks,
    mix_targets,
    randperm_partner,
    sample_beta,
    smooth_one_hot,
    soft_target_cross_entropy,
)

GEOMETRIES = ("authors", "openmixup")


def shrunk_hw(image_hw: tuple[int, int], rate: float) -> tuple[int, int]:
    """Size of ``F.interpolate(x, scale_factor=rate)``: ``(floor(H * rate), floor(W * rate))`` (tested)."""
    return int(image_hw[0] * rate), int(image_hw[1] * rate)


def resizemix_boxes(
    patch_hw: tuple[int, int], centers: torch.Tensor, image_hw: tuple[int, int]
) -> torch.Tensor:
    """Paste boxes of the authors' `getbox_new`: centred on each draw, then shifted inside the image.

    Args:
        patch_hw: (h, w) patch size, 0 <= h <= H, 0 <= w <= W.
        centers: (B, 2) integer (row, column) centre draws, each in [0, H) x [0, W).
        image_hw: (H, W).
    Returns:
        (B, 4) int64 boxes (yl, yh, xl, xh), half-open, each exactly h x w and inside the image.
    """
    (h, w), (H, W) = patch_hw, image_hw
    if not (0 <= h <= H and 0 <= w <= W):
        raise ReproError(f"patch {patch_hw} does not fit in an image of {image_hw}; use a rate in (0, 1].")
    centers = torch.as_tensor(centers).long()
    sides = {0: (h, H), 1: (w, W)}
    edges = []
    for axis in (0, 1):
        side, size = sides[axis]
        start = (centers[:, axis] - side // 2).clamp(0, size)
        end = (start + side).clamp(0, size)
        edges += [(end - side).clamp(0, size), end]  # re-started from the end: never clipped
    return torch.stack(edges, dim=1)


def resizemix_images(x: torch.Tensor, perm: torch.Tensor, rate: float, boxes: torch.Tensor) -> torch.Tensor:
    """Paste each image's nearest-shrunk partner into its own box (authors' geometry).

    Args:
        x: (B, C, H, W) images.
        perm: (B,) partner of each row.
        rate: scale factor of the shrink, in (0, 1].
        boxes: (B, 4) (yl, yh, xl, xh) boxes of the shrunk size (from `resizemix_boxes`).
    Returns:
        (B, C, H, W): row b holds ``F.interpolate(x, scale_factor=rate)[perm[b]]`` inside ``boxes[b]`` and
        ``x[b]`` elsewhere; ``x`` itself (not a copy) when the patch is empty.
    """
    B, C, H, W = x.shape
    if not 0.0 < rate <= 1.0:
        raise ReproError(f"the ResizeMix rate must be in (0, 1], got {rate}.")
    h, w = shrunk_hw((H, W), rate)
    boxes = torch.as_tensor(boxes).long()  # checked where it lives (the CPU, from `draw`), then moved
    sizes = torch.stack([boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]], dim=1)
    if not bool((sizes == torch.tensor([h, w], device=boxes.device)).all()):
        raise ReproError(
            f"every box must be {h}x{w} (the shrunk size at rate {rate}); build them with resizemix_boxes."
        )
    boxes = boxes.to(x.device)
    if h == 0 or w == 0:
        return x  # empty patch: no mixing (F.interpolate would raise)
    patch = F.interpolate(x, scale_factor=rate, mode="nearest")[perm.to(x.device)]  # (B, C, h, w)
    # place each patch at its own offset with one gather: pixel (r, c) reads patch (r - yl, c - xl)
    rows = (torch.arange(H, device=x.device).view(1, H) - boxes[:, 0:1]).clamp(0, h - 1)
    cols = (torch.arange(W, device=x.device).view(1, W) - boxes[:, 2:3]).clamp(0, w - 1)
    index = (rows.unsqueeze(2) * w + cols.unsqueeze(1)).view(B, 1, H * W).expand(B, C, H * W)
    canvas = patch.flatten(2).gather(2, index).view(B, C, H, W)
    return torch.where(box_masks(boxes, (H, W), x.device), canvas, x)


def openmixup_box(tau: float, center: tuple[int, int], image_hw: tuple[int, int]) -> tuple[Box, float]:
    """OpenMixup's ResizeMix box: side floor(S * tau) centred at `center`, clipped at the border.

    Args:
        tau: side ratio of the patch.
        center: (row, column) centre pixel.
        image_hw: (H, W).
    Returns:
        ((yl, yh, xl, xh), lam): the clipped box and the target label's weight 1 - box area / (H W).
    """
    (H, W), (cy, cx) = image_hw, center
    cut_h, cut_w = int(H * tau), int(W * tau)
    yl, yh = min(max(cy - cut_h // 2, 0), H), min(max(cy + cut_h // 2, 0), H)
    xl, xh = min(max(cx - cut_w // 2, 0), W), min(max(cx + cut_w // 2, 0), W)
    return (yl, yh, xl, xh), 1.0 - (yh - yl) * (xh - xl) / float(H * W)


def openmixup_images(x: torch.Tensor, perm: torch.Tensor, box: Box) -> torch.Tensor:
    """Squeeze every partner x[perm] (nearest) into the one clipped `box`; `x` itself if the box is empty."""
    yl, yh, xl, xh = box
    if yh <= yl or xh <= xl:
        return x
    out = x.clone()
    out[:, :, yl:yh, xl:xh] = F.interpolate(x[perm.to(x.device)], size=(yh - yl, xh - xl), mode="nearest")
    return out


@dataclass
class ResizeMixDraws:
    """One batch's randomness: partners (B,), the gate, the scale and the centres ((B, 2) or (1, 2))."""

    perm: torch.Tensor
    apply: bool
    rate: float
    centers: torch.Tensor


@register_method("resizemix")
class ResizeMix(Method):
    """Shrink the partner image, paste it, weight its label by the patch's area share."""

    @dataclass
    class Params:
        geometry: str = "authors"  # authors (JayQine/ResizeMix, the reference) | openmixup
        prob: float = 1.0  # authors' code and OpenMixup mix every batch (spec §2.5)
        scope: list = field(default_factory=lambda: [0.1, 0.8])  # (lo, hi) of the side ratio, every config
        alpha: float | None = None  # None: U(lo, hi); a number: OpenMixup's use_alpha law

    def __init__(self, params, num_classes, label_smoothing=0.0, task="classification"):
        super().__init__(params, num_classes, label_smoothing, task)
        if task != "classification":
            raise ReproError("method 'resizemix' mixes class labels; it needs a classification dataset.")
        p = params
        if p.geometry not in GEOMETRIES:
            raise ReproError(f"method.geometry must be one of {', '.join(GEOMETRIES)}, got {p.geometry!r}.")
        if not 0.0 <= p.prob <= 1.0:
            raise ReproError(f"method.prob must be in [0, 1], got {p.prob}.")
        if len(p.scope) != 2 or not 0.0 < float(p.scope[0]) <= float(p.scope[1]) <= 1.0:
            raise ReproError(f"method.scope must be [lo, hi] with 0 < lo <= hi <= 1, got {p.scope}.")
        if p.alpha is not None and p.alpha <= 0:
            raise ReproError(f"method.alpha must be > 0 or null (plain uniform scale), got {p.alpha}.")

    def draw(self, generator: torch.Generator, batch_size: int, image_hw: tuple[int, int]) -> ResizeMixDraws:
        """Draws in a fixed order: partners (first, as our Mixup/CutMix), gate, scale, row and column centres."""
        p, (H, W) = self.params, image_hw
        lo, hi = float(p.scope[0]), float(p.scope[1])
        perm = randperm_partner(batch_size, generator)
        gate, uniform = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        rate = lo + (hi - lo) * uniform
        if p.alpha is not None:  # OpenMixup use_alpha: Beta draw, uniform redraw outside the scope
            t0 = float(sample_beta(p.alpha, 1, generator)[0])
            rate = t0 if lo <= t0 <= hi else rate
        n = batch_size if p.geometry == "authors" else 1  # authors: one centre per image; OpenMixup: one box
        rows = torch.randint(0, H, (n,), generator=generator)
        cols = torch.randint(0, W, (n,), generator=generator)
        return ResizeMixDraws(perm, gate < p.prob, rate, torch.stack([rows, cols], dim=1))

    def apply(self, images: torch.Tensor, labels: torch.Tensor, draws: ResizeMixDraws):
        """Mixed images (B, C, H, W), soft targets (B, K) and the target label's weight `lam` (float)."""
        H, W = images.shape[-2:]
        target = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        if not draws.apply:
            return images, target, 1.0
        if self.params.geometry == "authors":
            h, w = shrunk_hw((H, W), draws.rate)
            boxes = resizemix_boxes((h, w), draws.centers, (H, W))
            x_mix, lam = resizemix_images(images, draws.perm, draws.rate, boxes), 1.0 - h * w / float(H * W)
        else:
            box, lam = openmixup_box(draws.rate, tuple(int(v) for v in draws.centers[0]), (H, W))
            x_mix = openmixup_images(images, draws.perm, box)
        if lam == 1.0:  # empty patch: nothing pasted, the label stays whole
            return images, target, 1.0
        return x_mix, mix_targets(target, draws.perm, lam), lam

    def mixed_with_lam(self, images, labels, generator):
        """The one mixing path of `step` and `mix`: draw, then `apply`. Returns (x_mix, t_mix, lam)."""
        return self.apply(images, labels, self.draw(generator, images.shape[0], images.shape[-2:]))

    def mix(self, images, labels, generator):
        x_mix, t_mix, _ = self.mixed_with_lam(images, labels, generator)
        return x_mix, t_mix

    def step(self, model, batch, ctx):
        x_mix, t_mix, lam = self.mixed_with_lam(*batch, ctx.generator)
        logits = model(x_mix)
        return {"loss": soft_target_cross_entropy(logits, t_mix), "logits": logits, "lam": lam}
