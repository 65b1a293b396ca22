"""The official MLP of ICM's MNIST-family runs (`imb_cll/models/basemodels.py` `MLP`): 784 -> 500 -> ReLU -> K,
PyTorch's default initialisation; flat images in (a (B, 1, 28, 28) batch is flattened)."""

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
