"""Tests for the CIFAR backbones registered into timm by `common.models` (papers test their own models).

Parameter counts are recomputed here from the architecture descriptions (layer by layer), not from
the module's code, and anchored on the counts the reference implementations are known for.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from common import models
from common.errors import ReproError
from common.models import MODEL_NAMES, ModelArgumentError, PreActBlock, build_model
from tests.layer_counts import bn as _bn
from tests.layer_counts import conv as _conv
from tests.layer_counts import linear as _linear
from tests.layer_counts import num_params as _num_params

IMAGE_MODELS = list(MODEL_NAMES)  # papers test their own models (tests/papers/test_<paper>_model.py)
CNN_STEM_WIDTH = {"preact_resnet18_cifar": 64, "resnet18_cifar": 64, "wrn28_10_cifar": 16}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------------
# Independent parameter counts


def _preact_resnet_count(stem: int, widths: list[int], depths: list[int], num_classes: int) -> int:
    """Stem conv; per block BN, conv3x3, BN, conv3x3 (+ 1x1 conv on a shape change); final BN; fc."""
    total, in_chs = _conv(3, stem, 3), stem
    for stage, (width, depth) in enumerate(zip(widths, depths, strict=True)):
        for block in range(depth):
            stride = 2 if stage > 0 and block == 0 else 1
            total += _bn(in_chs) + _conv(in_chs, width, 3) + _bn(width) + _conv(width, width, 3)
            if stride != 1 or in_chs != width:
                total += _conv(in_chs, width, 1)
            in_chs = width
    return total + _bn(in_chs) + _linear(in_chs, num_classes)


def _resnet_count(widths: list[int], depths: list[int], num_classes: int) -> int:
    """Stem conv + BN; per block conv, BN, conv, BN (+ 1x1 conv + BN on a shape change); fc."""
    total, in_chs = _conv(3, widths[0], 3) + _bn(widths[0]), widths[0]
    for stage, (width, depth) in enumerate(zip(widths, depths, strict=True)):
        for block in range(depth):
            stride = 2 if stage > 0 and block == 0 else 1
            total += _conv(in_chs, width, 3) + _bn(width) + _conv(width, width, 3) + _bn(width)
            if stride != 1 or in_chs != width:
                total += _conv(in_chs, width, 1) + _bn(width)
            in_chs = width
    return total + _linear(in_chs, num_classes)


def _vit_count(embed: int, depth: int, num_tokens: int, num_classes: int, patch: int = 4) -> int:
    """Patch projection, class token, position embedding, blocks (2 LN, qkv, proj, MLP x4), LN, head."""
    block = 2 * _bn(embed) + _linear(embed, 3 * embed) + _linear(embed, embed)
    block += _linear(embed, 4 * embed) + _linear(4 * embed, embed)
    stem = 3 * patch * patch * embed + embed + embed + num_tokens * embed
    return stem + depth * block + _bn(embed) + _linear(embed, num_classes)


def test_param_counts_match_architecture():
    preact = _preact_resnet_count(64, [64, 128, 256, 512], [2, 2, 2, 2], 10)
    resnet = _resnet_count([64, 128, 256, 512], [2, 2, 2, 2], 10)
    wrn = _preact_resnet_count(16, [160, 320, 640], [4, 4, 4], 10)
    # anchors: kuangliu's PreActResNet18 (11,171,146) plus the mixup code's final BN(512), kuangliu's
    # ResNet18, and the 36.5M of WRN-28-10 (Zagoruyko & Komodakis, Table 1)
    assert (preact, resnet, wrn) == (11_171_146 + 1024, 11_173_962, 36_479_194)
    assert _num_params(timm.create_model("preact_resnet18_cifar", num_classes=10)) == preact
    assert _num_params(timm.create_model("resnet18_cifar", num_classes=10)) == resnet
    assert _num_params(timm.create_model("wrn28_10_cifar", num_classes=10)) == wrn
    assert abs(preact - 11.17e6) / 11.17e6 < 0.02 and abs(wrn - 36.5e6) / 36.5e6 < 0.02
    # num_classes reaches the classifier: CIFAR-100 adds 90 x (512 + 1) weights
    assert _num_params(timm.create_model("preact_resnet18_cifar", num_classes=100)) == preact + 90 * 513


def test_vit_param_counts():
    assert _num_params(timm.create_model("vit_tiny_patch4_32", num_classes=10)) == _vit_count(192, 12, 65, 10)
    assert _num_params(timm.create_model("vit_small_patch4_32", num_classes=100)) == _vit_count(
        384, 12, 65, 100
    )


# ----------------------------------------------------------------------------------------------------
# Registry, build_model and arguments


def test_all_registered_in_timm_under_this_module():
    assert set(timm.list_models(module="models")) == set(MODEL_NAMES)
    assert all(timm.is_model(name) for name in MODEL_NAMES)
    assert not any(timm.is_model_pretrained(name) for name in MODEL_NAMES)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_forward_backward_all_parameters_get_gradients(name):
    model = timm.create_model(name, num_classes=7)
    images = torch.randn(2, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([1, 6])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert model.get_classifier().out_features == 7 and model.num_classes == 7


@pytest.mark.parametrize("name", ["preact_resnet18_cifar", "resnet18_cifar", "vit_tiny_patch4_32"])
def test_num_classes_zero_gives_pooled_features(name):
    # depth only reaches the ViT; None is dropped by create_model, so the CNNs never see it
    depth = 1 if name.startswith("vit") else None
    model = timm.create_model(name, num_classes=0, depth=depth).eval()
    images = torch.randn(1, 3, 32, 32)
    features = model(images)
    assert features.shape == (1, model.num_features)
    torch.testing.assert_close(features, model.forward_head(model.forward_features(images), pre_logits=True))
    model.reset_classifier(5)
    torch.testing.assert_close(model(images), model.get_classifier()(features))


def test_build_model_passes_kwargs():
    model = build_model("vit_tiny_patch4_32", num_classes=100, depth=2, drop_path_rate=0.1)
    assert len(model.blocks) == 2 and model.head.out_features == 100
    # timm's linear stochastic-depth rule: 0 for the first block, the full rate for the last
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert isinstance(model.blocks[0].drop_path1, nn.Identity)


def test_unknown_name_suggests_closest():
    with pytest.raises(ReproError, match="Did you mean 'preact_resnet18_cifar'"):
        build_model("preact_resnet18_cifr", num_classes=10)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_pretrained_is_a_clear_error(name):
    with pytest.raises(ValueError, match="no pretrained weights.*pretrained=False") as info:
        timm.create_model(name, pretrained=True)
    assert isinstance(info.value, ReproError)


def test_unknown_kwargs_rejected_unless_none():
    assert isinstance(models.resnet18_cifar(pretrained_cfg=None, cache_dir=None), models.ResNetCifar)
    with pytest.raises(ModelArgumentError, match=r"\['global_pool_typo'\].*drop_path_rate"):
        timm.create_model("resnet18_cifar", global_pool_typo="avg")
    with pytest.raises(TypeError, match="not_a_vit_arg"):
        timm.create_model("vit_tiny_patch4_32", not_a_vit_arg=1)


# ----------------------------------------------------------------------------------------------------
# Architecture details


@pytest.mark.parametrize("name", list(CNN_STEM_WIDTH))
def test_cifar_stem_keeps_resolution_and_has_no_maxpool(name):
    model = timm.create_model(name, num_classes=10).eval()
    seen = {}
    model.stem.register_forward_hook(lambda module, inputs, output: seen.update(stem=output))
    features = model.forward_features(torch.randn(1, 3, 32, 32))
    assert seen["stem"].shape == (1, CNN_STEM_WIDTH[name], 32, 32)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    # three stride-2 stages for the ResNet-18s, two for WRN
    side = 8 if name.startswith("wrn") else 4
    assert features.shape == (1, model.num_features, side, side)


def test_preact_vs_postact_activations():
    images = torch.randn(1, 3, 32, 32)
    preact = timm.create_model("preact_resnet18_cifar").eval()
    postact = timm.create_model("resnet18_cifar").eval()
    # PreAct: the stem is a bare conv and the residual stream is never ReLU'd, only the final BN + ReLU
    stem_out = preact.stem(images)
    assert (stem_out < 0).any()
    assert (preact.stages(stem_out) < 0).any()
    assert (preact.forward_features(images) >= 0).all()
    assert isinstance(preact.final_act[0], nn.BatchNorm2d) and preact.final_act[0].num_features == 512
    # post-activation: stem ends in ReLU and every block ends in ReLU after the addition
    stem_out = postact.stem(images)
    assert (stem_out >= 0).all() and (postact.stages(stem_out) >= 0).all()


def test_preact_block_matches_hand_computation():
    block = PreActBlock(8, 16, stride=2).eval()
    for bn in (block.bn1, block.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 8, 8, 8)

    def bn_eval(bn, t):
        return F.batch_norm(t, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    pre = torch.relu(bn_eval(block.bn1, x))
    out = F.conv2d(pre, block.conv1.weight, stride=2, padding=1)
    out = F.conv2d(torch.relu(bn_eval(block.bn2, out)), block.conv2.weight, padding=1)
    # the projection shortcut reads the pre-activated input, not x
    expected = out + F.conv2d(pre, block.shortcut.weight, stride=2)
    torch.testing.assert_close(block(x), expected)
    identity = PreActBlock(8, 8).eval()
    assert identity.shortcut is None


def test_wrn_dropout_and_init():
    model = timm.create_model("wrn28_10_cifar", drop_rate=0.3)
    dropouts = [m.drop.p for m in model.modules() if isinstance(m, PreActBlock)]
    assert dropouts == [0.3] * 12
    # dropout sits inside the block: train-mode outputs differ between calls, eval-mode ones do not
    block = PreActBlock(16, 16, drop_rate=0.5)
    x = torch.randn(2, 16, 8, 8)
    assert not torch.equal(block(x), block(x))
    block.eval()
    assert torch.equal(block(x), block(x))
    # He init with fan_out, as xternalz/WideResNet-pytorch
    weight = model.stages[2][1].conv2.weight
    assert weight.std().item() == pytest.approx(math.sqrt(2 / (640 * 9)), rel=0.05)
    assert torch.count_nonzero(model.fc.bias) == 0


def test_resnet_drop_path_rises_linearly():
    model = timm.create_model("resnet18_cifar", drop_path_rate=0.2)
    blocks = [block for stage in model.stages for block in stage]
    assert isinstance(blocks[0].drop_path, nn.Identity)
    assert [getattr(b.drop_path, "drop_prob", 0.0) for b in blocks] == pytest.approx(
        [0.2 * i / 7 for i in range(8)]
    )


@pytest.mark.parametrize(("name", "embed"), [("vit_tiny_patch4_32", 192), ("vit_small_patch4_32", 384)])
def test_vit_has_64_patches_and_a_class_token(name, embed):
    model = timm.create_model(name, num_classes=10, depth=1).eval()
    images = torch.randn(2, 3, 32, 32)
    assert model.patch_embed(images).shape == (2, 64, embed)
    assert model.cls_token.shape == (1, 1, embed) and model.num_prefix_tokens == 1
    assert model.pos_embed.shape == (1, 65, embed)
    tokens = model.forward_features(images)
    assert tokens.shape == (2, 65, embed)
    # the logits read the class token (index 0), not a mean over patches
    torch.testing.assert_close(model.forward_head(tokens), model.head(tokens[:, 0]))
