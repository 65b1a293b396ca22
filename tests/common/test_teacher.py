"""common.teacher: safe loading with an allow-list, a frozen teacher from a trainer run or a local checkpoint."""

import json
import os
import random

import numpy as np
import pytest
import torch

import papers  # noqa: F401  (registers resnet20_cifar)
from common.config import dump_yaml, load_config
from common.errors import ReproError
from common.models import build_model
from common.teacher import TRAINER_CHECKPOINT_GLOBALS, load_teacher_checkpoint, load_teacher_run, safe_load


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_safe_load_allows_only_what_is_listed(tmp_path):
    path = tmp_path / "arrays.pt"
    torch.save({"a": np.arange(3, dtype=np.float32)}, path)
    with pytest.raises(ReproError, match="refusing to load"):  # NumPy arrays are not allowed by default
        safe_load(path)
    assert np.array_equal(safe_load(path, TRAINER_CHECKPOINT_GLOBALS)["a"], np.arange(3, dtype=np.float32))
    marker = tmp_path / "ran"
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ReproError, match="refusing to load"):
        safe_load(tmp_path / "evil.pt", TRAINER_CHECKPOINT_GLOBALS)
    assert not marker.exists()
    with pytest.raises(ReproError, match="does not exist"):
        safe_load(tmp_path / "missing.pt")


def test_teacher_from_a_local_checkpoint_is_frozen_and_keeps_its_weights(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet20_cifar", num_classes=10)
    path = tmp_path / "teacher.pth"
    # DataParallel-style names under 'state_dict', as released teachers often are
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    teacher = load_teacher_checkpoint("resnet20_cifar", path, 10, 32, (0.5,) * 3, (0.25,) * 3)
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(teacher.model.state_dict()[key], value)
    assert teacher.image_size == 32 and teacher.std == (0.25,) * 3
    with pytest.raises(ReproError, match="do not fit"):
        load_teacher_checkpoint("resnet20_cifar", path, 100, 32, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ReproError, match="nothing is downloaded"):
        load_teacher_checkpoint("resnet20_cifar", tmp_path / "absent.pth", 10, 32, (0.5,) * 3, (0.25,) * 3)


def test_teacher_from_a_trainer_run_reads_its_checkpoint_with_weights_only(tmp_path):
    cfg = load_config(None, ["data.name=cifar10-mini", "data.recipe=rrc_flip", "model.name=resnet20_cifar"])
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    torch.manual_seed(1)
    model = build_model("resnet20_cifar", num_classes=10)
    with pytest.raises(ReproError, match="has not finished"):
        load_teacher_run(run)
    (run / "metrics.json").write_text(json.dumps({"final": {"top1": 10.0}}))
    with pytest.raises(ReproError, match="not committed"):
        load_teacher_run(run)
    # what common.train saves: weights, optimiser, history and every RNG state (NumPy's is a uint32 array)
    torch.save({"model": model.state_dict(), "optimizer": {}, "history": [{"epoch": 1, "lr": np.float64(0.1)}],
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
                "ema": None}, run / "checkpoint" / "last.pt")
    teacher, loaded_cfg = load_teacher_run(run)
    assert loaded_cfg.model.name == "resnet20_cifar"
    assert teacher.image_size == 32 and teacher.mean == pytest.approx((0.485, 0.456, 0.406))  # rrc_flip: ImageNet
    assert not teacher.model.training
    for key, value in model.state_dict().items():
        assert torch.equal(teacher.model.state_dict()[key], value)
