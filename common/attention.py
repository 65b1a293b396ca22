"""The class-token row of a ViT's last-block attention, read from the forward pass that makes the logits.

TransMix (shared spec transmix.md §2.5, §6) weights the mixed label by the class token's attention in
the **last** block: `A = softmax(q k^T * scale)` of that block, row 0 (the class-token query), the
columns of the N patch tokens, averaged over heads, detached, `(B, N)`, from the same train-mode
forward (drop path active) whose logits enter the loss.

How (the "cheap form" of spec §6): timm's `Attention.forward` (timm/layers/attention.py in timm 1.0.29
and 1.0.31, imported by timm/models/vision_transformer.py) runs

    qkv = self.qkv(x).reshape(B, T, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)      # nn.Identity without qk_norm, but always called
    x = F.scaled_dot_product_attention(q, k, v, ...)   # or the explicit path if not fused_attn

so temporary forward hooks on `blocks[-1].attn.q_norm` / `.k_norm` see the block's own q and k,
`(B, heads, T, head_dim)` with T = prefix tokens + N, after any q/k norm. Once both have fired we compute
`softmax((q[:, :, :1] * scale) @ k^T)` for the single class-token query in float32 under no_grad,
O(B * heads * T * head_dim), and keep only the `(B, N)` result. No block's attention is changed:
every block, the last included, keeps its fused kernel for its output. The hooks exist only inside
`with capture_cls_attention(model)`, so steps that do not need the map pay nothing.

`explicit_attention_matrix` / `explicit_cls_attention` recompute the last block's full attention matrix
from that block's input (norm1 -> qkv -> q/k norm -> softmax) for tests and figures; they share no code
with the hook path.

torch.compile: dynamo does not guard on module hooks by default
(`torch._dynamo.config.skip_nnmodule_hook_guards = True`), so hooks added after compilation are silently
ignored (and hooks present at compile time stay baked in). With that flag set to False before compiling,
dynamo keeps one graph with and one without the hooks and capture works; a compiled model under the
default flag is rejected with that fix.
"""

from __future__ import annotations

import math
from types import TracebackType
from typing import Self

import torch
from timm.models.vision_transformer import Attention, Block, ResPostBlock, VisionTransformer
from torch import nn

from common.errors import ReproError

__all__ = [
    "ClsAttention",
    "attention_grid",
    "capture_cls_attention",
    "check_cls_attention",
    "explicit_attention_matrix",
    "explicit_cls_attention",
    "supports_cls_attention",
    "unwrap_model",
]


# ----------------------------------------------------------------------------------------------------
# Which models qualify


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/accelerate (`.module`) and torch.compile (`._orig_mod`) wrappers, in any nesting."""
    for _ in range(16):  # wrappers nest a few levels at most; the bound guards against a cycle
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif not hasattr(model, "blocks") and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model
    raise ReproError(f"could not unwrap model {type(model).__name__}: more than 16 nested wrappers.")


def _unsupported_reason(model: nn.Module) -> str | None:
    """Why `model` (unwrapped) has no usable class-token row in its last block, or None if it has one."""
    name = type(model).__name__
    # strict on the class: VisionTransformer._pos_embed puts the class token first, then register /
    # distillation tokens, then the patches, which is what row 0 and the `num_prefix_tokens` cut rely on
    if not isinstance(model, VisionTransformer):
        return f"model {name} is not a timm VisionTransformer (nor a subclass such as DeiT's)"
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        return f"model {name} has no transformer blocks"
    attn = getattr(blocks[-1], "attn", None)
    # the hooks rely on Attention.forward calling q_norm(q) and k_norm(k) once each on (B, heads, T, d);
    # a subclass overriding forward, RoPE/differential/talking-head attention may not
    if not isinstance(attn, Attention) or type(attn).forward is not Attention.forward:
        return (
            f"model {name}'s last block {type(blocks[-1]).__name__} has no timm Attention with its own "
            f"forward (found {type(attn).__name__})"
        )
    if attn.q_norm is attn.k_norm:
        return f"model {name}'s last attention shares one module for q_norm and k_norm"
    if getattr(model, "cls_token", None) is None or getattr(model, "num_prefix_tokens", 0) < 1:
        return f"model {name} has no class token (class_token=False)"
    # with avg/max/map pooling the head does not read the class token, so its attention row is not
    # the evidence the classifier used, which is what TransMix's label weight stands for (spec §2.5)
    if getattr(model, "global_pool", None) != "token":
        return f"model {name} pools with global_pool={model.global_pool!r}, not the class token ('token')"
    # PatchDropout removes patch tokens in training, so column j no longer is patch j of the grid
    if getattr(getattr(model, "patch_drop", None), "prob", 0.0) > 0:
        return f"model {name} drops patch tokens (patch_drop_rate={model.patch_drop.prob})"
    return None


def supports_cls_attention(model: nn.Module) -> bool:
    """True if the (possibly wrapped) model's last block gives a class-token attention row."""
    return _unsupported_reason(unwrap_model(model)) is None


def check_cls_attention(model: nn.Module, method_name: str) -> None:
    """Raise a `ReproError` naming the reason if `method_name` cannot read class-token attention.

    Accepted: a timm `VisionTransformer` (subclasses included) whose last block has timm `Attention`,
    with a class token (register / distillation tokens allowed), `global_pool='token'` and no patch
    dropout.

    Raises:
        ReproError: the model does not qualify; the message says why and what to use instead.
    """
    reason = _unsupported_reason(unwrap_model(model))
    if reason is not None:
        raise ReproError(
            f"{method_name} needs a ViT with a class token read by the head (global_pool='token') and timm "
            f"Attention in its last block; {reason}. Swin and ConvNets cannot use it as specified "
            "(transmix spec §6): pick a timm VisionTransformer such as 'deit_small_patch16_224' or "
            "'vit_tiny_patch4_32' with class_token=True and global_pool='token'."
        )


def _compiled_parts(model: nn.Module, inner: nn.Module) -> list[str]:
    """Names of the torch.compile'd modules on the path from `model` to the last block's attention."""
    parts, current = [], model
    while current is not inner:  # the wrapper chain, as unwrap_model walks it
        if isinstance(getattr(current, "_orig_mod", None), nn.Module):
            parts.append(type(current).__name__)
            current = current._orig_mod
        else:
            current = current.module
    for label, module in (
        ("model", inner),
        ("model.blocks", inner.blocks),
        ("model.blocks[-1]", inner.blocks[-1]),
        ("model.blocks[-1].attn", inner.blocks[-1].attn),
    ):
        # nn.Module.compile() compiles in place; torch.compile(module) returns an OptimizedModule
        if getattr(module, "_compiled_call_impl", None) is not None or hasattr(module, "_orig_mod"):
            parts.append(label)
    return parts


def _dynamo_skips_hook_guards() -> bool:
    import torch._dynamo  # imported lazily: only needed once a compiled model is seen

    return bool(getattr(torch._dynamo.config, "skip_nnmodule_hook_guards", True))


# ----------------------------------------------------------------------------------------------------
# Capture from the training forward


class ClsAttention:
    """Context manager capturing the last block's class-token attention from the forward(s) run inside it.

    Usage:
        with capture_cls_attention(model) as grab:
            logits = model(x)
        attn = grab.attention  # (B, N) float32, detached

    If the model runs more than once inside the context (or gradient checkpointing recomputes the last
    block during a backward inside it) the last run wins; `num_captures` counts them.

    Args:
        model: A timm VisionTransformer, possibly wrapped by DDP/accelerate (`.module`) or torch.compile.
        method_name: Named in the error if the model does not qualify.
    """

    def __init__(self, model: nn.Module, method_name: str = "class-token attention capture"):
        self._model = model
        self._method_name = method_name
        self._inner = unwrap_model(model)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._pending: dict[str, torch.Tensor] = {}
        self._row: torch.Tensor | None = None
        self.num_captures = 0

    def __enter__(self) -> Self:
        if self._handles:
            raise RuntimeError("ClsAttention is not re-entrant; open a new capture_cls_attention(model).")
        check_cls_attention(self._inner, self._method_name)
        compiled = _compiled_parts(self._model, self._inner)
        if compiled and _dynamo_skips_hook_guards():
            raise ReproError(
                f"{self._method_name}: {', '.join(compiled)} is torch.compile'd, and dynamo ignores forward "
                "hooks added after compilation while torch._dynamo.config.skip_nnmodule_hook_guards is "
                "True (the default). Set it to False before compiling the model, or do not compile it."
            )
        self._pending.clear()
        self._row, self.num_captures = None, 0
        attn = self._inner.blocks[-1].attn
        self._handles = [
            attn.q_norm.register_forward_hook(self._hook("q")),
            attn.k_norm.register_forward_hook(self._hook("k")),
        ]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending.clear()  # a forward that failed between q_norm and k_norm leaves q behind

    def _hook(self, slot: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._pending[slot] = output.detach()
            if len(self._pending) == 2:  # either order: compute once both q and k of this call are in
                self._row = self._class_row(self._pending.pop("q"), self._pending.pop("k"))
                self.num_captures += 1

        return hook

    def _class_row(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q, k: (B, heads, T, head_dim). Returns: (B, N) head-mean class-token attention to patches."""
        attn = self._inner.blocks[-1].attn
        # float32 even under autocast: the label weight should not carry bf16 rounding
        with torch.no_grad(), torch.autocast(device_type=q.device.type, enabled=False):
            # (q * scale) @ k^T as timm's non-fused path; only the class-token query row, (B, heads, 1, T)
            scores = (q[:, :, :1].float() * attn.scale) @ k.float().transpose(-2, -1)
            probs = scores.softmax(dim=-1)[:, :, 0]  # (B, heads, T); before attention dropout
            # drop the class token and any register/distillation tokens, then average the heads
            return probs[:, :, self._inner.num_prefix_tokens :].mean(dim=1)

    @property
    def attention(self) -> torch.Tensor:
        """(B, N) float32 class-token attention of the last forward run inside the context; detached."""
        if self._row is None:
            raise RuntimeError(
                "no class-token attention was captured: call the model inside `with "
                "capture_cls_attention(model) as grab:` and read grab.attention after its forward (a "
                "torch.compile'd model compiled before the capture also ignores the hooks)."
            )
        return self._row


def capture_cls_attention(
    model: nn.Module, method_name: str = "class-token attention capture"
) -> ClsAttention:
    """`with capture_cls_attention(model) as grab: logits = model(x)`; then `grab.attention` is (B, N)."""
    return ClsAttention(model, method_name)


# ----------------------------------------------------------------------------------------------------
# Explicit recomputation (tests, figures)


class _StopForward(Exception):
    """Raised by the pre-hook once the last block's input is captured: nothing after it is needed."""


def explicit_attention_matrix(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Recompute the last block's full softmax attention matrix explicitly, in float32.

    Runs the (unwrapped, eager) model up to its last block, in the model's current train/eval mode and
    under no_grad, then computes norm1 -> qkv -> q_norm/k_norm -> softmax(q k^T * scale) for that block.
    Drop path before the last block draws from the global RNG as in a normal forward, so seed before the
    call to reproduce a given training forward.

    Args:
        model: A model accepted by `check_cls_attention`.
        x: (B, C, H, W) images.
    Returns:
        (B, heads, T, T) attention probabilities before attention dropout, T = prefix tokens + N.
    """
    inner = unwrap_model(model)
    check_cls_attention(inner, "explicit_attention_matrix")
    block = inner.blocks[-1]
    if not isinstance(block, (Block, ResPostBlock)):
        raise ReproError(
            f"explicit_attention_matrix knows timm's Block (attn(norm1(x))) and ResPostBlock (attn(x)); "
            f"the last block is a {type(block).__name__}."
        )
    captured: dict[str, torch.Tensor] = {}

    def grab_input(module: nn.Module, args: tuple) -> None:
        captured["tokens"] = args[0]
        raise _StopForward

    handle = block.register_forward_pre_hook(grab_input)
    try:
        with torch.no_grad():
            inner(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "tokens" not in captured:
        raise RuntimeError(f"the forward of {type(inner).__name__} never reached its last block.")

    attn = block.attn
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        tokens = captured["tokens"]  # (B, T, C)
        # Block is pre-norm: attn(norm1(x)); ResPostBlock applies norm1 after attn
        attn_input = tokens if isinstance(block, ResPostBlock) else block.norm1(tokens)
        batch, length, _ = attn_input.shape
        qkv = attn.qkv(attn_input).reshape(batch, length, 3, attn.num_heads, attn.head_dim)
        query = attn.q_norm(qkv[:, :, 0].transpose(1, 2))  # (B, heads, T, head_dim)
        key = attn.k_norm(qkv[:, :, 1].transpose(1, 2))
        scores = torch.einsum("bhtd,bhsd->bhts", query.float(), key.float()) * attn.scale
        return scores.softmax(dim=-1)


def explicit_cls_attention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class-token row of `explicit_attention_matrix`, patch columns only, head-averaged: (B, N) float32."""
    matrix = explicit_attention_matrix(model, x)
    return matrix[:, :, 0, unwrap_model(model).num_prefix_tokens :].mean(dim=1)


def attention_grid(attn: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Reshape per-patch attention (B, N) to the patch grid (B, gh, gw), row-major as timm's PatchEmbed.

    Args:
        attn: (B, N) attention over patch tokens.
        grid_size: (gh, gw); None means a square grid, g = sqrt(N).
    Returns:
        (B, gh, gw) view of `attn`.
    """
    if attn.dim() != 2:
        raise ValueError(f"attention_grid expects (B, N) attention, got shape {tuple(attn.shape)}.")
    num_patches = attn.shape[1]
    if grid_size is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(
                f"{num_patches} patch tokens do not form a square grid; pass grid_size=(gh, gw) "
                "(model.patch_embed.grid_size)."
            )
        grid_size = (side, side)
    if grid_size[0] * grid_size[1] != num_patches:
        raise ValueError(f"grid_size={tuple(grid_size)} does not hold {num_patches} patch tokens.")
    return attn.reshape(attn.shape[0], grid_size[0], grid_size[1])
