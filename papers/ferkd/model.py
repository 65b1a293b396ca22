"""CIFAR ResNet-20 (He et al. 2016, §4.2), the proxy-scale student of spec ferkd.md §3, registered in timm.

Three stages of three basic blocks at widths 16/32/64 on the CIFAR stem (~0.27M parameters for 10 classes), built
from `common.models.ResNetCifar` and its `BasicBlock`; a width change uses the 1x1 projection shortcut (the
paper's option B) rather than option A's zero padding.
"""

from __future__ import annotations

from typing import Any

from common.models import _CNN_ARGS, BasicBlock, ResNetCifar, _entry_kwargs, register_model_once


@register_model_once
def resnet20_cifar(
    pretrained: bool = False,
    num_classes: int = 10,
    in_chans: int = 3,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    **kwargs: Any,
) -> ResNetCifar:
    """ResNet-20 for 32x32 images; `drop_rate` is head dropout."""
    _entry_kwargs("resnet20_cifar", pretrained, kwargs, _CNN_ARGS)
    return ResNetCifar(BasicBlock, (3, 3, 3), (16, 32, 64), num_classes=num_classes, in_chans=in_chans,
                       head_drop_rate=drop_rate, drop_path_rate=drop_path_rate)
