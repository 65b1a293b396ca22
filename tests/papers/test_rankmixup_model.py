"""RankMixup's bottleneck ResNet-50s (papers/rankmixup/model.py): counts recomputed layer by layer, the 2x2 head."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ReproError
from common.models import build_model
from papers.rankmixup import model as models
from papers.rankmixup.model import MODEL_NAMES
from tests.layer_counts import bn as _bn
from tests.layer_counts import conv as _conv
from tests.layer_counts import linear as _linear
from tests.layer_counts import num_params as _num_params


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_registered_by_building_and_no_pretrained_weights(name):
    assert isinstance(build_model(name, num_classes=3), nn.Module)  # build_model imports papers
    with pytest.raises(ReproError, match="no pretrained weights.*pretrained=False"):
        timm.create_model(name, pretrained=True)


def _bottleneck_resnet_count(planes: list[int], depths: list[int], num_classes: int) -> int:
    """Stem conv + BN; per block 1x1, 3x3, 1x1 (x4) convs each with BN (+ 1x1 conv + BN shortcut); fc."""
    total, in_chs = _conv(3, planes[0], 3) + _bn(planes[0]), planes[0]
    for stage, (width, depth) in enumerate(zip(planes, depths, strict=True)):
        for block in range(depth):
            stride = 2 if stage > 0 and block == 0 else 1
            total += _conv(in_chs, width, 1) + _bn(width) + _conv(width, width, 3) + _bn(width)
            total += _conv(width, 4 * width, 1) + _bn(4 * width)
            if stride != 1 or in_chs != 4 * width:
                total += _conv(in_chs, 4 * width, 1) + _bn(4 * width)
            in_chs = 4 * width
    return total + _linear(in_chs, num_classes)


def test_resnet50_cifar_param_count_and_shapes():
    expected = _bottleneck_resnet_count([64, 128, 256, 512], [3, 4, 6, 3], 10)
    assert expected == 23_520_842  # kuangliu/pytorch-cifar ResNet50 (= RankMixup's resnet50_cifar)
    model = timm.create_model("resnet50_cifar", num_classes=10).eval()
    assert _num_params(model) == expected
    assert [len(stage) for stage in model.stages] == [3, 4, 6, 3]
    assert model.num_features == 2048 and not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    seen = {}
    model.stem.register_forward_hook(lambda module, inputs, output: seen.update(stem=output))
    images = torch.randn(2, 3, 32, 32)
    features = model.forward_features(images)
    assert seen["stem"].shape == (2, 64, 32, 32) and (seen["stem"] >= 0).all()
    assert features.shape == (2, 2048, 4, 4)
    # the official head: F.avg_pool2d(out, 4), flatten, linear
    pooled = F.avg_pool2d(features, 4).flatten(1)
    torch.testing.assert_close(model(images), F.linear(pooled, model.fc.weight, model.fc.bias))


def test_resnet50_tiny_has_the_2x2_pooled_head():
    """RankMixup's resnet50_tiny: 64x64 in, 8x8 map, adaptive average to 2x2, fc(2048 * 4 -> 200)."""
    model = timm.create_model("resnet50_tiny").eval()
    assert model.num_classes == 200 and model.fc.in_features == 2048 * 4
    expected = _bottleneck_resnet_count([64, 128, 256, 512], [3, 4, 6, 3], 200) + 2048 * 3 * 200
    assert _num_params(model) == expected
    images = torch.randn(2, 3, 64, 64)
    features = model.forward_features(images)
    assert features.shape == (2, 2048, 8, 8)
    # longhand: mean over each 4x4 quadrant, flattened channel-major (as .view(B, -1) of a (B, C, 2, 2) map)
    quadrants = features.reshape(2, 2048, 2, 4, 2, 4).mean(dim=(3, 5))
    pooled = quadrants.reshape(2, -1)
    torch.testing.assert_close(model(images), F.linear(pooled, model.fc.weight, model.fc.bias))
    assert model.forward_head(features, pre_logits=True).shape == (2, 8192)


def test_bottleneck_matches_hand_computation():
    block = models.Bottleneck(8, 4, stride=2).eval()
    bns = [block.bn1, block.bn2, block.bn3, block.shortcut[1]]
    for bn in bns:
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 8, 8, 8)

    def bn_eval(bn, t):
        return F.batch_norm(t, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    out = torch.relu(bn_eval(block.bn1, F.conv2d(x, block.conv1.weight)))
    # the stride sits on the 3x3 conv, not on the first 1x1
    out = torch.relu(bn_eval(block.bn2, F.conv2d(out, block.conv2.weight, stride=2, padding=1)))
    out = bn_eval(block.bn3, F.conv2d(out, block.conv3.weight))
    shortcut = bn_eval(block.shortcut[1], F.conv2d(x, block.shortcut[0].weight, stride=2))
    expected = torch.relu(out + shortcut)
    assert expected.shape == (2, 16, 4, 4)
    torch.testing.assert_close(block(x), expected)
    identity = models.Bottleneck(16, 4).eval()
    assert isinstance(identity.shortcut, nn.Identity)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_backward_all_parameters_get_gradients(name):
    model = timm.create_model(name, num_classes=7)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([1, 6])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert model.get_classifier().out_features == 7 and model.num_classes == 7
