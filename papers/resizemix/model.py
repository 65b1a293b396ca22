"""Shake-Shake 26 2x96d (Gastaldi, arXiv:1705.07485), the ResizeMix paper's second CIFAR model, registered
into timm from here as `shake_shake26_2x96d_cifar` (`build_model` imports `papers`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.models import (
    ModelArgumentError,
    _conv3x3,
    _entry_kwargs,
    _he_init,
    _PooledLinearHead,
    register_model_once,
)

__all__ = ["MODEL_NAMES", "ShakeBlock", "ShakeShakeCifar", "shake_shake26_2x96d_cifar"]

MODEL_NAMES = ("shake_shake26_2x96d_cifar",)


class _ShakeCombine(torch.autograd.Function):
    """alpha * a + (1 - alpha) * b forward, beta / (1 - beta) gradients backward ("Shake-Shake")."""

    @staticmethod
    def forward(ctx, a, b, alpha, beta):
        ctx.save_for_backward(beta)
        return alpha * a + (1 - alpha) * b

    @staticmethod
    def backward(ctx, grad):
        (beta,) = ctx.saved_tensors
        return beta * grad, (1 - beta) * grad, None, None


class _ShakeShortcut(nn.Module):
    """Downsampling shortcut of the official Lua code: ReLU, two strided 1x1 paths (the second shifted by one
    pixel), concatenated, BN."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(in_chs, out_chs // 2, kernel_size=1, bias=False)
        self.conv2 = nn.Conv2d(in_chs, out_chs // 2, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(x)
        y1 = self.conv1(torch.nn.functional.avg_pool2d(x, 1, self.stride))
        shifted = torch.nn.functional.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        y2 = self.conv2(torch.nn.functional.avg_pool2d(shifted, 1, self.stride))
        return self.bn(torch.cat([y1, y2], dim=1))


class ShakeBlock(nn.Module):
    """Two residual branches (ReLU-conv3x3-BN-ReLU-conv3x3-BN) mixed per image by random alpha (forward) and
    beta (backward) while training ("Shake-Shake-Image"), averaged at evaluation."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(), _conv3x3(in_chs, out_chs, stride), nn.BatchNorm2d(out_chs),
                nn.ReLU(inplace=True), _conv3x3(out_chs, out_chs), nn.BatchNorm2d(out_chs),
            )
            for _ in range(2)
        )
        same = stride == 1 and in_chs == out_chs
        self.shortcut = nn.Identity() if same else _ShakeShortcut(in_chs, out_chs, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = (branch(x) for branch in self.branches)
        if self.training:  # torch's global generator, seeded per epoch by the trainer
            alpha = torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=a.dtype)
            beta = torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=a.dtype)
            mixed = _ShakeCombine.apply(a, b, alpha, beta)
        else:
            mixed = 0.5 * (a + b)
        return mixed + self.shortcut(x)


class ShakeShakeCifar(_PooledLinearHead):
    """Shake-Shake-26 for CIFAR: 3x3 stem (16) + BN + ReLU, three stages of `(depth - 2) / 6` blocks of widths
    w, 2w, 4w (strides 1, 2, 2), ReLU, global average pool, linear."""

    def __init__(self, depth: int = 26, width: int = 96, num_classes: int = 10, in_chans: int = 3,
                 head_drop_rate: float = 0.0):
        super().__init__()
        if (depth - 2) % 6:
            raise ModelArgumentError(f"Shake-Shake depth must be 6n + 2, got {depth}.")
        self.stem = nn.Sequential(_conv3x3(in_chans, 16), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        blocks, in_chs = [], 16
        for stage, out_chs in enumerate((width, 2 * width, 4 * width)):
            for i in range((depth - 2) // 6):
                blocks.append(ShakeBlock(in_chs, out_chs, 2 if stage > 0 and i == 0 else 1))
                in_chs = out_chs
        self.stages = nn.Sequential(*blocks)
        self._init_head(in_chs, num_classes, head_drop_rate)
        _he_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, in_chans, H, W). Returns: (B, 4 * width, H/4, W/4) after the final ReLU."""
        return torch.relu(self.stages(self.stem(x)))


@register_model_once
def shake_shake26_2x96d_cifar(
    pretrained: bool = False,
    num_classes: int = 10,
    in_chans: int = 3,
    drop_rate: float = 0.0,
    **kwargs: Any,
) -> ShakeShakeCifar:
    """Shake-Shake 26 2x96d (~26.2M parameters for 10 classes), the ResizeMix paper's second CIFAR model;
    `drop_rate` is head dropout (0, as in the paper)."""
    _entry_kwargs("shake_shake26_2x96d_cifar", pretrained, kwargs, ("num_classes", "in_chans", "drop_rate"))
    return ShakeShakeCifar(26, 96, num_classes=num_classes, in_chans=in_chans, head_drop_rate=drop_rate)
