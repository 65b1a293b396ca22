"""The method contract: the trainer owns the loop, a method owns one training step.

A method is a class registered by name with `@register_method`. It declares its options as a
dataclass `Params` (unknown keys are errors); the trainer never branches on a method's name. What a method
needs beyond one step it asks for through the hooks of `Method`, each with a default: `prepare` (the training
set), `check_model` (e.g. attention maps, then read in the step with `common.attention`), `passes` and
`train_dataset` (its own view of the data), `inputs` (files the workflow provides), `epoch_stats`,
`state_dict`, and for a method that owns modules (a generator, a momentum copy) `attach`, `after_update`,
`ema_model`.

`step(model, batch, ctx)` returns a dict with at least ``loss`` (a scalar tensor to back-propagate)
and ``logits``; any other entries (Python floats or detached 0-d tensors) are logged as training scalars,
averaged over the epoch. A step never turns a tensor computed by the model into a Python number: the trainer
sums the tensors on the device and reads them once per epoch (tests/common/test_no_host_sync.py).

A mixing method mixes in one place: `step` and `mix` (the figures' view of one batch) call the same function
(`MixCutMix.mixed_batch`), so the two cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from common.config import build_dataclass
from common.errors import ReproError, unknown_name
from common.mixing import apply_mix, draw_mix, smooth_one_hot, soft_target_cross_entropy

METHODS: dict[str, type[Method]] = {}


@dataclass
class StepContext:
    """What a method may know about the step it is running."""

    epoch: int
    step: int  # global batch counter (micro-batches), from 0
    progress: float  # fraction of training done, in [0, 1]
    generator: torch.Generator  # CPU generator: the only source of a method's randomness
    total_steps: int = 0  # batches (micro-batches) of the whole run; 0 where unknown


@dataclass(frozen=True)
class TrainPass:
    """One pass of the trainer over the training set (`Method.passes`).

    By default every epoch is one pass. A method whose loader yields several views of each example per pass
    (FKD: n stored regions per image load) counts a pass as several epochs: the lr schedule is set at the pass's
    first epoch, the log row and checkpoint say the epoch the pass ends at.

    Attributes:
        epoch: the 0-based epoch the pass starts at (the schedule's position and the random streams' key).
        epochs: how many epochs it counts for.
        batch_size: loader batch of this pass; None: ``train.batch_size``.
        options: what the method's training dataset needs to know about the pass (`Method.train_dataset`).
    """

    epoch: int
    epochs: int = 1
    batch_size: int | None = None
    options: dict = field(default_factory=dict, hash=False, compare=True)

    @property
    def stop(self) -> int:
        return self.epoch + self.epochs


def register_method(name: str):
    """Class decorator adding a method to the registry under `name` (a duplicate is an error)."""

    def wrap(cls):
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice ({METHODS[name].__module__}, {cls.__module__}).")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def list_methods() -> list[str]:
    _import_papers()
    return sorted(METHODS)


def _import_papers() -> None:
    import papers  # noqa: F401  (importing the package registers every paper's methods)


def build_method(options: dict, num_classes: int, label_smoothing: float = 0.0, task: str = "classification"):
    """Instantiate the method named by ``options['name']`` with the rest as its Params."""
    _import_papers()
    options = dict(options)
    name = options.pop("name", None)
    if name not in METHODS:
        raise unknown_name("method", name, METHODS)
    cls = METHODS[name]
    params = build_dataclass(cls.Params, options, prefix="method.")
    return cls(params, num_classes=num_classes, label_smoothing=label_smoothing, task=task)


class Method:
    """Base class. Subclasses set `Params` and implement `step`."""

    name: ClassVar[str] = ""

    @dataclass
    class Params:
        pass

    def __init__(self, params, num_classes: int, label_smoothing: float = 0.0, task: str = "classification"):
        self.params = params
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.task = task

    def step(self, model, batch, ctx: StepContext) -> dict:
        raise NotImplementedError

    def mix(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        """Mixed images and soft targets for one batch, for figures; identity for non-mixing methods."""
        return images, smooth_one_hot(labels, self.num_classes, self.label_smoothing)

    def prepare(self, train_dataset, info) -> None:
        """Called once before training with the training set (e.g. to read every training label)."""

    def check_model(self, model) -> None:
        """Raise ReproError if `model` cannot give what this method needs (e.g. attention maps)."""

    def passes(self, epochs: int, batch_size: int) -> list[TrainPass]:
        """The passes over the data that make `epochs` epochs; one per epoch unless the method counts otherwise.
        A plan other than the default needs ``schedule.per: epoch`` (the lr is set once per pass)."""
        return [TrainPass(epoch) for epoch in range(epochs)]

    def train_dataset(self, train_ds, info, train_pass: TrainPass):
        """The dataset one pass trains on (called per pass, after `prepare`): by default the data section's
        training set; a method may return another view of the same examples (same length and order)."""
        return train_ds

    def inputs(self) -> list[str]:
        """Files the method reads (e.g. stored labels): the workflow makes them inputs of the run's job."""
        return []

    def epoch_stats(self) -> dict | None:
        """Per-epoch statistics the method gathered (logged under 'method_stats'), then reset; None if none."""
        return None

    def attach(self, model) -> dict[str, torch.nn.Module]:
        """Called once after the model is built, before the optimiser: modules the method owns (AdAutoMix's mask
        generator and momentum copy). The trainer moves them to the model's device and optimises their
        parameters that require grad beside the model's; the method checkpoints them in `state_dict`."""
        return {}

    def after_update(self, model, ctx: StepContext) -> None:
        """Called after every optimiser update with the (unwrapped) model, e.g. to move a momentum copy."""

    def ema_model(self):
        """A weight average the method keeps itself (AdAutoMix's k), evaluated as the EMA model (test_ema_*)
        in place of the trainer's train.ema_decay one; None by default."""
        return

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@register_method("erm")
class ERM(Method):
    """Plain training: cross-entropy (label smoothing in the loss, as torchvision does), or MSE for regression."""

    def step(self, model, batch, ctx):
        inputs, targets = batch
        logits = model(inputs)
        if self.task == "regression":
            loss = F.mse_loss(logits.float().view_as(targets), targets.float())
        else:
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
        return {"loss": loss, "logits": logits}


@dataclass
class MixedBatch:
    """One batch as `MixCutMix.mixed_batch` mixes it.

    Attributes:
        images: (B, C, H, W) mixed images.
        target: (B, K) mixed soft targets.
        lam: (B,) float64, the final weight of each row's own label (CPU).
        boxes: (B, 4) CutMix boxes (yl, yh, xl, xh), zero-size on Mixup or un-mixed rows.
        draws: the `MixDraws` behind it.
        clean_target: (B, K) the un-mixed (smoothed) targets.
    """

    images: torch.Tensor
    target: torch.Tensor
    lam: torch.Tensor
    boxes: torch.Tensor
    draws: Any
    clean_target: torch.Tensor


class MixCutMix(Method):
    """Mixup and/or CutMix with timm `Mixup`'s semantics, built from `common.mixing` primitives.

    Per batch (or pair/element): gate `rand < prob`; branch `rand < switch_prob` chooses CutMix when both
    alphas are positive; `lam ~ Beta(alpha, alpha)`; CutMix box from `lam` and a uniform centre, lambda
    corrected to the pasted area. Label smoothing lives in the mixed target (timm). Presets for the
    papers subclass this and change only the defaults.
    """

    @dataclass
    class Params:
        mixup_alpha: float = 0.8
        cutmix_alpha: float = 1.0
        prob: float = 1.0
        switch_prob: float = 0.5
        mode: str = "batch"  # batch | pair | elem
        partner: str = "flip"  # flip (timm) | randperm (official Mixup / CutMix code)
        correct_lam: bool = True

    def __init__(self, params, num_classes, label_smoothing=0.0, task="classification"):
        super().__init__(params, num_classes, label_smoothing, task)
        if task != "classification":
            raise ReproError(f"method {self.name!r} mixes class labels; it needs a classification dataset.")
        p = self.params
        if p.mixup_alpha <= 0 and p.cutmix_alpha <= 0:
            raise ReproError(f"method {self.name!r} needs mixup_alpha > 0 or cutmix_alpha > 0.")
        for key in ("prob", "switch_prob"):
            if not 0.0 <= getattr(p, key) <= 1.0:
                raise ReproError(f"method.{key} must be in [0, 1], got {getattr(p, key)}.")

    def draw(self, generator, batch_size, image_hw):
        p = self.params
        return draw_mix(
            generator, batch_size, image_hw, p.mixup_alpha, p.cutmix_alpha,
            prob=p.prob, switch_prob=p.switch_prob, mode=p.mode, partner=p.partner,
        )

    def mixed_batch(self, images, labels, generator) -> MixedBatch:
        """The one mixing path of `step`, `mix` and the subclasses' steps (TransMix): draw, smooth, mix."""
        draws = self.draw(generator, images.shape[0], images.shape[-2:])
        target = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        x_mix, t_mix, lam, boxes = apply_mix(images, target, draws, correct_lam=self.params.correct_lam)
        return MixedBatch(x_mix, t_mix, lam, boxes, draws, target)

    def mix(self, images, labels, generator):
        mixed = self.mixed_batch(images, labels, generator)
        return mixed.images, mixed.target

    def step(self, model, batch, ctx):
        mixed = self.mixed_batch(*batch, ctx.generator)
        logits = model(mixed.images)
        loss = soft_target_cross_entropy(logits, mixed.target)
        return {"loss": loss, "logits": logits, "lam": float(mixed.lam.mean())}  # lam: drawn on the CPU, no sync


@register_method("mixup_cutmix")
class TimmMixupCutMix(MixCutMix):
    """DeiT's baseline: timm Mixup 0.8 + CutMix 1.0, switch 0.5, flip partners, smoothing in the target."""
