"""C-Mixup's RCF-MNIST regressor, registered into timm from here as `resnet18_rcf` (`build_model` imports
`papers`): huaxiuyao/C-Mixup `src/models.py`, `Learner_RCF_MNIST`.

torchvision's ResNet-18 (ImageNet weights in the official code, `models.resnet18(pretrained=True)`) without its
pooling and classifier as the feature extractor, then `AdaptiveAvgPool2d(1)` and `Linear(512, 1)`. The 28x28
images go in at their size (no resizing), so layer4's map is 1x1. `forward_mixup` mixes the feature extractor's
maps (before pooling): here `block_1` is that extractor, `block_2` the identity, and `forward_head` the pooling
and the linear layer, so `method.py`'s manifold path equals `forward_mixup`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from common.errors import ReproError
from common.models import _entry_kwargs, register_model_once

__all__ = ["RCFResNet18", "resnet18_rcf"]

IMAGENET_WEIGHTS = ResNet18_Weights.IMAGENET1K_V1  # what `models.resnet18(pretrained=True)` loads


def imagenet_state_dict(weights: str | None) -> dict | None:
    """The torchvision ResNet-18 state dict to start from: None (random init), 'imagenet' (torchvision's
    IMAGENET1K_V1, `pretrained=True`; downloaded once into `$TORCH_HOME/hub/checkpoints/`) or a file path."""
    if weights is None or weights == "none":
        return None
    if weights == "imagenet":
        cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(IMAGENET_WEIGHTS.url)
        try:
            return torch.hub.load_state_dict_from_url(IMAGENET_WEIGHTS.url, progress=False, map_location="cpu",
                                                      weights_only=True)
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            raise ReproError(f"cannot get torchvision's ImageNet ResNet-18 weights ({err}); put "
                             f"{os.path.basename(IMAGENET_WEIGHTS.url)} ({IMAGENET_WEIGHTS.url}) at {cache}, or "
                             "set model.kwargs.weights to a local state-dict file (or none).") from err
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ReproError(f"model.kwargs.weights={weights!r} is neither 'imagenet', 'none' nor an existing file.")
    return torch.load(path, map_location="cpu", weights_only=True)


class RCFResNet18(nn.Module):
    """`Learner_RCF_MNIST`: ResNet-18 trunk (`block_1`), global average pool and a linear head.

    Args:
        num_classes: output dimension (1: the rotation label).
        weights: 'imagenet', 'none' (None) or a path to a torchvision ResNet-18 state dict (its `fc` is dropped).
    """

    def __init__(self, num_classes: int = 1, weights: str | None = None):
        super().__init__()
        trunk = resnet18()
        state = imagenet_state_dict(weights)
        if state is not None:
            trunk.load_state_dict(state)  # strict: every key of torchvision's ResNet-18
        self.num_features = self.head_hidden_size = trunk.fc.in_features
        self.block_1 = nn.Sequential(*list(trunk.children())[:-2])  # conv1 ... layer4, as `feature_extractor`
        self.block_2 = nn.Identity()  # forward_mixup mixes right before the pooling
        self.global_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)  # fresh, PyTorch's default init, as `self.fc`

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, 3, H, W). Returns: (B, 512, H/32, W/32) feature maps (1x1 for 28x28 inputs)."""
        return self.block_2(self.block_1(x))

    def forward_head(self, h: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Args: h: (B, 512, h, w) feature maps. Returns: (B, num_classes), or the pooled (B, 512)."""
        h = self.global_pool(h).flatten(1)
        return h if pre_logits else self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model_once
def resnet18_rcf(pretrained: bool = False, num_classes: int = 1, weights: str | None = None,
                 **kwargs: Any) -> RCFResNet18:
    """C-Mixup's RCF-MNIST ResNet-18 (`weights: imagenet` for the official ImageNet start, `none` for random)."""
    if pretrained:  # timm's flag would suggest timm's own weights; the official start is torchvision's
        raise ReproError("model 'resnet18_rcf' takes its ImageNet start as model.kwargs.weights=imagenet, not "
                         "pretrained=True.")
    _entry_kwargs("resnet18_rcf", False, kwargs, ("num_classes", "weights"))
    return RCFResNet18(num_classes, weights)
