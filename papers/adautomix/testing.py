"""The method-contract tests' setup for AdAutoMix (tests/common/test_method_contract.py, OWN_SETUP): the method
owns modules built from the model (`attach`), and needs a stem/stages CNN rather than the contract's ViT."""

import torch

from common.methods import build_method
from common.models import build_model


def contract_setup(num_classes: int = 10, batch: int = 8, **options):
    """(method, model, batch): a width-4 PreAct ResNet-18 on 32-px images, the method attached to it."""
    torch.manual_seed(0)
    model = build_model("preact_resnet18_cifar", num_classes=num_classes, width=4).eval()
    method = build_method({"name": "adautomix", **options}, num_classes=num_classes)
    method.attach(model)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, generator=g)
    return method, model, (images, torch.randint(0, num_classes, (batch,), generator=g))
