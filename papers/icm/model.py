"""ICM's models. The MNIST-family MLP (`imb_cll/models/basemodels.py` `MLP`): 784 -> 500 -> ReLU -> K, PyTorch's
default initialisation; flat images in. CIFAR's ResNet-18 (`imb_cll/models/models.py` `get_resnet18`): torchvision's
ResNet-18 with a 3x3 stride-1 stem (max-pool kept, as official), on flat images reshaped to (C, H, W)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.models import _entry_kwargs, register_model_once


class MLPCLL(nn.Module):
    def __init__(self, in_features: int = 784, hidden_dim: int = 500, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes
        # the official module layout (`layer.0`, `layer.2`), so its state dicts load as they are
        self.layer = nn.Sequential(nn.Linear(in_features, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, in_features) or (B, C, H, W). Returns: (B, num_classes) logits."""
        return self.layer(x.reshape(x.shape[0], -1))


@register_model_once
def mlp_cll(pretrained: bool = False, num_classes: int = 10, in_features: int = 784, hidden_dim: int = 500,
            **kwargs: Any) -> MLPCLL:
    """ICM's MLP 784-500-K."""
    _entry_kwargs("mlp_cll", pretrained, kwargs, ("num_classes", "in_features", "hidden_dim"))
    return MLPCLL(in_features, hidden_dim, num_classes)


class ResNet18CLL(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, image_size: int = 32):
        super().__init__()
        import torchvision

        self.shape = (in_chans, image_size, image_size)
        self.net = torchvision.models.resnet18(num_classes=num_classes)
        self.net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, C*H*W) or (B, C, H, W). Returns: (B, num_classes) logits."""
        return self.net(x.reshape(x.shape[0], *self.shape))


@register_model_once
def resnet18_cll(pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, image_size: int = 32,
                 **kwargs: Any) -> ResNet18CLL:
    """ICM's CIFAR ResNet-18 (official get_resnet18)."""
    _entry_kwargs("resnet18_cll", pretrained, kwargs, ("num_classes", "in_chans", "image_size"))
    return ResNet18CLL(num_classes, in_chans, image_size)
