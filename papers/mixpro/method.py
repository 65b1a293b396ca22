"""MixPro: Data Augmentation with MaskMix and Progressive Attention Labeling for Vision Transformer
(Zhao, Huang, Hu, Zhang, Liu; ICLR 2023, arXiv 2304.12043).

Official code: fistyee/MixPro (a Swin-Transformer-codebase fork on timm 0.4.12). This step mirrors
`main.py` `train_one_epoch` (branch switch, PAL label, loss) and `utils.py` `MaskMix` (masks, area label):

* every step draws a random permutation `pi` of the batch, then `u ~ U(0, 1)`; `u < maskmix_prob` (0.5) picks
  MaskMix, otherwise the batch goes through timm's per-batch Mixup/CutMix (flip partners, switch 0.5);
* MaskMix: `r ~ Beta(alpha, alpha)` once per batch, `n = ceil(G^2 r)` of the `G x G` cells of side
  `mask_size` px kept from the original image, chosen independently per sample, the rest from `x[pi]`;
  area label `lam_area = n / G^2` with label smoothing in the target;
* PAL (`pal: true`): `lam = a * lam_attn + (1 - a) * lam_area` per sample, `lam_attn` the share of the class
  token's last-block attention (same forward, detached) on the original image's tokens, and the progressive
  factor `a = cos(area target, softmax(logits))`, **not detached** (official; `detach_pal_factor` gives the
  OpenMixup variant); loss `lam * CE(z, y) + (1 - lam) * CE(z, y[pi])`, hard labels, no smoothing;
* MaskMix without PAL (`pal: false`, what every released config runs): soft-target CE against the area target.

Deviations (papers/mixpro/README.md): randomness comes from the run's torch generator instead of NumPy's
global one (same law; the cell subsets are argsort-of-uniform permutations drawn for all samples at once); the masks
are built on the images' device by broadcasting instead of a per-sample NumPy loop; the mask-size rule of spec
§2.7 is enforced (`allow_ragged_mask` lifts the `img % mask_size` part only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.attention import capture_cls_attention, check_cls_attention, unwrap_model
from common.errors import ReproError
from common.methods import MixCutMix, register_method
from common.mixing import MixDraws, apply_mix, sample_beta, smooth_one_hot, soft_target_cross_entropy

__all__ = ["MaskMixArea", "MaskMixDraws", "MixPro", "area_target", "draw_maskmix", "mask_geometry",
           "maskmix_images", "pal_loss", "pal_weights", "pixel_mask", "token_mask"]


def mask_geometry(img_size: int, mask_size: int, patch_size: int, allow_ragged: bool = False):
    """Check the mask-size rule of spec §2.7; return (G cells per side, f tokens per cell side, P tokens per side).

    Every ViT patch must lie in one cell (`mask_size % patch_size == 0`) and the cells must tile the image
    (`img_size % mask_size == 0`), else `lam_area` (counted in cells) is not the true pixel share. The second
    condition may be lifted with `allow_ragged` (OpenMixup's 64-px cells on 224-px images): the last row and
    column of cells are then cut.
    """
    where = f"mask_size={mask_size}, patch_size={patch_size}, img_size={img_size}"
    if min(img_size, mask_size, patch_size) < 1:
        raise ReproError(f"MaskMix needs positive sizes, got {where}.")
    if img_size % patch_size:
        raise ReproError(f"MaskMix: img_size must be a multiple of patch_size ({where}).")
    if mask_size % patch_size:
        raise ReproError(
            f"MaskMix: mask_size must be a multiple of patch_size so that every patch lies in one cell "
            f"({where}); use e.g. mask_size={patch_size * max(1, round(mask_size / patch_size))} (spec mixpro.md §2.7)."
        )
    if img_size % mask_size and not allow_ragged:
        ok = [s for s in range(patch_size, img_size + 1, patch_size) if img_size % s == 0]
        raise ReproError(
            f"MaskMix: img_size is not a multiple of mask_size ({where}): the last cells would be cut and "
            f"lam_area would not equal the pixel share (spec mixpro.md §2.7). Admissible mask sizes: {ok}; or set "
            "method.allow_ragged_mask=true to accept ragged cells (OpenMixup's default)."
        )
    return math.ceil(img_size / mask_size), mask_size // patch_size, img_size // patch_size


@dataclass
class MaskMixDraws:
    """Every random value of a step, in draw order: `perm` (B,), `u`, then either MaskMix's `ratio` and
    `cells` (B, G, G) bool (True keeps the original image; the same count in every row) or timm's `mix`."""

    perm: torch.Tensor
    u: float
    maskmix: bool
    ratio: float | None = None
    cells: torch.Tensor | None = None
    mix: MixDraws | None = None

    @property
    def lam_area(self) -> float:
        """Share of cells kept from the original image, n / G^2 (the same for every sample)."""
        return float(self.cells[0].sum()) / self.cells[0].numel()


def draw_maskmix(generator: torch.Generator, batch_size: int, grid: int, alpha: float):
    """MaskMix draws: r ~ Beta(alpha, alpha) once, then per sample a uniform random subset of n = ceil(G^2 r)
    cells.

    Returns:
        r and cells (B, G, G) bool on the CPU, row-major cell index i * G + j.
    """
    r = float(sample_beta(alpha, 1, generator)[0])
    count = math.ceil(grid * grid * r)  # official: int(np.ceil(token_count * ratio)), one count for all samples
    # each row of an argsort of i.i.d. uniforms is a uniform random permutation: all samples in one call
    order = torch.rand(batch_size, grid * grid, generator=generator).argsort(dim=1)
    cells = torch.zeros(batch_size, grid * grid, dtype=torch.bool).scatter_(1, order[:, :count], True)
    return r, cells.view(batch_size, grid, grid)


def pixel_mask(cells: torch.Tensor, mask_size: int, img_size: int) -> torch.Tensor:
    """(B, G, G) cell mask -> (B, 1, H, H) pixel mask, each cell an `mask_size` square block, cropped to H."""
    idx = torch.arange(img_size, device=cells.device) // mask_size
    return cells[:, idx.view(-1, 1), idx.view(1, -1)].unsqueeze(1)


def token_mask(cells: torch.Tensor, tokens_per_cell: int, tokens_per_side: int) -> torch.Tensor:
    """(B, G, G) cell mask -> (B, N) float token mask (cells upsampled by f, cropped to P x P, row-major)."""
    idx = torch.arange(tokens_per_side, device=cells.device) // tokens_per_cell
    return cells[:, idx.view(-1, 1), idx.view(1, -1)].flatten(1).float()


def maskmix_images(x: torch.Tensor, perm: torch.Tensor, cells: torch.Tensor, mask_size: int) -> torch.Tensor:
    """x_mix[b] = x[b] where the pixel mask is 1, x[perm[b]] elsewhere (bit-exact copies, no blending).

    Args:
        x: (B, C, H, H) images. perm: (B,) partner indices. cells: (B, G, G) bool.
    """
    mask = pixel_mask(cells.to(x.device), mask_size, x.shape[-1])
    return torch.where(mask, x, x[perm.to(x.device)])


def area_target(labels, perm, lam_area: float, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B, K) MaskMix target lam_area * ybar + (1 - lam_area) * ybar[perm], ybar timm-smoothed one-hot."""
    ybar = smooth_one_hot(labels, num_classes, smoothing)
    return lam_area * ybar + (1.0 - lam_area) * ybar[perm.to(labels.device)]


def pal_weights(attn, tokens, target, logits, lam_area: float, detach_factor: bool = False):
    """Progressive Attention Labeling: the per-sample weight of the original image's label (spec §2.5).

    Args:
        attn: (B, N) class-token attention over the patch tokens (detached; any positive scale).
        tokens: (B, N) token mask, 1 on tokens of the original image.
        target: (B, K) smoothed area target. logits: (B, K).
        lam_area: the cell share n / G^2.
        detach_factor: stop the gradient through the progressive factor (OpenMixup); official code: no.
    Returns:
        lam (B,), lam_attn (B,), factor (B,) = cos(target, softmax(logits)); lam carries the factor's grad.
    """
    attn = attn.float()
    lam_attn = (tokens * attn).sum(1) / attn.sum(1).clamp_min(torch.finfo(torch.float32).tiny)
    factor = F.cosine_similarity(target.float(), logits.float().softmax(dim=1), dim=1, eps=1e-8)
    if detach_factor:
        factor = factor.detach()
    return factor * lam_attn + (1.0 - factor) * lam_area, lam_attn, factor


def pal_loss(logits: torch.Tensor, labels: torch.Tensor, partner_labels: torch.Tensor, lam: torch.Tensor):
    """mean_b [lam_b CE(z_b, y_b) + (1 - lam_b) CE(z_b, y'_b)], hard-label CE (official `criterion_att`)."""
    ce_own = F.cross_entropy(logits.float(), labels, reduction="none")
    ce_partner = F.cross_entropy(logits.float(), partner_labels, reduction="none")
    return (lam * ce_own + (1.0 - lam) * ce_partner).mean()


@register_method("mixpro")
class MixPro(MixCutMix):
    """MaskMix (prob 0.5) + PAL, else timm Mixup/CutMix; `pal: false` is the released configs' MaskMix."""

    @dataclass
    class Params(MixCutMix.Params):
        mixup_alpha: float = 0.8  # config.py AUG.MIXUP
        cutmix_alpha: float = 1.0  # AUG.CUTMIX
        switch_prob: float = 0.5  # AUG.MIXUP_SWITCH_PROB
        prob: float = 1.0  # AUG.MIXUP_PROB
        maskmix_prob: float = 0.5  # AUG.MASKMIX_PROB
        maskmix_alpha: float = 1.0  # AUG.MASKMIX_ALPHA (configs: alpha1)
        mask_size: int = 56  # MODEL.MASK_PATCH_SIZE in the released DeiT configs
        patch_size: int = 14  # MODEL.PATCH_SIZE: the DeiT configs use 14-px patches (spec §2.7)
        pal: bool = True  # AUG.PAL_ATTN: the paper's method; every released config has it False
        detach_pal_factor: bool = False  # official: not detached; true = OpenMixup's variant
        allow_ragged_mask: bool = False  # accept img_size % mask_size != 0 (spec §2.7)

    def __init__(self, params, num_classes, label_smoothing=0.0, task="classification"):
        super().__init__(params, num_classes, label_smoothing, task)
        p = self.params
        if p.mode != "batch" or p.partner != "flip":
            raise ReproError("mixpro's Mixup/CutMix branch is timm's per-batch flip pairing: use mode=batch, "
                             "partner=flip.")
        if not 0.0 <= p.maskmix_prob <= 1.0:
            raise ReproError(f"method.maskmix_prob must be in [0, 1], got {p.maskmix_prob}.")
        if p.maskmix_alpha <= 0:
            raise ReproError(f"method.maskmix_alpha must be > 0 (Beta(alpha, alpha)), got {p.maskmix_alpha}.")
        if min(p.mask_size, p.patch_size) < 1 or p.mask_size % p.patch_size:  # img_size: checked per step
            raise ReproError(f"method.mask_size={p.mask_size} must be a positive multiple of method.patch_size="
                             f"{p.patch_size} so that every ViT patch lies in one MaskMix cell (spec mixpro.md "
                             "§2.7).")
        self.reset_stats()

    def check_model(self, model) -> None:
        inner = unwrap_model(model)
        embed = getattr(inner, "patch_embed", None)
        if embed is not None and hasattr(embed, "patch_size"):
            size = embed.patch_size
            size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
            if size != (self.params.patch_size,) * 2:
                raise ReproError(f"{self.name}: method.patch_size={self.params.patch_size} but the model's "
                                 f"patches are {size}; set method.patch_size to the model's (or "
                                 "model.kwargs.patch_size).")
        if self.params.pal:
            check_cls_attention(model, f"{self.name} (pal: true)")

    def reset_stats(self) -> None:
        self._stats = {"maskmix_batches": 0, "batches": 0, "pal_samples": 0, "factor_sum": 0.0,
                       "attn_minus_area_sum": 0.0, "lam_minus_area_abs_sum": 0.0}

    def epoch_stats(self) -> dict | None:
        """MaskMix batch count and, with PAL, epoch means of the progressive factor and label shifts."""
        s, n = self._stats, self._stats["pal_samples"]
        out = {"maskmix_batches": s["maskmix_batches"], "batches": s["batches"], "pal_samples": n}
        for key in ("factor", "attn_minus_area", "lam_minus_area_abs"):
            out[f"{key}_mean"] = float(s[f"{key}_sum"]) / n if n else None
        self.reset_stats()
        return out

    def draw_step(self, generator: torch.Generator, batch_size: int, img_size: int) -> MaskMixDraws:
        """All of one step's randomness in the official order: randperm, rand, then the branch's own draws."""
        p = self.params
        grid, _, _ = mask_geometry(img_size, p.mask_size, p.patch_size, p.allow_ragged_mask)
        perm = torch.randperm(batch_size, generator=generator)  # drawn every step (official main.py)
        u = float(torch.rand(1, generator=generator, dtype=torch.float64))
        if u < p.maskmix_prob:
            ratio, cells = draw_maskmix(generator, batch_size, grid, p.maskmix_alpha)
            return MaskMixDraws(perm, u, True, ratio=ratio, cells=cells)
        return MaskMixDraws(perm, u, False, mix=self.draw(generator, batch_size, (img_size, img_size)))

    def apply(self, images, labels, draws: MaskMixDraws):
        """Mixed images, soft targets and the own label's area weight for given draws: the MaskMix area target
        (smoothing included), or timm's Mixup/CutMix target (flip partner, corrected box lambda)."""
        if draws.maskmix:
            x_mix = maskmix_images(images, draws.perm, draws.cells, self.params.mask_size)
            lam = draws.lam_area
            return x_mix, area_target(labels, draws.perm, lam, self.num_classes, self.label_smoothing), lam
        target = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        x_mix, t_mix, lam, _ = apply_mix(images, target, draws.mix, correct_lam=self.params.correct_lam)
        return x_mix, t_mix, float(lam[0])

    def _draws(self, images, generator) -> MaskMixDraws:
        B, _, H, W = images.shape
        if H != W:
            raise ReproError(f"{self.name}: MaskMix expects square images, got {H}x{W}.")
        if B % 2 and self.params.maskmix_prob < 1.0:
            raise ReproError(f"{self.name}: the Mixup/CutMix branch pairs b with B-1-b and needs an even "
                             f"batch, got {B}; use an even train.batch_size.")
        return self.draw_step(generator, B, H)

    def mix(self, images, labels, generator):
        x_mix, target, _ = self.apply(images, labels, self._draws(images, generator))
        return x_mix, target

    def step(self, model, batch, ctx):
        images, labels = batch
        draws = self._draws(images, ctx.generator)
        x_mix, target, lam = self.apply(images, labels, draws)
        self._stats["batches"] += 1
        if not draws.maskmix:  # timm Mixup/CutMix batch: no attention needed
            logits = model(x_mix)
            loss = soft_target_cross_entropy(logits, target)
            return {"loss": loss, "logits": logits, "lam": lam, "maskmix": 0.0}
        self._stats["maskmix_batches"] += 1
        if not self.params.pal:  # released configs: soft-target CE against the area target
            logits = model(x_mix)
            loss = soft_target_cross_entropy(logits, target)
            return {"loss": loss, "logits": logits, "lam": lam, "maskmix": 1.0}
        with capture_cls_attention(model, f"{self.name} (pal: true)") as grab:  # same forward, last block
            logits = model(x_mix)
        attn = grab.attention
        _, f, P = mask_geometry(images.shape[-1], self.params.mask_size, self.params.patch_size,
                                self.params.allow_ragged_mask)
        if attn.shape[1] != P * P:
            raise ReproError(f"{self.name}: the model has {attn.shape[1]} patch tokens, MaskMix expects "
                             f"{P * P} (img {images.shape[-1]} / patch_size {self.params.patch_size}).")
        tokens = token_mask(draws.cells.to(attn.device), f, P)
        detach = self.params.detach_pal_factor
        pal_lam, lam_attn, factor = pal_weights(attn, tokens, target, logits, lam, detach)
        loss = pal_loss(logits, labels, labels[draws.perm.to(labels.device)], pal_lam)
        s = self._stats  # device tensors: no host sync per step; read once per epoch
        s["pal_samples"] += pal_lam.numel()
        s["factor_sum"] = s["factor_sum"] + factor.detach().sum()
        s["attn_minus_area_sum"] = s["attn_minus_area_sum"] + (lam_attn - lam).sum()
        s["lam_minus_area_abs_sum"] = s["lam_minus_area_abs_sum"] + (pal_lam.detach() - lam).abs().sum()
        return {"loss": loss, "logits": logits, "lam": pal_lam.detach().mean(), "maskmix": 1.0}


@register_method("maskmix")
class MaskMixArea(MixPro):
    """The released configs (PAL_ATTN False): MaskMix with area labels (prob 0.5), else timm Mixup/CutMix."""

    @dataclass
    class Params(MixPro.Params):
        pal: bool = False
