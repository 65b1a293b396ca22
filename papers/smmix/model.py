"""ViTs with SMMix's two extra forward modes: a token head for the fine-grained loss, and the motivating pass.

SMMix (spec smmix.md §6; official `deit.py` of ChenMnZ/SMMix) changes the backbone in two ways, both here
and nowhere else:

* a second linear head, `token_head` (D -> K, trunc-normal std 0.02 weights, zero bias), that classifies the
  mean of the final-norm patch tokens inside a token mask. `forward(x, source_mask=...)` returns
  ``(z, z_t, z_s)``: class-head logits, token-head logits of the target region (``~source_mask``) and of the
  pasted region (``source_mask``). `forward(x)` returns the class logits alone (evaluation, Mixup steps);
  the token head is never used at evaluation.
* `motivate(x)`: a no-grad pass returning the class logits and the patch attention score
  ``a[b, n] = mean over heads h and patch queries i of A[b, h, i, n]`` with ``A`` the last block's softmax
  attention (before attention dropout) and ``i, n`` patch tokens only (the official
  ``attn[:, :, 1:, 1:].mean(dim=(1, 2))``). The block keeps its fused kernel for its output; temporary hooks
  on its `q_norm` / `k_norm` (timm's `Attention.forward` calls both on ``(B, heads, T, head_dim)``) hand q
  and k to one explicit float32 softmax, computed for this pass only. The caller sets eval mode and
  precision (the method does: eval, outside autocast, as the official `smmix.py`).

Registered in timm's registry (so `timm.create_model` / configs name them), built on timm's
`VisionTransformer` with the same arguments as their plain counterparts:

* `smmix_vit_tiny_patch4_32`, `smmix_vit_small_patch4_32`: `common.models`' CIFAR ViTs (32 px, 4 px patches,
  8 x 8 tokens);
* `smmix_deit_{tiny,small,base}_patch16_224`: timm's DeiT-T/S/B (224 px, 16 px patches, 14 x 14 tokens).

Multi-process runs: on Mixup steps (and for methods that never call it) the token head gets no gradient, so
DDP must be told to expect unused parameters, as the official `main.py` does (`find_unused_parameters=True`):
the paper configs set `train.find_unused_parameters: true`.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from common.errors import ReproError
from common.models import register_model_once

__all__ = ["MODEL_NAMES", "SMMixVisionTransformer", "grid_side"]

MODEL_NAMES = (
    "smmix_vit_tiny_patch4_32",
    "smmix_vit_small_patch4_32",
    "smmix_deit_tiny_patch16_224",
    "smmix_deit_small_patch16_224",
    "smmix_deit_base_patch16_224",
)


class SMMixVisionTransformer(VisionTransformer):
    """timm `VisionTransformer` plus SMMix's token head and motivating pass (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # created after the backbone, so every other weight is initialised as in the plain model
        self.token_head = self._new_token_head(self.num_classes)

    def _new_token_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.embed_dim, num_classes)
        trunc_normal_(head.weight, std=0.02)  # official deit.py `_init_weights`
        nn.init.zeros_(head.bias)
        return head.to(self.head.weight.device) if isinstance(self.head, nn.Linear) else head

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        super().reset_classifier(num_classes, *args, **kwargs)
        self.token_head = self._new_token_head(num_classes)

    @property
    def token_grid(self) -> tuple[int, int]:
        """(rows, cols) of the patch-token grid."""
        return tuple(self.patch_embed.grid_size)

    def forward(self, x: torch.Tensor, source_mask: torch.Tensor | None = None):
        """Class logits, or with a token mask ``(z, z_t, z_s)``.

        Args:
            x: (B, C, H, W) images.
            source_mask: None, or (B, N) bool, True on the patch tokens of the pasted (partner) region.
        Returns:
            (B, K) logits; or z (B, K), z_t (B, K) of the mean patch token over ``~source_mask``, z_s (B, K) of
            the mean patch token over ``source_mask``.
        """
        tokens = self.forward_features(x)  # (B, T, D), after the final norm
        logits = self.forward_head(tokens)
        if source_mask is None:
            return logits
        patches = tokens[:, self.num_prefix_tokens:]  # (B, N, D)
        if source_mask.shape != patches.shape[:2]:
            raise ReproError(f"source_mask must be (B, N) = {tuple(patches.shape[:2])}, got "
                             f"{tuple(source_mask.shape)}.")
        in_source = source_mask.to(patches.dtype).unsqueeze(-1)  # (B, N, 1)
        in_target = 1.0 - in_source
        # masked means, as the official (tokens * mask).sum(1) / mask.sum(1)
        mean_target = (patches * in_target).sum(1) / in_target.sum(1)
        mean_source = (patches * in_source).sum(1) / in_source.sum(1)
        return logits, self.token_head(mean_target), self.token_head(mean_source)

    @torch.no_grad()
    def motivate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The motivating pass: class logits and the last block's patch-to-patch attention received.

        Runs in the module's current mode and precision (the caller chooses: eval, fp32 officially).

        Args:
            x: (B, C, H, W) unmixed images.
        Returns:
            z0 (B, K) logits; a (B, N) float32, ``a[b, n] = mean_{h, i} softmax(q k^T * scale)[b, h, i, n]``
            over heads h and patch queries i, patch keys n (class-token row and column left out, no
            renormalisation), before attention dropout.
        """
        attn = self.blocks[-1].attn
        captured: dict[str, torch.Tensor] = {}

        def keep(slot: str):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                captured[slot] = output.detach()
            return hook

        handles = [attn.q_norm.register_forward_hook(keep("q")), attn.k_norm.register_forward_hook(keep("k"))]
        try:
            logits = self.forward(x)
        finally:
            for handle in handles:
                handle.remove()
        if "q" not in captured or "k" not in captured:
            raise RuntimeError("the last block's q_norm/k_norm hooks did not fire: is this a timm Attention?")
        prefix = self.num_prefix_tokens
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = (captured["q"].float() * attn.scale) @ captured["k"].float().transpose(-2, -1)
            probs = scores.softmax(dim=-1)  # (B, heads, T, T) over all keys, as the official softmax
            received = probs[:, :, prefix:, prefix:].mean(dim=(1, 2))  # (B, N)
        return logits, received


# ----------------------------------------------------------------------------------------------------
# Registered variants


def _build(name: str, pretrained: bool, args: dict[str, Any], kwargs: dict[str, Any]) -> SMMixVisionTransformer:
    if pretrained:
        raise ReproError(f"model {name!r} has no pretrained weights; build it with pretrained=False.")
    # timm's create_model passes pretrained_cfg / pretrained_cfg_overlay / cache_dir, None for a plain name
    extra = {key: value for key, value in kwargs.items() if value is not None}
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        extra.pop(key, None)
    return SMMixVisionTransformer(**{**args, **extra})


# as common.models' vit_*_patch4_32: 32 px, 4 px patches -> 8 x 8 tokens + a class token
_CIFAR = {"img_size": 32, "patch_size": 4, "num_classes": 10, "class_token": True, "global_pool": "token"}
# as timm's deit_*_patch16_224 (timm/models/deit.py uses VisionTransformer with these arguments)
_DEIT = {"img_size": 224, "patch_size": 16, "class_token": True, "global_pool": "token"}


@register_model_once
def smmix_vit_tiny_patch4_32(pretrained: bool = False, **kwargs: Any) -> SMMixVisionTransformer:
    """`vit_tiny_patch4_32` (embed 192, depth 12, 3 heads, 32 px / 4 px patches) with SMMix's token head."""
    return _build("smmix_vit_tiny_patch4_32", pretrained,
                  {**_CIFAR, "embed_dim": 192, "depth": 12, "num_heads": 3}, kwargs)


@register_model_once
def smmix_vit_small_patch4_32(pretrained: bool = False, **kwargs: Any) -> SMMixVisionTransformer:
    """`vit_small_patch4_32` (embed 384, depth 12, 6 heads) with SMMix's token head."""
    return _build("smmix_vit_small_patch4_32", pretrained,
                  {**_CIFAR, "embed_dim": 384, "depth": 12, "num_heads": 6}, kwargs)


@register_model_once
def smmix_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> SMMixVisionTransformer:
    """DeiT-T/16 (embed 192, depth 12, 3 heads) with SMMix's token head (official `vit_deit_tiny_patch16_224`)."""
    return _build("smmix_deit_tiny_patch16_224", pretrained,
                  {**_DEIT, "embed_dim": 192, "depth": 12, "num_heads": 3}, kwargs)


@register_model_once
def smmix_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> SMMixVisionTransformer:
    """DeiT-S/16 (embed 384, depth 12, 6 heads) with SMMix's token head."""
    return _build("smmix_deit_small_patch16_224", pretrained,
                  {**_DEIT, "embed_dim": 384, "depth": 12, "num_heads": 6}, kwargs)


@register_model_once
def smmix_deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> SMMixVisionTransformer:
    """DeiT-B/16 (embed 768, depth 12, 12 heads) with SMMix's token head."""
    return _build("smmix_deit_base_patch16_224", pretrained,
                  {**_DEIT, "embed_dim": 768, "depth": 12, "num_heads": 12}, kwargs)


def grid_side(model: nn.Module) -> int:
    """Side of a square token grid, or a ReproError."""
    rows, cols = tuple(model.patch_embed.grid_size)
    if rows != cols:
        raise ReproError(f"SMMix needs a square token grid, the model has {rows} x {cols}.")
    return int(rows)

