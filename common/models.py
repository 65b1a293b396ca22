"""CIFAR-sized backbones registered in timm's own model registry, and `build_model`.

Importing this module registers, through `timm.models.register_model`, so that
`timm.create_model(name, num_classes=K)` builds them:

* `preact_resnet18_cifar`: PreAct ResNet-18 of the mixup CIFAR code (hongyi-zhang/mixup, which takes
  kuangliu/pytorch-cifar's `PreActBlock`): 3x3 stride-1 stem, no BN/ReLU after the stem, stages
  [2, 2, 2, 2] of widths 64/128/256/512, final BN + ReLU before global average pooling.
* `resnet18_cifar`: post-activation ResNet-18 with the CIFAR stem (3x3 stride-1 conv + BN + ReLU, no
  max-pool), as kuangliu/pytorch-cifar's `ResNet18`.
* `wrn28_10_cifar`: Wide-ResNet-28-10 (Zagoruyko & Komodakis, arXiv:1605.07146; layout of
  xternalz/WideResNet-pytorch): pre-activation wide blocks, widths 16/160/320/640.
* `vit_tiny_patch4_32`, `vit_small_patch4_32`: timm `VisionTransformer`s for 32x32 inputs with 4x4
  patches (64 patch tokens + a class token).
Models only one paper uses live in that paper and register from there with `register_model_once` (imported
by `build_model`): RankMixup's `resnet50_cifar`/`resnet50_tiny` (papers/rankmixup/model.py), ResizeMix's
Shake-Shake (papers/resizemix/model.py), C-Mixup's `mlp_regression` and `lstnet` (papers/cmixup/), SMMix's
token-head ViTs (papers/smmix/model.py). The CNN pieces they share (`ResNetCifar`, `_PooledLinearHead`, the
He init) stay here.

None has pretrained weights, so `pretrained=True` is an error. Each entry point accepts `num_classes`
and, where the architecture has a place for them, `drop_rate` and `drop_path_rate`; any other keyword
is an error unless it is None (timm's `create_model` always passes `pretrained_cfg`,
`pretrained_cfg_overlay` and `cache_dir`, as None for a plain model name).
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.layers import DropPath
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from common.errors import ReproError, closest

__all__ = [
    "MODEL_NAMES",
    "BasicBlock",
    "ModelArgumentError",
    "PreActBlock",
    "PreActResNet",
    "ResNetCifar",
    "build_model",
    "our_models",
    "register_model_once",
]

class ModelArgumentError(ReproError, ValueError):
    """A bad argument to one of our model entry points (a ValueError the trainer reports cleanly)."""


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build any timm model, ours included, failing with the closest names for an unknown one.

    Args:
        name: A name in `timm.list_models()`, e.g. 'preact_resnet18_cifar'.
        num_classes: Output dimension of the classifier (regression outputs for `mlp_regression`).
        **kwargs: Passed to `timm.create_model` (e.g. `drop_path_rate`, `depth`).

    Returns:
        The model, in training mode.

    Raises:
        ReproError: `name` is not a timm model.
    """
    import papers  # noqa: F401  (papers register their own models, e.g. LSTNet, SMMix's ViTs; late: papers import us)

    if not timm.is_model(name):
        hint = closest(name, timm.list_models())
        ours = ", ".join(our_models())
        raise ReproError(
            f"unknown model {name!r}.{hint} Ours (CIFAR/regression): {ours}; any other name must be in "
            "timm.list_models()."
        )
    return timm.create_model(name, num_classes=num_classes, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Entry-point plumbing


_OURS: list[str] = []  # every name registered through register_model_once, this file's and the papers'


def register_model_once(fn):
    """timm's `register_model`, but a clash with a model of another module is an error (timm only warns).
    For this file and the papers' own model files (papers/<paper>/model.py, LSTNet)."""
    name = fn.__name__
    # timm files an entry point under the last part of its module's name ('models' for this file)
    if timm.is_model(name) and name not in timm.list_models(module=fn.__module__.rsplit(".", 1)[-1]):
        raise RuntimeError(f"model name {name!r} is already registered in timm; rename ours.")
    if name not in _OURS:
        _OURS.append(name)
    return register_model(fn)


def our_models() -> list[str]:
    """The names of every model we register (common's and, once `papers` is imported, the papers')."""
    return sorted(_OURS)


def _entry_kwargs(
    name: str, pretrained: bool, extra: dict[str, Any], accepted: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Reject `pretrained=True`, drop None-valued extras, and reject the rest unless `accepted` is None.

    Args:
        name: Registered model name, for the messages.
        pretrained: The `pretrained` flag timm passes to every entry point.
        extra: Keyword arguments the entry point did not name itself.
        accepted: The entry point's own keywords, listed in the error; None passes extras through.

    Returns:
        `extra` without its None values.
    """
    if pretrained:
        raise ModelArgumentError(
            f"model {name!r} has no pretrained weights (our CIFAR/regression backbones are trained from "
            "scratch); build it with pretrained=False."
        )
    # create_model passes pretrained_cfg, pretrained_cfg_overlay and cache_dir as None for a plain name
    extra = {key: value for key, value in extra.items() if value is not None}
    if extra and accepted is not None:
        raise ModelArgumentError(
            f"model {name!r} got unexpected keyword argument(s) {sorted(extra)}; "
            f"it accepts {', '.join(accepted)}."
        )
    return extra


_CNN_ARGS = ("num_classes", "in_chans", "drop_rate", "drop_path_rate")


def _conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)


def _he_init(model: nn.Module) -> None:
    """He (fan-out) init of every conv and zero linear biases, as the official WRN and Shake-Shake code."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)


def _drop_path_rates(drop_path_rate: float, depths: tuple[int, ...]) -> list[float]:
    """Stochastic-depth rate per block, rising linearly from 0 to `drop_path_rate` (timm's rule)."""
    num_blocks = sum(depths)
    return [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]


class _PooledLinearHead(nn.Module):
    """timm-style classifier API shared by the CNNs: global average pool, dropout, linear."""

    def _init_head(self, num_features: int, num_classes: int, drop_rate: float) -> None:
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = num_features
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier; `num_classes=0` leaves pooled features. Only average pooling exists."""
        if global_pool not in (None, "avg"):
            raise ModelArgumentError(f"global_pool={global_pool!r} is not supported; use 'avg'.")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool and classify.

        Args:
            x: (B, C, H, W) output of `forward_features`.
            pre_logits: Return the pooled (B, C) features instead of logits.

        Returns:
            (B, num_classes) logits, or (B, C) pooled features.
        """
        # a global mean equals the official avg_pool2d(out, 4) on the 4x4 map of a 32x32 input
        x = self.head_drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, in_chans, H, W). Returns: (B, num_classes) logits."""
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------------
# Pre-activation ResNets: PreAct ResNet-18 and Wide-ResNet-28-10 share one block


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3, plus a shortcut.

    As kuangliu's `PreActBlock` and xternalz's WRN `BasicBlock`, the 1x1 projection shortcut (used when
    the shape changes) reads the *pre-activated* input, while the identity shortcut reads the raw input.

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        stride: Stride of the first conv and of the projection shortcut.
        drop_rate: Dropout between the two convs (the WRN paper's dropout).
        drop_path: Stochastic-depth probability of the residual branch.
    """

    def __init__(
        self, in_chs: int, out_chs: int, stride: int = 1, drop_rate: float = 0.0, drop_path: float = 0.0
    ):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = _conv3x3(in_chs, out_chs, stride)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.drop = nn.Dropout(drop_rate)
        self.conv2 = _conv3x3(out_chs, out_chs)
        self.shortcut = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, in_chs, H, W). Returns: (B, out_chs, H/stride, W/stride)."""
        out = torch.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.drop(torch.relu(self.bn2(out))))
        return shortcut + self.drop_path(out)


class PreActResNet(_PooledLinearHead):
    """Pre-activation ResNet for small images: 3x3 stem conv, `PreActBlock` stages, final BN + ReLU.

    Manifold-mixing methods can run `stem`, then `stages[0]`, ..., `stages[-1]`, then `final_act` by hand.

    Args:
        depths: Blocks per stage.
        widths: Output channels per stage.
        stem_width: Channels of the stem conv.
        num_classes: Classifier outputs; 0 gives pooled features.
        in_chans: Input channels.
        block_drop_rate: Dropout inside each block (WRN).
        head_drop_rate: Dropout before the classifier (timm's `drop_rate` for the ResNets).
        drop_path_rate: Stochastic depth of the last block (linear from 0 over blocks).
        kaiming_init: He (fan_out) init of the convs and zero linear bias, as the official WRN code;
            otherwise PyTorch's default init, as the mixup/kuangliu code.
    """

    def __init__(
        self,
        depths: tuple[int, ...],
        widths: tuple[int, ...],
        stem_width: int,
        num_classes: int = 10,
        in_chans: int = 3,
        block_drop_rate: float = 0.0,
        head_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        kaiming_init: bool = False,
    ):
        super().__init__()
        # no BN/ReLU here: the first block pre-activates its input
        self.stem = _conv3x3(in_chans, stem_width)
        path_rates = iter(_drop_path_rates(drop_path_rate, depths))
        stages, in_chs = [], stem_width
        for stage_idx, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            blocks = []
            for block_idx in range(depth):
                stride = 2 if stage_idx > 0 and block_idx == 0 else 1
                blocks.append(PreActBlock(in_chs, width, stride, block_drop_rate, next(path_rates)))
                in_chs = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        # the residual stream is never normalised inside the blocks, so normalise it once before pooling
        self.final_act = nn.Sequential(nn.BatchNorm2d(in_chs), nn.ReLU(inplace=True))
        self._init_head(in_chs, num_classes, head_drop_rate)
        if kaiming_init:
            _he_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, in_chans, H, W). Returns: (B, num_features, H/8, W/8) after BN + ReLU."""
        return self.final_act(self.stages(self.stem(x)))


@register_model_once
def preact_resnet18_cifar(
    pretrained: bool = False,
    num_classes: int = 10,
    in_chans: int = 3,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    width: int = 64,
    **kwargs: Any,
) -> PreActResNet:
    """PreAct ResNet-18 of the mixup CIFAR experiments (~11.17M parameters for 10 classes).

    `drop_rate` is dropout before the classifier (timm's meaning); both rates default to 0 as in the
    official code, which has neither. `width` is the first stage's channels (64 in the paper); smaller
    widths (8, 16) give the same architecture cheap enough for CPU smoke runs.
    """
    _entry_kwargs("preact_resnet18_cifar", pretrained, kwargs, _CNN_ARGS + ("width",))
    return PreActResNet(
        depths=(2, 2, 2, 2),
        widths=(width, 2 * width, 4 * width, 8 * width),
        stem_width=width,
        num_classes=num_classes,
        in_chans=in_chans,
        head_drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
    )


@register_model_once
def wrn28_10_cifar(
    pretrained: bool = False,
    num_classes: int = 10,
    in_chans: int = 3,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    **kwargs: Any,
) -> PreActResNet:
    """Wide-ResNet-28-10 (~36.5M parameters for 10 classes): (28 - 4) / 6 = 4 blocks per stage.

    `drop_rate` is the WRN paper's dropout between the two convs of every block (0.3 in the paper's
    dropout runs), not a classifier dropout.
    """
    _entry_kwargs("wrn28_10_cifar", pretrained, kwargs, _CNN_ARGS)
    return PreActResNet(
        depths=(4, 4, 4),
        widths=(160, 320, 640),
        stem_width=16,
        num_classes=num_classes,
        in_chans=in_chans,
        block_drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
        kaiming_init=True,
    )


# ----------------------------------------------------------------------------------------------------
# Post-activation ResNet-18 with the CIFAR stem


class BasicBlock(nn.Module):
    """Post-activation basic block: conv3x3-BN-ReLU-conv3x3-BN, add shortcut, ReLU.

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        stride: Stride of the first conv and of the projection shortcut.
        drop_path: Stochastic-depth probability of the residual branch.
    """

    expansion = 1  # output channels per unit of stage width (Bottleneck: 4)

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        self.conv1 = _conv3x3(in_chs, out_chs, stride)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = _conv3x3(out_chs, out_chs)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.shortcut = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_chs)
            )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, in_chs, H, W). Returns: (B, out_chs, H/stride, W/stride), non-negative."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(self.shortcut(x) + self.drop_path(out))


class ResNetCifar(_PooledLinearHead):
    """ResNet with the CIFAR stem: 3x3 stride-1 conv + BN + ReLU and no max-pool, so stage 1 sees 32x32.

    One class for the basic-block ResNet-18 (kuangliu/pytorch-cifar) and the bottleneck ResNet-50 of
    RankMixup (`ResNet_Cifar`: PyTorch's default init, no zero-init of the last BN, no dropout by default,
    `avg_pool2d(4)` over the 4x4 map of a 32x32 input = our global mean; its `temp`, always 1.0, is left out).

    Args:
        block: `BasicBlock` or `Bottleneck`; a stage of width w outputs `block.expansion * w` channels.
        depths: Blocks per stage.
        widths: Width per stage (stage 1 width is also the stem width).
        num_classes: Classifier outputs; 0 gives pooled features.
        in_chans: Input channels.
        head_drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth of the last block (linear from 0 over blocks).
        pool_size: side of the pooled map the classifier sees: 1 = global average (CIFAR), 2 = the 2x2
            adaptive average of RankMixup's Tiny-ImageNet ResNets (features flattened channel-major).
    """

    def __init__(
        self,
        block: type[nn.Module],
        depths: tuple[int, ...],
        widths: tuple[int, ...],
        num_classes: int = 10,
        in_chans: int = 3,
        head_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        pool_size: int = 1,
    ):
        super().__init__()
        self.pool_size = pool_size
        self.stem = nn.Sequential(
            _conv3x3(in_chans, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        path_rates = iter(_drop_path_rates(drop_path_rate, depths))
        stages, in_chs = [], widths[0]
        for stage_idx, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            blocks = []
            for block_idx in range(depth):
                stride = 2 if stage_idx > 0 and block_idx == 0 else 1
                blocks.append(block(in_chs, width, stride, next(path_rates)))
                in_chs = block.expansion * width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self._init_head(in_chs * pool_size**2, num_classes, head_drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, in_chans, H, W). Returns: (B, C, H/8, W/8)."""
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool (globally, or to `pool_size` x `pool_size`), flatten, classify; see `_PooledLinearHead`."""
        if self.pool_size == 1:
            return super().forward_head(x, pre_logits)
        x = self.head_drop(nn.functional.adaptive_avg_pool2d(x, self.pool_size).flatten(1))
        return x if pre_logits else self.fc(x)


def _resnet_cifar(name: str, block, depths, pretrained, kwargs, num_classes, in_chans, drop_rate,
                  drop_path_rate, pool_size: int = 1) -> ResNetCifar:
    _entry_kwargs(name, pretrained, kwargs, _CNN_ARGS)
    return ResNetCifar(block, depths, (64, 128, 256, 512), num_classes=num_classes, in_chans=in_chans,
                       head_drop_rate=drop_rate, drop_path_rate=drop_path_rate, pool_size=pool_size)


@register_model_once
def resnet18_cifar(
    pretrained: bool = False,
    num_classes: int = 10,
    in_chans: int = 3,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    **kwargs: Any,
) -> ResNetCifar:
    """ResNet-18 with the CIFAR stem (~11.17M parameters for 10 classes); `drop_rate` is head dropout."""
    return _resnet_cifar("resnet18_cifar", BasicBlock, (2, 2, 2, 2), pretrained, kwargs, num_classes, in_chans,
                         drop_rate, drop_path_rate)


# ----------------------------------------------------------------------------------------------------
# Vision Transformers for 32x32 inputs


def _vit_32(
    name: str, pretrained: bool, defaults: dict[str, Any], kwargs: dict[str, Any]
) -> VisionTransformer:
    kwargs = _entry_kwargs(name, pretrained, kwargs)
    # 32 / 4 = 8, so 8 x 8 = 64 patch tokens plus the class token; any VisionTransformer kwarg overrides
    args = {"img_size": 32, "patch_size": 4, "num_classes": 10, "class_token": True, "global_pool": "token"}
    args.update(defaults)
    args.update(kwargs)
    return VisionTransformer(**args)


@register_model_once
def vit_tiny_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Tiny (embed 192, depth 12, 3 heads) on 4x4 patches of a 32x32 image."""
    return _vit_32("vit_tiny_patch4_32", pretrained, {"embed_dim": 192, "depth": 12, "num_heads": 3}, kwargs)


@register_model_once
def vit_small_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Small (embed 384, depth 12, 6 heads) on 4x4 patches of a 32x32 image."""
    return _vit_32("vit_small_patch4_32", pretrained, {"embed_dim": 384, "depth": 12, "num_heads": 6}, kwargs)


# the models this file registers; papers register their own (MODEL_NAMES in papers/<paper>/model.py)
MODEL_NAMES = (
    "preact_resnet18_cifar",
    "resnet18_cifar",
    "wrn28_10_cifar",
    "vit_tiny_patch4_32",
    "vit_small_patch4_32",
)
