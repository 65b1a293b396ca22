"""A tiny FKD setup for the method-contract tests (tests/common/test_method_contract.py): the `fkd` method trains
on a stored label set and takes (B, n_crops, C, H, W) batches, so the generic image batch does not fit it."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from common.methods import build_method
from common.models import build_model
from papers.ferkd.labels import RegionLabels, quantize_soft_labels, write_manifest
from papers.ferkd.method import fkd_passes
from papers.ferkd.regions import draw_regions


class _Images:
    def __init__(self, targets, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.items = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in targets]
        self.targets = np.asarray(targets)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index], int(self.targets[index])


def contract_setup(num_classes: int = 10, images: int = 4, regions: int = 4, **options):
    """(method, model, batch): `fkd` with cross-image mixing and SelfMix on (so every step draws from the
    generator), prepared on a random 4-image label set, a 1-block CIFAR ViT, and one batch of its loader."""
    rng = np.random.default_rng(0)
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(images * regions, num_classes))).float(), dim=1)
    _, fractions, flips = draw_regions(32, 32, images * regions, [0.2, 1.0], [3 / 4, 4 / 3],
                                       torch.Generator().manual_seed(0))
    targets = rng.integers(0, num_classes, images)
    labels = RegionLabels(np.arange(images), targets, np.arange(images + 1) * regions, fractions, flips,
                          quantize_soft_labels(probs, "marginal_smoothing_k5"),
                          np.tile(np.arange(regions, dtype=np.int32), images))
    folder = Path(tempfile.mkdtemp(prefix="fkd-contract-"))
    labels.save(folder / "shard_00000.npz")
    write_manifest(folder, [folder / "shard_00000.npz"], {"label_type": "marginal_smoothing_k5",
                                                          "num_classes": num_classes, "dataset": "toy",
                                                          "num_images": images})
    method = build_method({"name": "fkd", "labels": str(folder / "manifest.json"), "n_crops": 2,
                           "mixup_cutmix": True, "selfmix": True, **options}, num_classes=num_classes)
    train_ds = SimpleNamespace(base=_Images(targets))
    info = SimpleNamespace(num_classes=num_classes, name="toy", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    method.prepare(train_ds, info)
    data = method.train_dataset(train_ds, info, fkd_passes(4, 2, 8)[0])
    torch.manual_seed(0)
    items = [data[i] for i in range(images)]
    batch = (torch.stack([c for c, _ in items]), torch.stack([t for _, t in items]))
    torch.manual_seed(0)
    model = build_model("vit_tiny_patch4_32", num_classes=num_classes, depth=1).eval()
    return method, model, batch
