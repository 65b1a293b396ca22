"""A small prepared ICM arm for the method-contract tests (tests/common/test_method_contract.py)."""

from __future__ import annotations

import torch

from common.data import DataInfo
from common.methods import build_method
from common.models import build_model
from papers.icm.data import CLLTrainSet


def contract_setup(num_classes: int = 10, method: str = "icm_mix", batch: int = 16, clusters: int = 3):
    """(method, model, batch) on random 28x28 images: CLs != labels, `clusters` cluster ids."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 784, generator=g)
    labels = torch.randint(num_classes, (batch,), generator=g)
    complementary = (labels + torch.randint(1, num_classes, (batch,), generator=g)) % num_classes
    ids = torch.randint(clusters, (batch,), generator=g)
    dataset = CLLTrainSet(images, complementary.numpy(), labels.numpy(), ids.numpy(), purity=float("nan"))
    info = DataInfo(name="toy-cll", task="classification", num_classes=num_classes, image_size=28, mean=None,
                    std=None, source="test")
    arm = build_method({"name": method}, num_classes=num_classes)
    arm.prepare(dataset, info)
    torch.manual_seed(0)
    model = build_model("mlp_cll", num_classes=num_classes, hidden_dim=32)
    return arm, model, (images, dataset.targets)
