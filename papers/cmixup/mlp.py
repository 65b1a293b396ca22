"""C-Mixup's tabular regressor, registered into timm from here as `mlp_regression` (`build_model` imports
`papers`): huaxiuyao/C-Mixup `src/models.py`, `Learner`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.models import _entry_kwargs, register_model_once

__all__ = ["MODEL_NAMES", "RegressionMLP", "mlp_regression"]

MODEL_NAMES = ("mlp_regression",)


class RegressionMLP(nn.Module):
    """C-Mixup's tabular regressor: in -> 128 -> 128 -> out with LeakyReLU(0.1).

    Mirrors `Learner` in huaxiuyao/C-Mixup `src/models.py` (blocks `block_1`, `block_2`, then a linear
    head). The official manifold mixup (`Learner.forward_mixup`) mixes the output of `block_1`, so a
    method mixing there runs `forward_head(block_2(mixed))`.

    Args:
        in_features: Input features (5 for Airfoil).
        num_classes: Output dimension (1 for scalar regression); 0 gives the hidden features.
        hidden_dim: Width of both hidden layers.
        drop_rate: Dropout before the head (0 in the official code).
    """

    def __init__(
        self, in_features: int = 5, num_classes: int = 1, hidden_dim: int = 128, drop_rate: float = 0.0
    ):
        super().__init__()
        # slope 0.1, not PyTorch's default 0.01, as the official code
        self.block_1 = nn.Sequential(nn.Linear(in_features, hidden_dim), nn.LeakyReLU(0.1))
        self.block_2 = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LeakyReLU(0.1))
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = hidden_dim
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(hidden_dim, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head; `num_classes=0` leaves the hidden features. `global_pool` is ignored."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, in_features). Returns: (B, hidden_dim) output of the last hidden layer."""
        return self.block_2(self.block_1(x))

    def forward_head(self, h: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Args: h: (B, hidden_dim) hidden features. Returns: (B, num_classes), or h if `pre_logits`."""
        h = self.head_drop(h)
        return h if pre_logits else self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, in_features). Returns: (B, num_classes) predictions."""
        return self.forward_head(self.forward_features(x))


_MLP_ARGS = ("num_classes", "in_features", "hidden_dim", "drop_rate")


@register_model_once
def mlp_regression(
    pretrained: bool = False,
    num_classes: int = 1,
    in_features: int = 5,
    hidden_dim: int = 128,
    drop_rate: float = 0.0,
    **kwargs: Any,
) -> RegressionMLP:
    """C-Mixup regression MLP; `num_classes` is the output dimension (1 = scalar target)."""
    _entry_kwargs("mlp_regression", pretrained, kwargs, _MLP_ARGS)
    return RegressionMLP(in_features, num_classes, hidden_dim, drop_rate)
