"""SMMix: Self-Motivated Image Mixing for Vision Transformers (Chen, Lin, Lin, Zhang, Chao, Ji; ICCV 2023,
arXiv 2212.12977).

Official code: ChenMnZ/SMMix (a DeiT fork). This step mirrors `SMMix.__call__` + `SMMix.smmix` of its
`smmix.py` and the SMMix branch of `train_one_epoch` in its `engine.py`; the model side (token head,
motivating pass) is papers/smmix/model.py, after its `deit.py`. Shared spec: smmix.md §2.

Per batch (B even; partner of row b is b' = B-1-b, timm's flip):

1. ``u ~ U(0, 1)``; SMMix if ``u < switch_prob`` (0.5), else Mixup. No mix-probability gate, no CutMix.
2. SMMix: window side ``s`` uniform over ``[floor(side * 0.25), ..., floor(side * 0.75)]`` tokens (``side`` =
   the token grid, 14 for DeiT/16 at 224 px, 8 for our 32 px / 4 px ViTs); ``lam = 1 - s^2 / side^2``, the
   share of the image that keeps its own pixels.
   * Motivating pass: the model in **eval** mode, no grad, outside autocast, on the **unmixed** batch, gives
     logits ``z0`` and ``a[b, n]``, the last block's patch-to-patch attention received by patch n, averaged
     over heads and patch queries.
   * Window scores: the sum of ``a[b]`` over every ``s x s`` window of the grid (row-major by top-left).
     Target window of b = the least attended of its own (``argmin``); source window = the most attended of
     its partner's (``argmax`` of ``a[b']``); ties go to the first window.
   * ``x_mix[b]`` = ``x[b]`` with its target window's pixels replaced by the partner's source window,
     token k to token k (same layout, no resizing). ``source_mask[b]`` marks the replaced tokens.
   * Targets (timm label smoothing in the target): ``t = lam ybar + (1 - lam) ybar'``; the token head's
     targets ``ybar`` (target region) and ``ybar'`` (pasted region); consistency target
     ``q = softmax(lam z0 + (1 - lam) z0')`` (logits mixed, then softmaxed; constant).
   * Loss, on the train-mode forward of ``x_mix`` returning ``(z, z_t, z_s)``:
     ``SCE(z, t) + 0.5 (SCE(z_t, ybar) + SCE(z_s, ybar')) + KL(q || softmax(z))`` (KL 'batchmean').
3. Mixup: ``lam ~ Beta(0.8, 0.8)``, ``x_mix = lam x + (1 - lam) x'``, ``L = SCE(z, lam ybar + (1 - lam) ybar')``;
   no motivating pass, no token head.

Deviations (papers/smmix/README.md): all draws come from the run's torch generator (``u``, then ``s``, or the
Mixup lambda) instead of NumPy's global generator and Python's *unseeded* `random` module (same laws, now
reproducible); `motivate_fp32=False` runs the motivating pass under the training autocast instead.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.attention import check_cls_attention, unwrap_model
from common.errors import ReproError
from common.methods import Method, register_method
from common.mixing import flip_partner, mix_targets, mixup_images, sample_beta, smooth_one_hot
from common.mixing import soft_target_cross_entropy as sce
from papers.smmix.model import SMMixVisionTransformer, grid_side

__all__ = [
    "SMMix", "SMMixDraw", "consistency_target", "draw_smmix", "mix_windows", "motivating_pass", "select_windows",
    "smmix_loss", "smmix_targets", "window_scores", "window_sizes", "window_tokens",
]


# ---------------------------------------------------------------------------------------------- draws
def window_sizes(side: int, min_side_ratio: float = 0.25, max_side_ratio: float = 0.75) -> list[int]:
    """Candidate window sides, official ``range(int(side * min), int(side * max) + 1)``: 3..10 for side 14."""
    return list(range(int(side * min_side_ratio), int(side * max_side_ratio) + 1))


@dataclass
class SMMixDraw:
    """One batch's randomness: the branch, the window side ``s`` (tokens; 0 on Mixup) and ``lam``."""

    use_smmix: bool
    window: int
    lam: float


def draw_smmix(generator: torch.Generator, side: int, sizes: list[int], mixup_alpha: float = 0.8,
               switch_prob: float = 0.5) -> SMMixDraw:
    """Official draw order from `generator`: ``u``; then ``s`` uniform over `sizes` (SMMix) or Beta lam (Mixup)."""
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    if u < switch_prob:
        s = sizes[int(torch.randint(len(sizes), (), generator=generator))]
        return SMMixDraw(True, s, (side * side - s * s) / (side * side))  # official `lam` expression
    return SMMixDraw(False, 0, float(sample_beta(mixup_alpha, 1, generator)[0]))


# ------------------------------------------------------------------------------------ window selection
def window_scores(attn: torch.Tensor, side: int, s: int) -> torch.Tensor:
    """Sum of `attn` over every ``s x s`` window. attn: (B, N) -> (B, L), L = (side-s+1)^2, row-major by top-left.

    As the official ``unfold(attn.view(B, 1, side, side), s, stride=1).sum(1)``: a stride-1 sum-pool.
    """
    grid = attn.reshape(-1, 1, side, side)
    return F.unfold(grid, kernel_size=s, stride=1).sum(dim=1)


def window_tokens(index: torch.Tensor, side: int, s: int) -> torch.Tensor:
    """Token ids of windows given by row-major top-left index. index: (B,) -> (B, s*s), row-major inside."""
    per_row = side - s + 1
    top, left = index // per_row, index % per_row
    inside = (torch.arange(s, device=index.device).view(s, 1) * side
              + torch.arange(s, device=index.device).view(1, s)).flatten()
    return (top * side + left).view(-1, 1) + inside.view(1, -1)


def select_windows(attn: torch.Tensor, side: int, s: int, partner: torch.Tensor):
    """Max-min attention region mixing: where each image is overwritten, and with which partner window.

    Args:
        attn: (B, N) patch attention of the unmixed images (motivating pass).
        side: token grid side, N = side^2.
        s: window side in tokens.
        partner: (B,) row whose content is pasted into row b (flip: B-1-b).
    Returns:
        target_tokens (B, s*s): tokens of b's least-attended window (first on ties);
        source_tokens (B, s*s): tokens of the partner's most-attended window, in the same row-major order.
    """
    scores = window_scores(attn, side, s)
    target = scores.argmin(dim=1)  # torch returns the first index among equal minima / maxima
    source = scores.argmax(dim=1)[partner.to(scores.device)]
    return window_tokens(target, side, s), window_tokens(source, side, s)


# -------------------------------------------------------------------------------------------- mixing
def _patchify(x: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, side*side, C*c*c) with c = H // side: one row per token, row-major."""
    B, C, H, _ = x.shape
    c = H // side
    return x.reshape(B, C, side, c, side, c).permute(0, 2, 4, 1, 3, 5).reshape(B, side * side, C * c * c)


def _unpatchify(patches: torch.Tensor, shape: torch.Size, side: int) -> torch.Tensor:
    B, C, H, W = shape
    c = H // side
    return patches.reshape(B, side, side, C, c, c).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def mix_windows(x: torch.Tensor, partner: torch.Tensor, target_tokens: torch.Tensor,
                source_tokens: torch.Tensor, side: int):
    """Paste each partner's source window over each image's target window (pixel copies, no resizing).

    Args:
        x: (B, C, H, W) with H = W divisible by `side`.
        partner: (B,); target_tokens, source_tokens: (B, s*s) token ids from `select_windows`.
    Returns:
        x_mix (B, C, H, W); source_mask (B, N) bool, True on the tokens that now hold the partner's pixels.
    """
    B, _, H, W = x.shape
    if H != W or H % side:
        raise ReproError(f"SMMix needs square images whose side is a multiple of the token grid {side}, got "
                         f"{H} x {W}: set data.image_size to a multiple of {side} (e.g. the model's img_size).")
    patches = _patchify(x, side)  # (B, N, D)
    width = patches.shape[-1]
    source = patches[partner.to(x.device)]
    moved = torch.gather(source, 1, source_tokens.to(x.device).unsqueeze(-1).expand(-1, -1, width))
    mixed = patches.scatter(1, target_tokens.to(x.device).unsqueeze(-1).expand(-1, -1, width), moved)
    source_mask = torch.zeros(B, side * side, dtype=torch.bool, device=x.device)
    source_mask.scatter_(1, target_tokens.to(x.device), True)
    return _unpatchify(mixed, x.shape, side), source_mask


# ------------------------------------------------------------------------------------ targets and loss
def smmix_targets(labels: torch.Tensor, num_classes: int, lam: float, partner: torch.Tensor,
                  smoothing: float = 0.1):
    """t = lam ybar + (1 - lam) ybar[partner] (B, K); region targets ybar (target) and ybar[partner] (pasted)."""
    ybar = smooth_one_hot(labels, num_classes, smoothing)
    y_source = ybar[partner.to(ybar.device)]
    return ybar * lam + y_source * (1.0 - lam), ybar, y_source


def consistency_target(z0: torch.Tensor, lam: float, partner: torch.Tensor) -> torch.Tensor:
    """q = softmax(lam z0 + (1 - lam) z0[partner]): the unmixed logits are mixed, then softmaxed. (B, K), no grad."""
    z0 = z0.detach().float()
    return (lam * z0 + (1.0 - lam) * z0[partner.to(z0.device)]).softmax(dim=-1)


def smmix_loss(z, z_target, z_source, t, y_target, y_source, q, fine_weight=1.0, consistency_weight=1.0):
    """Official engine.py loss: SCE(z, t) + w_f 0.5 (SCE(z_t, y_t) + SCE(z_s, y_s)) + w_c KL(q || softmax(z)).

    KL is PyTorch's KLDivLoss(reduction='batchmean') on (log_softmax(z), q): sum_{b,k} q (log q - log p) / B.
    Returns the total and its three parts (detached).
    """
    loss_cls = sce(z, t)
    loss_fine = 0.5 * (sce(z_target, y_target) + sce(z_source, y_source))
    loss_con = F.kl_div(F.log_softmax(z.float(), dim=-1), q, reduction="batchmean")
    total = loss_cls + fine_weight * loss_fine + consistency_weight * loss_con
    return total, {"loss_cls": loss_cls.detach(), "loss_fine": loss_fine.detach(),
                   "loss_consistency": loss_con.detach()}


# ----------------------------------------------------------------------------------------- motivation
def motivating_pass(model, images: torch.Tensor, fp32: bool = True):
    """Eval-mode, no-grad pass of the unmixed batch: (z0 (B, K), a (B, N)); the model's mode is restored after
    (train mode in training, as the official `motivat_model.train()`).

    ``fp32`` runs it outside the training autocast, as the official code (the mixer is called before the
    `autocast` block in engine.py). Dropout and drop path are off (eval), so it uses no randomness.
    """
    inner = unwrap_model(model)
    precision = torch.autocast(device_type=images.device.type, enabled=False) if fp32 else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), precision:
            z0, attn = inner.motivate(images)
    finally:
        model.train(was_training)
    return z0, attn


# -------------------------------------------------------------------------------------------- method
@register_method("smmix")
class SMMix(Method):
    """SMMix vs Mixup per batch (0.5 / 0.5), with the token-head and consistency losses on SMMix batches.

    Label smoothing lives in the targets (timm; official `mixup_target`), pairing is timm's flip.
    Needs a `SMMixVisionTransformer` (papers/smmix/model.py): e.g. ``model.name: smmix_deit_small_patch16_224``.
    """

    @dataclass
    class Params:
        switch_prob: float = 0.5  # main.py --mixup-switch-prob; P(SMMix), else Mixup
        mixup_alpha: float = 0.8  # main.py --mixup
        min_side_ratio: float = 0.25  # main.py --min_side_ratio
        max_side_ratio: float = 0.75  # main.py --max_side_ratio
        side: int | None = None  # token grid side (--side 14 for DeiT); None: read it from the model
        fine_weight: float = 1.0  # engine.py: loss_cls + loss_fine + loss_con, all weights 1
        consistency_weight: float = 1.0
        motivate_fp32: bool = True  # official: motivating pass outside autocast

    def __init__(self, params, num_classes, label_smoothing=0.0, task="classification"):
        super().__init__(params, num_classes, label_smoothing, task)
        p = self.params
        if task != "classification":
            raise ReproError("method 'smmix' mixes class labels; it needs a classification dataset.")
        if not 0.0 <= p.switch_prob <= 1.0:
            raise ReproError(f"method.switch_prob must be in [0, 1], got {p.switch_prob}.")
        if p.mixup_alpha <= 0:
            raise ReproError(f"method.mixup_alpha must be > 0 (the Mixup branch draws Beta(a, a)), got {p.mixup_alpha}.")
        if not 0.0 < p.min_side_ratio <= p.max_side_ratio < 1.0:
            raise ReproError(f"method.min_side_ratio / max_side_ratio must satisfy 0 < min <= max < 1, got "
                             f"{p.min_side_ratio} / {p.max_side_ratio} (official 0.25 / 0.75).")
        if p.side is not None and p.side < 2:
            raise ReproError(f"method.side must be the token grid side (>= 2) or null, got {p.side}.")
        self.reset_stats()

    # -- model checks
    def _side(self, inner) -> int:
        side = grid_side(inner)
        if self.params.side is not None and self.params.side != side:
            raise ReproError(f"method.side={self.params.side} but the model's token grid is {side} x {side}; the "
                             f"attention map has the grid's shape: set method.side={side} or null.")
        sizes = window_sizes(side, self.params.min_side_ratio, self.params.max_side_ratio)
        if sizes[0] < 1 or sizes[-1] >= side:
            raise ReproError(f"window sides {sizes[0]}..{sizes[-1]} do not fit a {side} x {side} token grid "
                             "(need 1 <= s < side): change method.min_side_ratio / max_side_ratio.")
        return side

    def check_model(self, model) -> None:
        inner = unwrap_model(model)
        if not isinstance(inner, SMMixVisionTransformer):
            raise ReproError(
                f"smmix needs a ViT with SMMix's token head and motivating pass (papers/smmix/model.py), got "
                f"{type(inner).__name__}. Use model.name=smmix_vit_tiny_patch4_32 (CIFAR) or "
                "smmix_deit_{tiny,small,base}_patch16_224 (ImageNet).")
        check_cls_attention(inner, "smmix")  # class token read by the head, timm Attention, no patch dropout
        self._side(inner)

    # -- per-epoch statistics
    def reset_stats(self) -> None:
        self._windows: dict[int, int] = {}
        self._mixup_batches = 0
        self._sums: dict[str, torch.Tensor | float] = {}

    def epoch_stats(self) -> dict | None:
        """Branch counts, window-side histogram and the mean extra losses over this epoch's SMMix batches."""
        n = sum(self._windows.values())
        stats = {"smmix_batches": n, "mixup_batches": self._mixup_batches,
                 "window_counts": {str(k): v for k, v in sorted(self._windows.items())}}
        stats.update({f"mean_{k}": float(v) / n for k, v in self._sums.items()} if n else {})
        self.reset_stats()
        return stats

    # -- the step
    def mix(self, images, labels, generator):
        """Mixed images and targets for figures. No model is given here, so the attention is uniform: windows
        tie and both go to the top-left corner. papers/smmix/figures.py shows a trained model's windows."""
        B, side = images.shape[0], images.shape[-1] // 4  # the 4 px patches of our 32 px ViTs
        side = self.params.side or side
        draw = draw_smmix(generator, side, window_sizes(side, self.params.min_side_ratio, self.params.max_side_ratio),
                          self.params.mixup_alpha, self.params.switch_prob)
        partner = flip_partner(B, images.device)
        if not draw.use_smmix:
            return mixup_images(images, partner, draw.lam), mix_targets(
                smooth_one_hot(labels, self.num_classes, self.label_smoothing), partner, draw.lam)
        uniform = torch.full((B, side * side), 1.0 / (side * side), device=images.device)
        x_mix, _ = mix_windows(images, partner, *select_windows(uniform, side, draw.window, partner), side)
        return x_mix, smmix_targets(labels, self.num_classes, draw.lam, partner, self.label_smoothing)[0]

    def step(self, model, batch, ctx):
        images, labels = batch
        B = images.shape[0]
        if B % 2:
            raise ReproError(f"smmix pairs row b with row B-1-b and needs an even batch, got {B}: use an even "
                             "train.batch_size (the official smmix.py asserts it too).")
        p = self.params
        side = self._side(unwrap_model(model))
        draw = draw_smmix(ctx.generator, side, window_sizes(side, p.min_side_ratio, p.max_side_ratio),
                          p.mixup_alpha, p.switch_prob)
        partner = flip_partner(B, images.device)
        if not draw.use_smmix:  # Mixup: plain per-batch Mixup, logits only
            target = mix_targets(smooth_one_hot(labels, self.num_classes, self.label_smoothing), partner, draw.lam)
            logits = model(mixup_images(images, partner, draw.lam))
            self._mixup_batches += 1
            return {"loss": sce(logits, target), "logits": logits, "lam": draw.lam, "smmix_batch": 0.0,
                    "loss_fine": 0.0, "loss_consistency": 0.0}
        z0, attn = motivating_pass(model, images, fp32=p.motivate_fp32)
        target_tokens, source_tokens = select_windows(attn, side, draw.window, partner)
        x_mix, source_mask = mix_windows(images, partner, target_tokens, source_tokens, side)
        t, y_target, y_source = smmix_targets(labels, self.num_classes, draw.lam, partner, self.label_smoothing)
        q = consistency_target(z0, draw.lam, partner)
        z, z_target, z_source = model(x_mix, source_mask=source_mask)
        loss, parts = smmix_loss(z, z_target, z_source, t, y_target, y_source, q, p.fine_weight,
                                 p.consistency_weight)
        self._windows[draw.window] = self._windows.get(draw.window, 0) + 1
        for key, value in parts.items():  # device tensors: no host sync per step
            self._sums[key] = self._sums.get(key, 0.0) + value
        return {"loss": loss, "logits": z, "lam": draw.lam, "smmix_batch": 1.0,
                "loss_fine": parts["loss_fine"], "loss_consistency": parts["loss_consistency"]}
