"""Adversarial AutoMixup (Qin, Jin, Jiang, El-Yacoubi, Gao; ICLR 2024, arXiv 2312.11954).

Official code: JinXins/Adversarial-AutoMixup at 9d6fd12, `openmixup/models/classifiers/AdAutoMix.py`
(`AdAutoMix.forward_train`, `co_mixup`/`mixup`, `forward_q`, `forward_k`, `momentum_update`) and
`openmixup/models/heads/Ada_mix_pine.py` (`AdaptiveMask`); the momentum schedule is OpenMixup's
`core/hooks/momentum_hook.py` `CosineScheduleHook`. `AdAutoMix.step` mirrors `forward_train` (shared spec
specs/adautomix.md §2):

* the model is the online classifier q (backbone + its `fc` = `head_one_q`); the method owns the mask generator,
  `head_mix_q`, and the momentum copy k (a copy of the model = `backbone_k` + `head_one_k`, and `head_mix_k`),
  frozen and moved only by `after_update` (parameters only, never buffers: k's BatchNorm keeps its own running
  statistics from its own forwards in train mode). k is the model the trainer evaluates as the EMA (test_ema_*)
  and the one the paper reports;
* per step: N images (N = 3 on CIFAR) are mixed twice from k's stage-3 features: `mb` (mask keeps its graph,
  through k, trains the generator) and `bb` (mask detached, other permutations, trains q); q also trains on the
  clean batch and on a plain linear N-way mix; even steps are adversarial for the generator (-beta * CE_k +
  (1 - beta) * cos), odd steps cooperative (CE_k); one loss, one backward.

Official quirks kept as defaults, with named variants (README): `cos_sign=+1` (the official sign, which makes
the generator lower the mixed prediction's similarity to its sources on adversarial steps; -1 is the paper's
stated intent), `margin_test=official` (`openmixup_port`: the port's flipped test, almost always plain Mixup),
`dedup_k_forwards=false` (N + 1 clean k forwards, each moving k's BN statistics). Deviations: draws come from
the run's generator (official: torch's and NumPy's global ones, same order and laws); the NaN fallback replaces
NaN mask logits by the official constants without the fp64 recompute, and counts them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ReproError
from common.methods import Method, register_method
from common.mixing import randperm_partner, sample_beta, smooth_one_hot


@dataclass
class Draws:
    """One step's randomness (§2.2). perms_*: N (B,) index tensors; lam_*: N floats summing to 1."""

    perms_mb: list
    perms_bb: list
    lam_mb: list
    lam_bb: list


def draw(batch_size: int, mix_samples: int, alpha: float, is_random: bool, generator: torch.Generator) -> Draws:
    """The official draw order: p_bb0, p_mb0, N, N Beta(alpha, alpha), then (N > 2) the extra mb perms and N
    fresh bb perms. N > 2: lam = l / sum(l) (normalised Betas) for both mixes, mb perms [p_mb0, p_bb0, p_mb2..];
    N = 2: pairs (x, x[p]) with lam_mb = l_0, lam_bb = l_1."""
    p_bb0 = randperm_partner(batch_size, generator)
    p_mb0 = randperm_partner(batch_size, generator)
    n = int(torch.randint(2, mix_samples + 1, (1,), generator=generator)) if is_random else mix_samples
    betas = sample_beta(alpha, n, generator)
    if n == 2:
        identity = torch.arange(batch_size)
        l_mb, l_bb = float(betas[0]), float(betas[1])
        return Draws([identity, p_mb0], [identity, p_bb0], [l_mb, 1.0 - l_mb], [l_bb, 1.0 - l_bb])
    lam = [float(b) for b in betas / betas.sum()]
    perms_mb = [p_mb0, p_bb0] + [randperm_partner(batch_size, generator) for _ in range(n - 2)]
    perms_bb = [randperm_partner(batch_size, generator) for _ in range(n)]
    return Draws(perms_mb, perms_bb, lam, lam)


def margin_hit(lam: list, margin: float, test: str) -> bool:
    """Whether bb falls back to plain linear mixing (§2.4): only lam_0 is checked.
    official: N > 2 `m >= l0 or m > 1 - l0`, N = 2 `m >= l or m >= 1 - l`; openmixup_port: `m >= l0 or
    m < 1 - l0` for N > 2 (true whenever l0 < 1 - m)."""
    l0 = lam[0]
    if len(lam) == 2:
        return margin >= l0 or margin >= 1 - l0
    if test == "openmixup_port":
        return margin >= l0 or margin < 1 - l0
    return margin >= l0 or margin > 1 - l0


def momentum_at(it: int, total: int, m0: float, m_end: float, scope: tuple[float, float]) -> float:
    """CosineScheduleHook with warming_up='constant': m0 before int(scope0 * T), then the cosine of it / T (not
    re-normalised to the window); m = 0 where it % restart == 0 inside the window (only it = 0, scope0 = 0)."""
    if total <= 0:
        return m0
    max_iter = int(total * scope[1]) if scope[1] < 1 else total
    min_iter = int(total * scope[0]) if scope[0] > 0 else 0
    if it < min_iter:
        return m0
    if it > max_iter:
        return m_end  # the hook stops adjusting; the last value set was m_end
    if it == 0:
        return 0.0
    return m_end - (m_end - m0) * (math.cos(math.pi * it / max_iter) + 1) / 2


class AdaptiveMask(nn.Module):
    """The mask generator (`AdaptiveMask`): mask logit i = softmax(q_i (sum_{j != i} k_j)^T / sqrt(d)) v_i,
    upsampled, softmax over the N sources.

    Args:
        in_channels: C of the stage-3 features; d = C // reduction.
        lam_concat: append a constant lam_i channel to f_i (False: the mask does not depend on lam).
        norm: BatchNorm in the q/k convs (the ImageNet configs' att_norm_cfg).
        upsample: 'bilinear' or 'nearest'; scale_factor: feature map to image size.
    """

    def __init__(self, in_channels: int, reduction: int = 2, lam_concat: bool = False, norm: bool = False,
                 upsample: str = "bilinear", scale_factor: int = 4, init_std: float = 0.01):
        super().__init__()
        c = in_channels + int(lam_concat)
        self.inter = max(in_channels // reduction, 1)
        self.lam_concat, self.upsample, self.scale_factor = lam_concat, upsample, scale_factor

        def conv_module():  # mmcv ConvModule: conv (bias unless a norm follows), [BN], ReLU
            layers = [nn.Conv2d(c, self.inter, 1, bias=not norm)] + ([nn.BatchNorm2d(self.inter)] if norm else [])
            return nn.Sequential(*layers, nn.ReLU())

        self.conv_q, self.conv_k = conv_module(), conv_module()
        self.conv_v = nn.Conv2d(c, 1, 1)
        for m in self.modules():  # init_weights(init_linear='normal', std=0.01, bias=0)
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, feats: torch.Tensor, lam: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: feats: (N, B, C, h, w) features of the N sources; lam: N floats.
        Returns: mask (B, N, H, W) summing to 1 over N, and the count of NaN logits replaced (0-d tensor)."""
        n, b, _, h, w = feats.shape
        x = feats.flatten(0, 1)
        if self.lam_concat:
            lam_block = torch.tensor(lam, dtype=x.dtype, device=x.device).repeat_interleave(b)
            x = torch.cat([x, lam_block.view(-1, 1, 1, 1).expand(-1, 1, h, w)], dim=1)
        q = self.conv_q(x).view(n, b, self.inter, h * w).transpose(2, 3).float()  # (N, B, HW, d)
        k = self.conv_k(x).view(n, b, self.inter, h * w).float()  # (N, B, d, HW)
        v = self.conv_v(x).view(n, b, 1, h * w).transpose(2, 3).float()  # (N, B, HW, 1)
        others = k.sum(0, keepdim=True) - k  # sum over j != i of k_j
        attn = (q @ others / self.inter**0.5).softmax(dim=-1)  # (N, B, HW, HW), fp32 as the official matmuls
        logits = (attn @ v).view(n, b, h, w).transpose(0, 1)  # (B, N, h, w)
        nan = torch.isnan(logits)
        # official fallback constants: 0.3 for N > 2; 1e-4 / 1e4 for the two channels of N = 2
        fill = torch.full((n,), 0.3, device=x.device) if n > 2 else torch.tensor([1e-4, 1e4], device=x.device)
        logits = torch.where(nan, fill.view(1, n, 1, 1), logits)
        mask = F.interpolate(logits, scale_factor=self.scale_factor, mode=self.upsample)
        return mask.softmax(dim=1), nan.sum()


def stage_features(model: nn.Module, x: torch.Tensor, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(features after `stage` stages, pooled final features) of a stem/stages CNN (`common.models`)."""
    h = model.stem(x)
    feat = None
    for i, block in enumerate(model.stages):
        h = block(h)
        if i + 1 == stage:
            feat = h
    if hasattr(model, "final_act"):
        h = model.final_act(h)
    return feat, model.forward_head(h, pre_logits=True)


def mixed_ce(logits: torch.Tensor, labels: torch.Tensor, perms: list, lam: list, smoothing: float = 0.0):
    """sum_i lam_i CE(logits, labels[perm_i]), batch mean (ClsMixupHead.co_loss)."""
    return sum(l * F.cross_entropy(logits.float(), labels[p], label_smoothing=smoothing) for p, l in zip(perms, lam))


def weighted_cosine(logits_mix: torch.Tensor, sources: list, lam: list) -> torch.Tensor:
    """mean_b sum_i lam_i cos(z_mix[b], z_i[b]) on logits (not probabilities), as `forward_k`."""
    return sum(l * F.cosine_similarity(logits_mix, z, dim=-1) for z, l in zip(sources, lam)).mean()


def mix_images(x: torch.Tensor, perms: list, weights) -> torch.Tensor:
    """sum_i weights_i * x[perm_i]; weights: a mask (B, N, H, W) or N floats."""
    if torch.is_tensor(weights):
        return sum(x[p] * weights[:, i : i + 1].to(x.dtype) for i, p in enumerate(perms))
    return sum(x[p] * l for p, l in zip(perms, weights))


@register_method("adautomix")
class AdAutoMix(Method):
    @dataclass
    class Params:
        alpha: float = 1.0  # Beta(alpha, alpha) per source (r18_adautomix_bilinear.py)
        mix_samples: int = 3  # N (CIFAR/Tiny 3, ImageNet 2)
        is_random: bool = False  # N ~ randint(2, mix_samples) per step (ViT configs)
        lam_margin: float = 0.03
        margin_test: str = "official"  # official | openmixup_port (Westlake-AI/openmixup adautomix.py)
        mixup_ratio: float = 0.5  # official mixup_radio: weight of the linear N-way mix against the clean CE
        beta: float = 0.3  # official beta_radio (CIFAR 0.3, Tiny 0.4, ImageNet 0.1)
        cos_sign: float = 1.0  # +1 official; -1 the paper's stated intent (keep the mix similar to its sources)
        adversarial: bool = True  # False: every step cooperative (the AutoMix-like ablation)
        feature_stage: int = 3  # out_indices=(2, 3): stage 3 feeds the generator
        reduction: int = 2
        lam_concat: bool = False  # False on CIFAR/Tiny CNN configs, True on ImageNet and ViTs
        generator_norm: bool = False  # BN in the q/k convs (ImageNet configs' att_norm_cfg)
        upsample: str = "bilinear"
        scale_factor: int = 4  # stage-3 map to image size (4 for CIFAR R18)
        momentum: float = 0.999  # m0
        end_momentum: float = 0.999999  # CosineScheduleHook end_momentum (CIFAR/Tiny)
        momentum_scope: tuple = (0.1, 1.0)  # adjust_scope
        head_init_std: float = 0.01  # heads N(0, 0.01), bias 0 (ClsHead init); 0 keeps the model's fc
        dedup_k_forwards: bool = False  # True: one clean k forward serves the features and the cosine term

    def __init__(self, params, num_classes, label_smoothing=0.0, task="classification"):
        super().__init__(params, num_classes, label_smoothing, task)
        p = self.params
        if task != "classification":
            raise ReproError("method 'adautomix' mixes class labels; it needs a classification dataset.")
        if p.mix_samples < 2:
            raise ReproError(f"method.mix_samples must be >= 2, got {p.mix_samples}.")
        if p.margin_test not in ("official", "openmixup_port"):
            raise ReproError(f"method.margin_test must be official or openmixup_port, got {p.margin_test!r}.")
        if p.cos_sign not in (1.0, -1.0):
            raise ReproError(f"method.cos_sign must be 1 (official) or -1 (corrected), got {p.cos_sign}.")
        if p.upsample not in ("bilinear", "nearest"):
            raise ReproError(f"method.upsample must be bilinear or nearest, got {p.upsample!r}.")
        self.p_scope = tuple(float(s) for s in p.momentum_scope)
        self.owned: nn.ModuleDict | None = None

    # ------------------------------------------------------------------ model and owned modules
    def check_model(self, model) -> None:
        stages = getattr(model, "stages", None)
        if not (hasattr(model, "stem") and isinstance(stages, nn.Sequential) and hasattr(model, "forward_head")
                and len(stages) > self.params.feature_stage - 1):
            raise ReproError("method 'adautomix' needs a CNN with stem, stages (at least method.feature_stage of "
                             "them) and forward_head, e.g. resnet18_cifar or preact_resnet18_cifar.")

    def attach(self, model) -> dict[str, nn.Module]:
        """Build the generator, head_mix_q and the momentum copy k from the freshly initialised model."""
        self.check_model(model)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise ReproError("method 'adautomix' runs in one process: its generator and head_mix are not wrapped "
                             "for data parallelism (their gradients would not be averaged).")
        p = self.params
        convs = [m for m in model.stages[p.feature_stage - 1].modules() if isinstance(m, nn.Conv2d)]
        generator = AdaptiveMask(convs[-1].out_channels, p.reduction, p.lam_concat, p.generator_norm, p.upsample,
                                 p.scale_factor)
        fc = model.get_classifier()
        head_mix = nn.Linear(fc.in_features, fc.out_features)
        heads = (fc, head_mix) if p.head_init_std > 0 else (head_mix,)
        for head in heads:
            nn.init.normal_(head.weight, 0.0, p.head_init_std or 0.01)
            nn.init.zeros_(head.bias)
        k_model, head_mix_k = copy.deepcopy(model), copy.deepcopy(head_mix)
        for param in [*k_model.parameters(), *head_mix_k.parameters()]:
            param.requires_grad_(False)
        self.owned = nn.ModuleDict({"generator": generator, "head_mix": head_mix, "k": k_model,
                                    "head_mix_k": head_mix_k})
        return dict(self.owned)

    def ema_model(self):
        return self.owned["k"] if self.owned is not None else None

    @torch.no_grad()
    def after_update(self, model, ctx) -> None:
        """momentum_update: theta_k <- m theta_k + (1 - m) theta_q, parameters only (backbone, head_one, head_mix)."""
        p = self.params
        m = momentum_at(ctx.step, ctx.total_steps, p.momentum, p.end_momentum, self.p_scope)
        pairs = [(self.owned["k"], model), (self.owned["head_mix_k"], self.owned["head_mix"])]
        for target, source in pairs:
            for pk, pq in zip(target.parameters(), source.parameters(), strict=True):
                pk.mul_(m).add_(pq.detach(), alpha=1.0 - m)

    def state_dict(self) -> dict:
        return {"modules": self.owned.state_dict()} if self.owned is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "modules" in state:
            self.owned.load_state_dict(state["modules"])

    # ------------------------------------------------------------------ one step
    def draw(self, batch_size: int, generator: torch.Generator) -> Draws:
        p = self.params
        return draw(batch_size, p.mix_samples, p.alpha, p.is_random, generator)

    def masks(self, x: torch.Tensor, d: Draws) -> dict:
        """k's clean forward, the generator's two masks and the three mixed batches (`co_mixup` / `mixup`)."""
        if self.owned is None:
            raise ReproError("method 'adautomix' owns modules: call attach(model) first (the trainer does).")
        p, k_model, generator = self.params, self.owned["k"], self.owned["generator"]
        k_model.train()  # batch statistics, and k's own running statistics move (official: all in train mode)
        with torch.no_grad():  # k is frozen and x needs no grad: the same values, no graph
            feat, pooled = stage_features(k_model, x, p.feature_stage)
        mask_mb, nan_mb = generator(torch.stack([feat[i] for i in d.perms_mb]), d.lam_mb)
        mask_bb, nan_bb = generator(torch.stack([feat[i] for i in d.perms_bb]), d.lam_bb)
        mask_bb = mask_bb.detach()
        fallback = margin_hit(d.lam_bb, p.lam_margin, p.margin_test)
        if fallback:  # plain linear mixing for q
            mask_bb = torch.tensor(d.lam_bb, dtype=mask_bb.dtype, device=x.device).view(1, -1, 1, 1) \
                .expand_as(mask_bb)
        return {"x_mb": mix_images(x, d.perms_mb, mask_mb), "x_bb": mix_images(x, d.perms_bb, mask_bb),
                "x_lin": mix_images(x, d.perms_bb, d.lam_bb), "mask_mb": mask_mb, "mask_bb": mask_bb,
                "fallback": fallback, "nan": nan_mb + nan_bb, "pooled_k": pooled}

    def forward_train(self, model, x: torch.Tensor, y: torch.Tensor, d: Draws, adversarial: bool) -> dict:
        """The step on explicit draws and parity (the parity target of the official `forward_train`)."""
        p, ls = self.params, self.label_smoothing
        head_mix, k_model, head_mix_k = self.owned["head_mix"], self.owned["k"], self.owned["head_mix_k"]
        mixes = self.masks(x, d)
        n = len(d.lam_mb)
        # q (bb): clean CE on head_one, mixed CE on head_mix, and (N > 2) the linear N-way mix on head_mix
        loss_one = F.cross_entropy(model(x).float(), y, label_smoothing=ls)
        logits_bb = head_mix(stage_features(model, mixes["x_bb"], p.feature_stage)[1])
        loss_mix_q = mixed_ce(logits_bb, y, d.perms_bb, d.lam_bb, ls)
        out = {"loss_one": loss_one.detach(), "loss_mix_q": loss_mix_q.detach()}
        if n > 2:
            logits_lin = head_mix(stage_features(model, mixes["x_lin"], p.feature_stage)[1])
            loss_lin = mixed_ce(logits_lin, y, d.perms_bb, d.lam_bb, ls)
            loss_q = loss_mix_q + (1 - p.mixup_ratio) * loss_one + p.mixup_ratio * loss_lin
            out["loss_lin"] = loss_lin.detach()
        else:
            loss_q = loss_mix_q + loss_one
        # k (mb): trains the generator through the frozen k
        logits_mb = head_mix_k(stage_features(k_model, mixes["x_mb"], p.feature_stage)[1]).float()
        loss_ce_k = mixed_ce(logits_mb, y, d.perms_mb, d.lam_mb, ls)
        with torch.no_grad():
            if p.dedup_k_forwards:
                clean = head_mix_k(mixes["pooled_k"]).float()
                sources = [clean[perm] for perm in d.perms_mb]
            else:  # official: one k forward per source, on the permuted batch
                sources = [head_mix_k(stage_features(k_model, x[perm], p.feature_stage)[1]).float()
                           for perm in d.perms_mb]
        cos = weighted_cosine(logits_mb, sources, d.lam_mb)
        if adversarial:
            loss_g = -p.beta * loss_ce_k + p.cos_sign * (1 - p.beta) * cos
        else:
            loss_g = loss_ce_k
        gap = sum((mixes["mask_mb"][:, i].float().mean() - l).abs() for i, l in enumerate(d.lam_mb)) / n
        out.update({"loss": loss_q + loss_g, "logits": logits_bb, "loss_mix_k": loss_ce_k.detach(),
                    "cos": cos.detach(), "adversarial": float(adversarial), "margin_fallback": float(mixes["fallback"]),
                    "mask_lam_gap": gap.detach(), "nan_count": mixes["nan"].detach().float(),
                    "n_mix": float(n)})
        return out

    def step(self, model, batch, ctx):
        x, y = batch
        d = self.draw(x.shape[0], ctx.generator)
        # official: self.iter toggles 0, 1, 0, ... from 0 per process; ctx.step is the same parity, and resumes
        adversarial = self.params.adversarial and ctx.step % 2 == 0
        return self.forward_train(model, x, y, d, adversarial)

    def mix(self, images, labels, generator):
        """Figures: the bb mix with the generator when attached; without a model (the shared mixed-examples
        figure builds the method alone) the N-way linear mix q also trains on, which is the bb mix under the
        lambda-margin fallback."""
        d = self.draw(images.shape[0], generator)
        target = sum(l * smooth_one_hot(labels[perm], self.num_classes, self.label_smoothing)
                     for perm, l in zip(d.perms_bb, d.lam_bb))
        if self.owned is None:
            return mix_images(images, d.perms_bb, d.lam_bb), target
        with torch.no_grad():
            return self.masks(images, d)["x_bb"], target
