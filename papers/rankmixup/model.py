"""RankMixup's bottleneck ResNet-50s, registered into timm from here (`build_model` imports `papers`).

* `resnet50_cifar`: bottleneck ResNet-50 [3, 4, 6, 3] with the CIFAR stem (3x3 stride-1 conv + BN + ReLU, no
  max-pool), as RankMixup's `resnet50_cifar` (cvlab-yonsei/RankMixup `calibrate/net/resnet_mixup.py`);
* `resnet50_tiny`: the same network for 64x64 Tiny-ImageNet with RankMixup's head: average pooling to 2x2,
  `fc(2048 * 4 -> 200)`.

The stem, stages and head are common's `ResNetCifar` (shared with `resnet18_cifar`); only the block is here.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import DropPath
from torch import nn

from common.models import ResNetCifar, _conv3x3, _resnet_cifar, register_model_once

__all__ = ["MODEL_NAMES", "Bottleneck", "resnet50_cifar", "resnet50_tiny"]

MODEL_NAMES = ("resnet50_cifar", "resnet50_tiny")


class Bottleneck(nn.Module):
    """Post-activation bottleneck: conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1(x4)-BN, add, ReLU.

    As `Bottleneck_Cifar` of cvlab-yonsei/RankMixup `calibrate/net/resnet_mixup.py` (kuangliu's
    `Bottleneck`): the stride sits on the 3x3 conv; a shape change uses a 1x1 conv + BN shortcut.

    Args:
        in_chs: Input channels.
        planes: Bottleneck width; the block outputs `4 * planes` channels.
        stride: Stride of the 3x3 conv and of the projection shortcut.
        drop_path: Stochastic-depth probability of the residual branch.
    """

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        out_chs = self.expansion * planes
        self.conv1 = nn.Conv2d(in_chs, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_chs, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.shortcut = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_chs)
            )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, in_chs, H, W). Returns: (B, 4 * planes, H/stride, W/stride)."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(self.shortcut(x) + self.drop_path(out))


@register_model_once
def resnet50_cifar(
    pretrained: bool = False,
    num_classes: int = 10,
    in_chans: int = 3,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    **kwargs: Any,
) -> ResNetCifar:
    """ResNet-50 with the CIFAR stem (~23.52M parameters for 10 classes), as RankMixup's `resnet50_cifar`
    (cvlab-yonsei/RankMixup `calibrate/net/resnet_mixup.py`); `drop_rate` is head dropout."""
    return _resnet_cifar("resnet50_cifar", Bottleneck, (3, 4, 6, 3), pretrained, kwargs, num_classes, in_chans,
                         drop_rate, drop_path_rate)


@register_model_once
def resnet50_tiny(
    pretrained: bool = False,
    num_classes: int = 200,
    in_chans: int = 3,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    **kwargs: Any,
) -> ResNetCifar:
    """RankMixup's `resnet50_tiny` for 64x64 Tiny-ImageNet: `resnet50_cifar` with a 2x2-pooled head."""
    return _resnet_cifar("resnet50_tiny", Bottleneck, (3, 4, 6, 3), pretrained, kwargs, num_classes, in_chans,
                         drop_rate, drop_path_rate, pool_size=2)
