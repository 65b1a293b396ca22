"""Shake-Shake 26 2x96d (papers/resizemix/model.py): parameter count, shaking forward/backward, shortcut."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ReproError
from common.models import build_model
from papers.resizemix import model as models
from papers.resizemix.model import MODEL_NAMES
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


def _shake_shake_count(width: int, blocks_per_stage: int, num_classes: int) -> int:
    """Stem conv + BN; per block two branches (conv3x3, BN, conv3x3, BN) and, on a shape change, two 1x1
    convs to half the width + BN; fc."""
    total, in_chs = _conv(3, 16, 3) + _bn(16), 16
    for stage, out_chs in enumerate((width, 2 * width, 4 * width)):
        for block in range(blocks_per_stage):
            total += 2 * (_conv(in_chs, out_chs, 3) + _bn(out_chs) + _conv(out_chs, out_chs, 3) + _bn(out_chs))
            if (stage > 0 and block == 0) or in_chs != out_chs:
                total += 2 * _conv(in_chs, out_chs // 2, 1) + _bn(out_chs)
            in_chs = out_chs
    return total + _linear(in_chs, num_classes)


def test_shake_shake_param_count_and_shapes():
    model = timm.create_model("shake_shake26_2x96d_cifar", num_classes=10)
    count = _shake_shake_count(96, 4, 10)
    assert _num_params(model) == count and abs(count - 26.2e6) / 26.2e6 < 0.01  # 26.2M in the Shake-Shake paper
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 384, 8, 8)


def test_shake_combine_mixes_forward_by_alpha_and_backward_by_beta():
    a, b = torch.randn(3, 2, 4, 4, requires_grad=True), torch.randn(3, 2, 4, 4, requires_grad=True)
    alpha, beta = torch.rand(3, 1, 1, 1), torch.rand(3, 1, 1, 1)
    out = models._ShakeCombine.apply(a, b, alpha, beta)
    torch.testing.assert_close(out, alpha * a + (1 - alpha) * b)
    out.sum().backward()
    torch.testing.assert_close(a.grad, beta.expand_as(a))
    torch.testing.assert_close(b.grad, (1 - beta).expand_as(b))


def test_shake_block_averages_branches_at_eval_and_shakes_in_training():
    block = models.ShakeBlock(4, 4).eval()
    x = torch.randn(2, 4, 8, 8)
    branches = [branch(x) for branch in block.branches]
    torch.testing.assert_close(block(x), 0.5 * (branches[0] + branches[1]) + x)
    block.train()
    first, second = block(x), block(x)
    assert not torch.allclose(first, second)  # a fresh alpha per call


def test_shake_shortcut_second_path_is_shifted_by_one_pixel():
    shortcut = models._ShakeShortcut(2, 4, stride=2)
    x = torch.randn(1, 2, 8, 8)
    y = shortcut(x)
    assert y.shape == (1, 4, 4, 4)
    relu = torch.relu(x)
    first = shortcut.conv1(relu[:, :, ::2, ::2])
    second = shortcut.conv2(F.pad(relu[:, :, 1:, 1:], (0, 1, 0, 1))[:, :, ::2, ::2])
    torch.testing.assert_close(y, shortcut.bn(torch.cat([first, second], dim=1)))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_backward_all_parameters_get_gradients(name):
    model = timm.create_model(name, num_classes=7)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([1, 6])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert model.get_classifier().out_features == 7 and model.num_classes == 7
