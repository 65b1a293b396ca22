"""Tests for `common.attention`: the last block's class-token attention captured from the training forward.

Three independent sources of the same numbers are compared: the hook capture, `explicit_attention_matrix`
(recomputed from the last block's input), and timm's own non-fused attention probabilities (the input of
`attn_drop` when `fused_attn` is off).
"""

from __future__ import annotations

import copy
import os

import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import common.models  # noqa: F401  (registers vit_tiny_patch4_32 and resnet18_cifar in timm)
from common.attention import (
    attention_grid,
    capture_cls_attention,
    check_cls_attention,
    explicit_attention_matrix,
    explicit_cls_attention,
    supports_cls_attention,
    unwrap_model,
)
from common.errors import ReproError

BATCH = 3


def _vit32(**kwargs) -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=3, num_classes=10, **kwargs
    )


MODELS = {
    # name: (factory, image side)
    "vit_tiny_32_depth3": (_vit32, 32),
    "ours_vit_tiny_patch4_32": (
        lambda **kw: timm.create_model("vit_tiny_patch4_32", depth=2, num_classes=10, **kw),
        32,
    ),
    "deit_small_224_depth2": (
        lambda **kw: timm.create_model("deit_small_patch16_224", pretrained=False, depth=2, **kw),
        224,
    ),
    "reg_tokens_4": (lambda **kw: _vit32(class_token=True, reg_tokens=4, **kw), 32),
    "qk_norm": (lambda **kw: _vit32(qk_norm=True, **kw), 32),
    "deit_distilled": (
        lambda **kw: timm.create_model(
            "deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2, **kw
        ),
        32,
    ),
}


def _make(name: str, **kwargs) -> tuple[nn.Module, torch.Tensor]:
    factory, side = MODELS[name]
    torch.manual_seed(0)
    model = factory(**kwargs)
    # timm inits qkv/proj small; a larger qkv spreads the attention so rows are not all ~1/T
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(8.0)
    images = torch.randn(BATCH, 3, side, side, generator=torch.Generator().manual_seed(1))
    return model, images


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------------------------------
# (1) capture == explicit recomputation == timm's own probabilities


@pytest.mark.parametrize("name", list(MODELS))
def test_capture_matches_explicit_eval(name):
    model, images = _make(name)
    model.eval()
    with capture_cls_attention(model) as grab:
        model(images)
    explicit = explicit_cls_attention(model, images)
    num_patches = model.patch_embed.num_patches
    assert grab.attention.shape == explicit.shape == (BATCH, num_patches)
    assert grab.attention.dtype == torch.float32
    torch.testing.assert_close(grab.attention, explicit, atol=1e-5, rtol=0)
    # not trivially uniform: the comparison can tell a wrong row or scale apart
    assert (grab.attention.max(-1).values > 2.0 / num_patches).all()


@pytest.mark.parametrize("name", ["vit_tiny_32_depth3", "reg_tokens_4", "qk_norm"])
def test_capture_matches_explicit_train_with_drop_path(name):
    # attention dropout 0 (spec: before attention dropout); drop path active and seeded identically
    model, images = _make(name, drop_path_rate=0.5, attn_drop_rate=0.0)
    model.train()
    torch.manual_seed(123)
    with capture_cls_attention(model) as grab:
        model(images)
    torch.manual_seed(123)
    explicit = explicit_cls_attention(model, images)
    torch.testing.assert_close(grab.attention, explicit, atol=1e-5, rtol=0)
    # drop path does change the map, so the seeding above is what made them agree
    torch.manual_seed(999)
    other = explicit_cls_attention(model, images)
    assert (other - explicit).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["vit_tiny_32_depth3", "reg_tokens_4", "qk_norm"])
def test_explicit_matrix_matches_timm_non_fused_probabilities(name):
    model, images = _make(name)
    model.eval()
    reference = copy.deepcopy(model)
    last = reference.blocks[-1].attn
    last.fused_attn = False  # timm's explicit path: softmax(q * scale @ k^T) -> attn_drop
    seen = {}
    last.attn_drop.register_forward_hook(lambda mod, args, out: seen.update(probs=args[0].detach()))
    with torch.no_grad():
        reference(images)
    matrix = explicit_attention_matrix(model, images)
    torch.testing.assert_close(matrix, seen["probs"], atol=1e-6, rtol=0)
    prefix = model.num_prefix_tokens
    row = seen["probs"][:, :, 0, prefix:].mean(1)
    with capture_cls_attention(model) as grab:
        model(images)
    torch.testing.assert_close(grab.attention, row, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------
# (2) capture does not change the forward


@pytest.mark.parametrize("train", [False, True])
def test_logits_unchanged_by_capture(train):
    model, images = _make("vit_tiny_32_depth3", drop_path_rate=0.3, drop_rate=0.2)
    model.train(train)
    torch.manual_seed(7)
    plain = model(images)
    torch.manual_seed(7)
    with capture_cls_attention(model):
        captured = model(images)
    assert torch.equal(plain, captured)


# ----------------------------------------------------------------------------------------------------
# (3) row mass


@pytest.mark.parametrize("name", ["vit_tiny_32_depth3", "reg_tokens_4", "deit_distilled"])
def test_row_is_nonnegative_and_misses_the_prefix_mass(name):
    model, images = _make(name)
    model.eval()
    with capture_cls_attention(model) as grab:
        model(images)
    matrix = explicit_attention_matrix(model, images)
    prefix = model.num_prefix_tokens
    expected = 1.0 - matrix[:, :, 0, :prefix].sum(-1).mean(1)  # = 1 - A[:, :, 0, 0].mean(heads) if prefix 1
    attn = grab.attention
    assert (attn >= 0).all()
    torch.testing.assert_close(attn.sum(-1), expected, atol=1e-5, rtol=0)
    assert (attn.sum(-1) < 1).all()


# ----------------------------------------------------------------------------------------------------
# (4) detached; the loss still backpropagates


def test_detached_and_backward_works():
    model, images = _make("vit_tiny_32_depth3", drop_path_rate=0.1)
    model.train()
    with capture_cls_attention(model) as grab:
        logits = model(images)
    assert logits.requires_grad
    assert not grab.attention.requires_grad and grab.attention.grad_fn is None
    loss = F.cross_entropy(logits, torch.tensor([0, 1, 2])) + (logits * grab.attention.sum(-1, True)).mean()
    loss.backward()
    qkv_grad = model.blocks[-1].attn.qkv.weight.grad
    assert qkv_grad is not None and torch.isfinite(qkv_grad).all() and qkv_grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# (5) hook lifetime


def test_hooks_removed_after_context():
    model, images = _make("vit_tiny_32_depth3")
    with capture_cls_attention(model) as grab:
        assert len(model.blocks[-1].attn.q_norm._forward_hooks) == 1
        assert len(model.blocks[-1].attn.k_norm._forward_hooks) == 1
        model(images)
    assert _no_hooks(model)
    assert grab.attention.shape == (BATCH, 64)


def test_hooks_removed_when_forward_raises():
    model, images = _make("vit_tiny_32_depth3")

    def explode(module, args, output):
        raise ValueError("boom after the last attention")

    handle = model.norm.register_forward_hook(explode)  # fires after the last block's q/k hooks
    with pytest.raises(ValueError, match="boom"), capture_cls_attention(model):
        model(images)
    handle.remove()
    assert _no_hooks(model)
    with pytest.raises(RuntimeError), capture_cls_attention(model):  # fails inside patch_embed
        model(torch.randn(2, 5, 32, 32))
    assert _no_hooks(model)


def test_attention_before_any_forward_is_an_error():
    model, images = _make("vit_tiny_32_depth3")
    with capture_cls_attention(model) as grab:
        pass
    with pytest.raises(RuntimeError, match="no class-token attention was captured"):
        _ = grab.attention
    with torch.no_grad():
        model(images)  # outside the context: nothing is captured
    with pytest.raises(RuntimeError, match="no class-token attention"):
        _ = grab.attention


def test_last_forward_in_context_wins():
    model, images = _make("vit_tiny_32_depth3")
    model.eval()
    with capture_cls_attention(model) as grab:
        model(images)
        model(images.flip(0))
    assert grab.num_captures == 2
    torch.testing.assert_close(
        grab.attention, explicit_cls_attention(model, images.flip(0)), atol=1e-5, rtol=0
    )


# ----------------------------------------------------------------------------------------------------
# (6) model checks


@pytest.mark.parametrize(
    ("factory", "fragment"),
    [
        (
            lambda: timm.create_model("resnet18", pretrained=False, num_classes=10),
            "not a timm VisionTransformer",
        ),
        (lambda: timm.create_model("resnet18_cifar", num_classes=10), "not a timm VisionTransformer"),
        (lambda: _vit32(class_token=False, global_pool="avg"), "no class token"),
        (lambda: _vit32(global_pool="avg"), "global_pool='avg'"),
        (lambda: _vit32(patch_drop_rate=0.25), "drops patch tokens"),
    ],
)
def test_unsupported_models_are_rejected(factory, fragment):
    model = factory()
    assert not supports_cls_attention(model)
    with pytest.raises(ReproError, match="TransMix needs a ViT") as info:
        check_cls_attention(model, "TransMix")
    assert fragment in str(info.value) and type(model).__name__ in str(info.value)
    with pytest.raises(ReproError, match=fragment), capture_cls_attention(model):
        pass
    assert _no_hooks(model)


def test_other_attention_class_is_rejected():
    model, _ = _make("vit_tiny_32_depth3")

    class MyAttention(type(model.blocks[-1].attn)):
        def forward(self, x, attn_mask=None, is_causal=False):  # may not call q_norm/k_norm
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)

    model.blocks[-1].attn.__class__ = MyAttention
    with pytest.raises(ReproError, match="no timm Attention"):
        check_cls_attention(model, "TransMix")


@pytest.mark.parametrize("name", list(MODELS))
def test_supported_models_pass(name):
    model, _ = _make(name)
    assert supports_cls_attention(model)
    check_cls_attention(model, "TransMix")


# ----------------------------------------------------------------------------------------------------
# (7) fused attention untouched


@pytest.mark.parametrize("train", [False, True])
def test_every_block_keeps_fused_attention(monkeypatch, train):
    model, images = _make("vit_tiny_32_depth3")
    model.train(train)
    before = [block.attn.fused_attn for block in model.blocks]
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    with capture_cls_attention(model) as grab:
        assert [block.attn.fused_attn for block in model.blocks] == before
        model(images)
    assert [block.attn.fused_attn for block in model.blocks] == before
    if all(before):  # timm's default unless TIMM_FUSED_ATTN=0: each block, the last one included, ran SDPA
        assert len(calls) == len(model.blocks)
    assert grab.num_captures == 1


# ----------------------------------------------------------------------------------------------------
# Wrappers, checkpointing, autocast


class _Wrapper(nn.Module):
    """A stand-in for accelerate-style wrappers: holds the model in `.module`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def test_wrapped_model_is_unwrapped():
    model, images = _make("vit_tiny_32_depth3")
    model.eval()
    wrapped = _Wrapper(_Wrapper(model))
    assert unwrap_model(wrapped) is model
    assert supports_cls_attention(wrapped)
    with capture_cls_attention(wrapped) as grab:
        wrapped(images)
    torch.testing.assert_close(grab.attention, explicit_cls_attention(wrapped, images), atol=1e-5, rtol=0)
    assert _no_hooks(model)


def test_ddp_model(tmp_path):
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    model, images = _make("vit_tiny_32_depth3")
    model.eval()
    dist.init_process_group("gloo", init_method=f"file://{os.fspath(tmp_path / 'pg')}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        with capture_cls_attention(ddp) as grab:
            ddp(images)
        torch.testing.assert_close(grab.attention, explicit_cls_attention(model, images), atol=1e-5, rtol=0)
    finally:
        dist.destroy_process_group()


def test_compiled_model_needs_hook_guards():
    model, images = _make("ours_vit_tiny_patch4_32")
    model.eval()
    expected = explicit_cls_attention(model, images)
    try:
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
            compiled = torch.compile(model, backend="eager")
            compiled(images)
            with (
                pytest.raises(ReproError, match="skip_nnmodule_hook_guards"),
                capture_cls_attention(compiled),
            ):
                pass
        torch._dynamo.reset()
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
            compiled = torch.compile(model, backend="eager")
            compiled(images)  # compiled once without hooks, then once with them
            with capture_cls_attention(compiled) as grab:
                compiled(images)
            compiled(images)
        torch.testing.assert_close(grab.attention, expected, atol=1e-5, rtol=0)
        assert _no_hooks(model)
    finally:
        torch._dynamo.reset()


def test_gradient_checkpointing_gives_the_same_map():
    model, images = _make("vit_tiny_32_depth3", drop_path_rate=0.3)
    model.train()
    torch.manual_seed(5)
    with capture_cls_attention(model) as plain:
        model(images)
    model.set_grad_checkpointing(True)
    torch.manual_seed(5)
    with capture_cls_attention(model) as checkpointed:
        logits = model(images)
        logits.sum().backward()  # recomputation inside the context re-fires the hooks with the same RNG
    assert checkpointed.num_captures == 2  # the forward, then the recomputation in backward
    torch.testing.assert_close(checkpointed.attention, plain.attention, atol=1e-6, rtol=0)


def test_autocast_result_is_float32():
    model, images = _make("vit_tiny_32_depth3")
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16), capture_cls_attention(model) as grab:
        model(images)
    assert grab.attention.dtype == torch.float32
    torch.testing.assert_close(grab.attention, explicit_cls_attention(model, images), atol=2e-2, rtol=0)


# ----------------------------------------------------------------------------------------------------
# attention_grid


def test_attention_grid_is_row_major_patch_order():
    attn = torch.rand(2, 12)
    grid = attention_grid(attn, grid_size=(3, 4))
    for b in range(2):
        for i in range(3):
            for j in range(4):
                assert grid[b, i, j] == attn[b, i * 4 + j]
    assert attention_grid(torch.rand(2, 64)).shape == (2, 8, 8)
    with pytest.raises(ValueError, match="square grid"):
        attention_grid(torch.rand(2, 12))
    with pytest.raises(ValueError, match="does not hold"):
        attention_grid(torch.rand(2, 12), grid_size=(3, 3))


def test_attention_grid_follows_patch_embed_layout():
    # a patch embedding that reads only pixel (0, 0) of each patch; put a distinct value in one patch
    model, _ = _make("vit_tiny_32_depth3")
    images = torch.zeros(1, 3, 32, 32)
    images[0, :, 4 * 2, 4 * 5] = 1.0  # patch row 2, column 5
    tokens = model.patch_embed(images)  # (1, 64, C), flattened from the (8, 8) conv output
    baseline = model.patch_embed(torch.zeros_like(images))
    changed = (tokens - baseline).abs().sum(-1)  # (1, 64)
    grid = attention_grid(changed)
    assert grid[0].argmax() == 2 * 8 + 5 and grid[0, 2, 5] > 0
