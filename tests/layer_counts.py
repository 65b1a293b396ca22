"""Parameter counts recomputed layer by layer, shared by the model tests (tests/common, tests/papers)."""

from torch import nn


def conv(in_chs: int, out_chs: int, kernel: int) -> int:
    return in_chs * out_chs * kernel * kernel  # all convs are bias-free


def bn(chs: int) -> int:
    return 2 * chs


def linear(in_features: int, out_features: int) -> int:
    return in_features * out_features + out_features


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
