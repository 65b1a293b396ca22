"""MEAL V2: ensemble distillation fine-tuning with a logit discriminator.

Paper: "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet without Tricks", Zhiqiang Shen and
Marios Savvides, arXiv 2009.08453. Official code: szq0214/MEAL-V2 at 59e6bca. One step of ``mealv2`` mirrors
``train.py: train_for_one_epoch`` with the teacher wrapper ``extensions/teacher_wrapper.py:
ModelDistillationWrapper.forward`` (``combine=True``), the loss ``extensions/kd_loss.py: KLLoss``, the
discriminator ``models/discriminator.py: Discriminator`` with ``loss.py: discriminatorLoss``, and the optimiser of
``train.py: create_optimizer`` / ``_set_learning_rate``:

* K frozen teachers (eval mode, outside the student's modules) see the student's own input tensor; the target is
  the mean of their softmaxes, and the discriminator's teacher input is the mean of their logits;
* ``L = CE(mean softmax, student) + BCEWithLogits(D([z_s; mean z_t]), [[1, 0]]*B + [[0, 1]]*B)``: no hard label,
  no temperature; one backward and one SGD step over the student and D together (``disc_grad: joint``: the student
  gets D's gradient un-reversed, as the official code does);
* D: three 1x1 convolutions on (B, C, 1, 1), i.e. Linear layers C -> w1 -> w2 -> 2, each followed by a ReLU (the
  last one too: D's outputs are >= 0, an official quirk kept);
* the learning rate: the official code sets every parameter group, D's included, to the regime's lr at each epoch
  start, overwriting D's ``--d_lr 1e-4`` (author: unintended, issue #9). ``disc_lr: follow_student`` (default) keeps
  that: D is registered as a submodule of the student (``mealv2_discriminator``), so the trainer's optimiser and
  schedule drive it; ``disc_lr: fixed`` is the intended 1e-4, applied by D's own SGD inside the backward pass.

Deviations (options, all defaulting to the official behaviour): ``disc_widths`` (the official C//8, C//64 is
``literal``; the default ``(max(C//8, 16), max(C//64, 8))`` equals it for C >= 128 and stays usable for CIFAR),
``disc_grad`` reversed / detached, ``disc_input: probs`` (``FKD_train.py`` feeds D softmaxes), ``hard_label_weight``
(0: none, as the official code), ``cutmix`` (the official ``--w-cutmix``). The student's starting weights come from
a local checkpoint or a pipeline run (``init``), never from a download (official: ``timm.create_model(name,
pretrained=True)``, whose weights depend on the timm version; see the README).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.distributed
import torch.nn.functional as F
from torch import nn

from common.errors import ReproError
from common.methods import Method, register_method
from common.mixing import (
    cutmix_box,
    paste_box,
    randperm_partner,
    sample_beta,
    smooth_one_hot,
    soft_target_cross_entropy,
)

DISC_ATTR = "mealv2_discriminator"  # the student's submodule holding D (in its state dict and optimiser)
DISC_GRADS = ("joint", "reversed", "detached")
DISC_LRS = ("follow_student", "fixed")
DISC_INPUTS = ("logits", "probs")


# ----------------------------------------------------------------------------------------------- pure functions
def ensemble_targets(teacher_logits: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The teachers' mean softmax (the target) and mean logits (D's teacher input), as the official wrapper.

    Args:
        teacher_logits: K tensors (B, C).
    Returns:
        ``(probs, logits)``: (B, C) each, float32; temperature 1.
    """
    if not teacher_logits:
        raise ReproError("MEAL V2 needs at least one teacher (method.teachers is empty).")
    stacked = torch.stack([t.float() for t in teacher_logits])  # (K, B, C)
    return stacked.softmax(dim=-1).mean(0), stacked.mean(0)


def distillation_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Official ``KLLoss``: ``mean_b(-sum_c p[b, c] log_softmax(z_s[b])_c)`` (cross-entropy, = KL + H(p))."""
    return soft_target_cross_entropy(student_logits, teacher_probs)


def discriminator_widths(num_classes: int, widths: Any = "default") -> tuple[int, int]:
    """Hidden widths of D for C classes.

    Args:
        num_classes: C (1000 on ImageNet, where every rule gives the official (125, 15)).
        widths: ``"literal"`` (official ``C//8``, ``C//64``: a zero width below C = 64 is an error), ``"default"``
            (``(max(C//8, 16), max(C//64, 8))``), or two positive integers.
    """
    if widths == "literal":
        out = (num_classes // 8, num_classes // 8 // 8)
        if min(out) < 1:
            raise ReproError(f"method.disc_widths=literal gives D widths {out} for {num_classes} classes (official "
                             "C//8, C//64 need C >= 64); use disc_widths=default or two integers, e.g. [16, 8].")
        return out
    if widths == "default":
        return max(num_classes // 8, 16), max(num_classes // 64, 8)
    if (isinstance(widths, (list, tuple)) and len(widths) == 2
            and all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)):
        return int(widths[0]), int(widths[1])
    raise ReproError(f"method.disc_widths must be 'default', 'literal' or two positive integers, got {widths!r}.")


class LogitDiscriminator(nn.Module):
    """Official ``Discriminator``: Linear C -> w1 -> w2 -> 2 (its 1x1 convolutions on (B, C, 1, 1)), a ReLU after
    every layer, the output layer included.

    Args:
        num_classes: C.
        widths: (w1, w2).
        generator: draws the initial weights with PyTorch's default law for a conv/linear layer
            (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases); None: the global RNG.
    """

    def __init__(self, num_classes: int, widths: tuple[int, int], generator: torch.Generator | None = None):
        super().__init__()
        sizes = (num_classes, *widths, 2)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(sizes))
        with torch.no_grad():
            for layer in self.layers:
                bound = 1.0 / layer.in_features**0.5
                for param in (layer.weight, layer.bias):
                    param.copy_(torch.rand(param.shape, generator=generator) * 2 * bound - bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C) -> (N, 2), every entry >= 0."""
        for layer in self.layers:
            x = F.relu(layer(x))
        return x


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def discriminator_loss(disc: nn.Module, student_out: torch.Tensor, teacher_out: torch.Tensor,
                       grad_mode: str = "joint") -> tuple[torch.Tensor, torch.Tensor]:
    """Official ``discriminatorLoss``: D on ``cat([student, teacher], 0)`` with targets [1, 0] (student rows) and
    [0, 1] (teacher rows), BCE-with-logits averaged over all 2B x 2 entries.

    Args:
        disc: D.
        student_out: (B, C) the student's logits (or probabilities), with its graph.
        teacher_out: (B, C) the teachers' mean logits (no gradient).
        grad_mode: what reaches the student from this loss: ``joint`` (official: d loss / d z_s as it is),
            ``reversed`` (a gradient-reversal layer: the GAN direction), ``detached`` (nothing; D still learns).
    Returns:
        ``(loss, accuracy, active)``: the scalar loss, D's fraction of rows classified right and the fraction of
        its output entries above 0 (detached tensors). ``active`` 0 is a dead D (official quirk: the ReLU on its
        output): every entry then costs log 2 and no gradient flows, to D or to the student.
    """
    if grad_mode == "reversed":
        student_out = _ReverseGrad.apply(student_out)
    elif grad_mode == "detached":
        student_out = student_out.detach()
    elif grad_mode != "joint":
        raise ReproError(f"method.disc_grad must be one of {', '.join(DISC_GRADS)}, got {grad_mode!r}.")
    batch = student_out.shape[0]
    inputs = torch.cat([student_out.float(), teacher_out.float().detach()], 0)
    is_teacher = torch.cat([torch.zeros(batch, dtype=torch.long), torch.ones(batch, dtype=torch.long)])
    is_teacher = is_teacher.to(inputs.device)
    targets = F.one_hot(is_teacher, 2).float()  # [1, 0] student, [0, 1] teacher
    scores = disc(inputs)
    loss = F.binary_cross_entropy_with_logits(scores.float(), targets)
    accuracy = (scores.argmax(1) == is_teacher).float().mean().detach()
    return loss, accuracy, (scores > 0).float().mean().detach()


def cutmix_official(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, tuple, torch.Tensor]:
    """The official ``--w-cutmix`` paste (``train.py`` with ``utils.rand_bbox``), probability 1, beta 1.

    Draw order: lambda ~ Beta(1, 1), a ``randperm`` partner, the box centre along dim 2, then along dim 3 (the
    official ``cx``, ``cy``). The box is pasted into the batch tensor that the student *and* the teachers then see;
    lambda is not used for the loss (the teachers label the mixed image).

    Args:
        images: (B, C, H, W).
    Returns:
        ``(mixed, box, partner)``: the mixed batch (a new tensor), ``(yl, yh, xl, xh)`` and the (B,) permutation.
    """
    H, W = images.shape[-2:]
    lam = float(sample_beta(1.0, 1, generator)[0])
    partner = randperm_partner(images.shape[0], generator)
    cy = int(torch.randint(H, (1,), generator=generator))
    cx = int(torch.randint(W, (1,), generator=generator))
    box, _ = cutmix_box(lam, cy, cx, (H, W))
    return paste_box(images, partner, box), box, partner


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _expand(path: str) -> str:
    expanded = os.path.expandvars(str(path))
    if "$" in expanded:
        raise ReproError(f"path {path!r} names an unset environment variable; set it (e.g. REPRO_DATA_DIR) or "
                         "write the path out.")
    return expanded


def unwrap(model: nn.Module) -> nn.Module:
    """The student under DDP (``module``) and torch.compile (``_orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# ----------------------------------------------------------------------------------------------- the method
@register_method("mealv2")
class MealV2(Method):
    """MEAL V2's step: ensemble soft targets, no hard label, a logit discriminator trained jointly; the student
    starts from the weights named by ``init`` (loaded in `check_model`).

    The proxy plan's CE arm (cross-entropy continued from the same weights and schedule) is this method with
    ``kd_weight: 0, discriminator: false, hard_label_weight: 1`` and no teachers: same start, same code path.
    """

    @dataclass
    class Params:
        # {run: <run folder of the shared trainer>} or {checkpoint: <file>, sha256: <hex prefix, optional>};
        # {} keeps the seed's random initialisation (arm f of the proxy plan)
        init: dict = field(default_factory=dict)
        # each {run: <run folder>} (a pipeline-trained teacher; ema: true for its EMA weights) or
        # {model: <timm name>, checkpoint: <file>, kwargs: {...}} (local weights, nothing downloaded)
        teachers: list = field(default_factory=list)
        kd_weight: float = 1.0  # official 1; 0 with no teachers and no D: CE from the same start (arm a)
        discriminator: bool = True  # false: ensemble KD alone (arm b)
        disc_weight: float = 1.0  # official 1 (L = L_kd + L_D)
        disc_grad: str = "joint"  # joint (official) | reversed | detached
        disc_lr: str = "follow_student"  # follow_student (official, D's lr overwritten: issue #9) | fixed
        disc_fixed_lr: float = 1.0e-4  # official --d_lr, used with disc_lr=fixed
        disc_widths: Any = "default"  # default | literal (official C//8, C//64) | [w1, w2]
        disc_input: str = "logits"  # logits (train.py) | probs (FKD_train.py: softmaxes on both sides)
        hard_label_weight: float = 0.0  # official 0; L += w * CE(z_s, y)
        cutmix: bool = False  # official --w-cutmix (probability 1, Beta(1, 1), randperm partner)

    def __init__(self, params, num_classes, label_smoothing=0.0, task="classification"):
        super().__init__(params, num_classes, label_smoothing, task)
        if task != "classification":
            raise ReproError("method 'mealv2' distils class probabilities; it needs a classification dataset.")
        p = self.params
        init = dict(p.init or {})
        if init and not (set(init) <= {"run", "checkpoint", "sha256"} and ("run" in init) != ("checkpoint" in init)):
            raise ReproError(f"method.init must be {{run: <folder>}} or {{checkpoint: <file>, sha256: <prefix>}}, "
                             f"got {p.init!r}.")
        for key, allowed in (("disc_grad", DISC_GRADS), ("disc_lr", DISC_LRS), ("disc_input", DISC_INPUTS)):
            if getattr(p, key) not in allowed:
                raise ReproError(f"method.{key} must be one of {', '.join(allowed)}, got {getattr(p, key)!r}.")
        if self.needs_teachers and not p.teachers:
            raise ReproError("method.teachers is empty: MEAL V2 needs at least one teacher ({run: <folder>} or "
                             "{model: <timm name>, checkpoint: <file>}); only kd_weight=0 with discriminator=false "
                             "(plain CE from the start) runs without.")
        if not self.needs_teachers and (p.teachers or not p.hard_label_weight):
            raise ReproError("kd_weight=0 with discriminator=false is the CE arm: give it no teachers and "
                             "hard_label_weight > 0.")
        for spec in p.teachers:
            ok = isinstance(spec, dict) and (
                ("run" in spec and set(spec) <= {"run", "ema"})
                or ({"model", "checkpoint"} <= set(spec) and set(spec) <= {"model", "checkpoint", "kwargs"}))
            if not ok:
                raise ReproError(f"method.teachers entry {spec!r} must be {{run: <folder>}} or {{model: <timm name>, "
                                 "checkpoint: <file>}}.")
        self.teachers: list = []  # a plain list: never in the student's modules, state dict or optimiser
        self.teacher_notes: list[str] = []
        self.init_record: dict = {}
        self._disc_momentum: dict[str, torch.Tensor] = {}

    @property
    def needs_teachers(self) -> bool:
        return bool(self.params.kd_weight) or self.params.discriminator

    def inputs(self) -> list[str]:
        """The pipeline's runs this one reads (their metrics.json): the start and the teachers trained by the
        workflow. Checkpoint files are not listed: no rule makes them (checked when the run starts)."""
        runs = [self.params.init["run"]] if "run" in (self.params.init or {}) else []
        runs += [spec["run"] for spec in self.params.teachers if "run" in spec]
        return [f"{run}/metrics.json" for run in runs]

    def load_init(self, model: nn.Module) -> None:
        """Load the starting weights into `model`; record the file and its SHA-256 (logged in ``method_stats``)."""
        from common.teacher import load_checkpoint_weights, load_teacher_run

        init = self.params.init or {}
        if "run" in init:
            teacher, _ = load_teacher_run(init["run"])  # its checks: finished run, checkpoint present, safe load
            try:
                model.load_state_dict(teacher.model.state_dict())
            except RuntimeError as err:
                raise ReproError(f"the weights of run {init['run']} do not fit this student "
                                 f"({str(err).splitlines()[0]}); the init run must train the same model.") from None
            path = Path(init["run"]) / "checkpoint" / "last.pt"
        elif "checkpoint" in init:
            path = Path(_expand(init["checkpoint"]))
            if path.is_file() and init.get("sha256"):
                found = file_sha256(path)
                if not found.startswith(str(init["sha256"]).lower()):
                    raise ReproError(f"student checkpoint {path} has SHA-256 {found[:16]}..., not the expected "
                                     f"{init['sha256']}...: it is another file than the one the config names.")
            load_checkpoint_weights(model, path, what="student checkpoint")
        else:
            return
        self.init_record = {"init_file": str(path), "init_sha256": file_sha256(path)}

    # -- set-up
    def prepare(self, train_dataset, info) -> None:
        """Load and freeze the teachers; they must expect the student's input tensor (official: same tensor)."""
        from common.teacher import load_teacher_checkpoint, load_teacher_run

        self.teachers, self.teacher_notes = [], []
        for spec in self.params.teachers:
            if "run" in spec:
                teacher, _ = load_teacher_run(spec["run"], use_ema=bool(spec.get("ema", False)))
                same = (tuple(teacher.mean) == tuple(info.mean) and tuple(teacher.std) == tuple(info.std)
                        and teacher.image_size == info.image_size)
                if not same:
                    raise ReproError(
                        f"teacher run {spec['run']} was trained on inputs of size {teacher.image_size} normalised "
                        f"with {teacher.mean}/{teacher.std}, the student's are {info.image_size}, {info.mean}/"
                        f"{info.std}: MEAL V2 feeds the teachers the student's tensor; train the teacher with the "
                        "student's data recipe.")
            else:
                teacher = load_teacher_checkpoint(spec["model"], _expand(spec["checkpoint"]), self.num_classes,
                                                  info.image_size, info.mean, info.std, spec.get("kwargs"))
            self.teachers.append(teacher.model)
            self.teacher_notes.append(teacher.description)

    def check_model(self, model) -> None:
        """Load the starting weights, then register D as the student's submodule ``mealv2_discriminator``, so the
        trainer's optimiser, schedule, device placement, checkpoint and resume cover it (official: one SGD over
        the student and D, D's lr overwritten by the regime's)."""
        student = unwrap(model)
        self.load_init(student)
        if not self.params.discriminator:
            return
        widths = discriminator_widths(self.num_classes, self.params.disc_widths)
        # D's init: a generator seeded from the trainer's seeded global stream (model init is seed-determined)
        seed = int(torch.randint(0, 2**62, (1,)))
        disc = LogitDiscriminator(self.num_classes, widths, torch.Generator().manual_seed(seed))
        student.add_module(DISC_ATTR, disc)
        if self.params.disc_lr == "fixed":
            if torch.distributed.is_available() and torch.distributed.is_initialized() \
                    and torch.distributed.get_world_size() > 1:
                raise ReproError("method.disc_lr=fixed updates D inside the backward pass of one process; train it "
                                 "with one process, or use disc_lr=follow_student (official).")
            for name, param in disc.named_parameters():
                param.register_post_accumulate_grad_hook(self._fixed_lr_update(name))

    def _fixed_lr_update(self, name: str):
        """D's own SGD (lr disc_fixed_lr, momentum 0.9, no weight decay: official ``create_optimizer`` for D's
        group), applied as soon as the parameter's gradient is ready; the gradient is then dropped so the
        trainer's optimiser skips it. One update per backward: use train.grad_accum=1 with this option."""

        def hook(param: torch.Tensor) -> None:
            with torch.no_grad():
                buf = self._disc_momentum.get(name)
                if buf is None:
                    buf = param.grad.detach().clone()  # torch SGD: the first step's buffer is the gradient
                else:
                    buf = buf.to(param.device).mul_(0.9).add_(param.grad)  # (a resumed buffer comes on the CPU)
                self._disc_momentum[name] = buf
                param.add_(buf, alpha=-self.params.disc_fixed_lr)
            param.grad = None

        return hook

    # -- one step
    def teacher_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each frozen teacher's logits on `images` (B, C, H, W) -> K tensors (B, C)."""
        outs = []
        with torch.no_grad():
            for i, teacher in enumerate(self.teachers):
                if next(teacher.parameters()).device != images.device:
                    self.teachers[i] = teacher = teacher.to(images.device)
                outs.append(teacher(images).float())
        return outs

    def step(self, model, batch, ctx):
        """One official step (``train_for_one_epoch``): [CutMix the batch], teachers and student on the same tensor,
        ``L = kd_weight * L_kd + disc_weight * L_D [+ hard_label_weight * CE]``; the trainer runs one backward and
        one optimiser step over the student and D."""
        images, labels = batch
        p = self.params
        if p.cutmix:
            images = cutmix_official(images, ctx.generator)[0]
        logits = model(images)
        out, loss = {"logits": logits}, logits.new_zeros((), dtype=torch.float32)
        if self.needs_teachers:
            teacher_probs, teacher_mean_logits = ensemble_targets(self.teacher_logits(images))
            out["teacher_top1"] = (teacher_probs.argmax(1) == labels).float().mean()
        if p.kd_weight:
            loss_kd = distillation_loss(logits, teacher_probs)
            loss = loss + p.kd_weight * loss_kd
            out["loss_kd"] = loss_kd.detach()
        if p.discriminator:
            disc = getattr(unwrap(model), DISC_ATTR)
            if p.disc_lr == "fixed" and logits.dtype == torch.float16:
                raise ReproError("method.disc_lr=fixed cannot run under fp16 loss scaling (D's own update would see "
                                 "scaled gradients); use train.precision=bf16 or no.")
            if p.disc_input == "probs":
                student_in, teacher_in = logits.float().softmax(1), teacher_probs
            else:
                student_in, teacher_in = logits, teacher_mean_logits
            loss_d, disc_acc, disc_active = discriminator_loss(disc, student_in, teacher_in, p.disc_grad)
            loss = loss + p.disc_weight * loss_d
            out.update(loss_d=loss_d.detach(), disc_acc=disc_acc, disc_active=disc_active)
        if p.hard_label_weight:
            loss_ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
            loss = loss + p.hard_label_weight * loss_ce
            out["loss_ce"] = loss_ce.detach()
        out["loss"] = loss
        return out

    def mix(self, images, labels, generator):
        """For the figures: the images the student and teachers see (CutMix pasted when ``cutmix``); the targets
        shown are the one-hot labels, since the real targets come from the teachers."""
        if self.params.cutmix:
            images = cutmix_official(images, generator)[0]
        return images, smooth_one_hot(labels, self.num_classes, 0.0)

    def epoch_stats(self) -> dict | None:
        """The start's file and SHA-256 and the teachers' origins, logged every epoch (method_stats)."""
        return {**self.init_record, "teachers": list(self.teacher_notes)}

    def state_dict(self) -> dict:
        return {"disc_momentum": {k: v.detach().cpu() for k, v in self._disc_momentum.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._disc_momentum = dict(state.get("disc_momentum", {}))
