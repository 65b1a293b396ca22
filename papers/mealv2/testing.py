"""A tiny MEAL V2 setup for the method-contract tests (tests/common/test_method_contract.py) and ours: the `mealv2`
method needs frozen teachers, which the generic setup cannot name, so this builds two small ones in memory."""

from __future__ import annotations

import torch
from torch import nn

from common.methods import build_method
from common.models import build_model
from common.teacher import freeze


def toy_teacher(num_classes: int, seed: int) -> nn.Module:
    """A frozen conv net with BatchNorm (eval mode: its running statistics must never move)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, num_classes))
    with torch.no_grad():  # non-trivial running statistics, so that train-mode BatchNorm would be visible
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return freeze(net)


def with_teachers(options: dict, num_classes: int, teachers: list[nn.Module]):
    """`mealv2` built from `options`, holding `teachers` as if `prepare` had loaded them from runs."""
    specs = [{"run": f"in-memory-teacher-{k}"} for k in range(len(teachers))]
    method = build_method({"name": "mealv2", "teachers": specs, **options}, num_classes=num_classes)
    method.teachers = list(teachers)
    method.teacher_notes = [f"in-memory toy teacher {k}" for k in range(len(teachers))]
    return method


def contract_setup(num_classes: int = 10, **options):
    """(method, model, batch): `mealv2` with the official CutMix on (so every step draws from the generator), two
    toy teachers, D attached to a 1-block CIFAR ViT, and one random batch."""
    method = with_teachers({"cutmix": True, **options}, num_classes,
                           [toy_teacher(num_classes, 1), toy_teacher(num_classes, 2)])
    torch.manual_seed(0)
    model = build_model("vit_tiny_patch4_32", num_classes=num_classes, depth=1).eval()
    method.check_model(model)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, num_classes, (8,), generator=g))
    return method, model, batch
