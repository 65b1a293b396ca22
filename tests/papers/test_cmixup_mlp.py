"""C-Mixup's regression MLP (papers/cmixup/mlp.py) against the official `Learner` layers."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ReproError
from common.models import ModelArgumentError, build_model
from papers.cmixup.mlp import MODEL_NAMES
from tests.layer_counts import num_params as _num_params


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_registered_by_building_and_no_pretrained_weights(name):
    assert isinstance(build_model(name, num_classes=3), nn.Module)  # build_model imports papers
    with pytest.raises(ReproError, match="no pretrained weights.*pretrained=False"):
        timm.create_model(name, pretrained=True)


def test_param_count_and_unknown_kwargs():
    # 5 -> 128 -> 128 -> 1
    assert _num_params(timm.create_model("mlp_regression")) == 6 * 128 + 129 * 128 + 129
    with pytest.raises(ModelArgumentError, match="depth"):
        timm.create_model("mlp_regression", depth=3)


def test_mlp_regression_matches_official_layers():
    model = timm.create_model("mlp_regression")
    x = torch.randn(4, 5)
    prediction = model(x)
    assert prediction.shape == (4, 1)
    fc1, fc2, head = model.block_1[0], model.block_2[0], model.head
    hidden = F.leaky_relu(F.linear(x, fc1.weight, fc1.bias), 0.1)
    hidden = F.leaky_relu(F.linear(hidden, fc2.weight, fc2.bias), 0.1)
    torch.testing.assert_close(model.forward_features(x), hidden)
    torch.testing.assert_close(prediction, F.linear(hidden, head.weight, head.bias))
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), prediction)
    prediction.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    wide = build_model("mlp_regression", num_classes=3, in_features=8)
    assert wide(torch.randn(4, 8)).shape == (4, 3)
