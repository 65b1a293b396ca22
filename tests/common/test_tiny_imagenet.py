"""Tiny-ImageNet in the registry (every accepted layout, built here from synthetic 64x64 JPEGs), the
per-class validation split RankMixup uses on it, and the device fast path at 64 px."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from common.data import DATA_ROOT_ENV, build_splits
from common.errors import ReproError
from common.fastdata import DeviceLoader, augment, decode_uint8

WNIDS = [f"n{i:08d}" for i in range(200)]
TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 1


def jpeg(rng: np.random.Generator, label: int, gray: bool = False) -> bytes:
    """A 64x64 JPEG whose mean brightness encodes the label (so a mix-up of labels would show)."""
    pixels = rng.integers(0, 40, (64, 64, 3)) + (label % 200)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    (image.convert("L") if gray else image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def original_layout(tmp_path, monkeypatch):
    """$REPRO_DATA_DIR/tiny-imagenet/tiny-imagenet-200 as the official zip extracts (wnids.txt unsorted)."""
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "data"))
    root = tmp_path / "data" / "tiny-imagenet" / "tiny-imagenet-200"
    rng = np.random.default_rng(0)
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(reversed(WNIDS)) + "\n")
    annotations = []
    for label, wnid in enumerate(WNIDS):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for k in range(TRAIN_PER_CLASS):
            (folder / f"{wnid}_{k}.JPEG").write_bytes(jpeg(rng, label, gray=(label == 7 and k == 0)))
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
        name = f"val_{label}.JPEG"
        (root / "val" / "images" / name).write_bytes(jpeg(rng, label))
        annotations.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    return root


def test_original_zip_layout(original_layout):
    train, val, test, info = build_splits("tiny-imagenet", allow_download=False)
    assert val is None
    assert (info.num_classes, info.image_size, info.native_size, info.recipe) == (200, 64, 64, "pad_crop_flip")
    assert info.classes == tuple(WNIDS)  # sorted wnids, whatever wnids.txt's order
    assert len(train) == 200 * TRAIN_PER_CLASS and len(test) == 200
    assert info.source.startswith("tiny-imagenet-200:")
    image, label = test[5]
    assert image.shape == (3, 64, 64) and label == 5
    # the label is in the pixels: mean brightness ~ label + 20 (before normalisation)
    pixels = np.asarray(test.base[5][0], dtype=np.float64)
    assert abs(pixels.mean() - (5 + 19.5)) < 3
    assert np.asarray(train.base[7 * TRAIN_PER_CLASS][0]).shape == (64, 64, 3)  # grayscale made RGB


def test_parquet_layout_with_valid_split(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    folder = tmp_path / "tiny"
    (folder / "data").mkdir(parents=True)
    for split, per_class in (("train", 2), ("valid", 1)):
        labels = np.repeat(np.arange(200), per_class)
        table = pa.table({"image": [{"bytes": jpeg(rng, int(y)), "path": None} for y in labels],
                          "label": labels})
        pq.write_table(table, folder / "data" / f"{split}-00000-of-00001.parquet")
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    train, _, test, info = build_splits("tiny-imagenet", root=str(folder), allow_download=False)
    assert (len(train), len(test)) == (400, 200)
    assert info.source.startswith("parquet:")
    assert int(test[10][1]) == 10


def test_image_folder_layout_and_wrong_class_count(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for wnid in WNIDS[:5]:
            (tmp_path / split / wnid).mkdir(parents=True)
            (tmp_path / split / wnid / "a.jpg").write_bytes(jpeg(rng, 0))
    with pytest.raises(ReproError, match="5 class folders.*200"):
        build_splits("tiny-imagenet", root=str(tmp_path), allow_download=False)


def test_missing_copy_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    with pytest.raises(ReproError, match=r"tiny-imagenet-200\.zip.*tiny-imagenet/"):
        build_splits("tiny-imagenet", allow_download=False)


def test_malformed_annotations_are_named(original_layout):
    (original_layout / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\n")
    with pytest.raises(ReproError, match="val_annotations.txt has a malformed line"):
        build_splits("tiny-imagenet", allow_download=False)


def test_per_class_validation_split(original_layout):
    train, val, _, _ = build_splits("tiny-imagenet", allow_download=False, val_split=200, split_seed=3,
                                    val_per_class=True)
    assert (len(train), len(val)) == (400, 200)
    val_labels = np.asarray(val.dataset.base.targets)[val.indices]
    assert np.array_equal(np.bincount(val_labels, minlength=200), np.ones(200))
    assert not set(train.indices) & set(val.indices)
    # seeded: the same seed gives the same split, another seed another one
    again = build_splits("tiny-imagenet", allow_download=False, val_split=200, split_seed=3, val_per_class=True)[1]
    other = build_splits("tiny-imagenet", allow_download=False, val_split=200, split_seed=4, val_per_class=True)[1]
    assert again.indices == val.indices and other.indices != val.indices


def test_per_class_split_equals_a_longhand_shuffle_per_class():
    """Within each class: order by the seeded random key, keep the last `k` as validation."""
    from common.data import _split_indices

    targets = np.array([2, 0, 1, 0, 2, 1, 0, 1, 2, 2, 0, 1])
    train_idx, val_idx = _split_indices(len(targets), 6, 5, "toy", targets)
    keys = torch.rand(len(targets), generator=torch.Generator().manual_seed(5)).numpy()
    want = []
    for c in range(3):
        members = sorted(np.flatnonzero(targets == c), key=lambda i: keys[i])
        want += members[-2:]
    assert val_idx == sorted(int(i) for i in want)
    assert sorted(train_idx + val_idx) == list(range(len(targets)))


def test_per_class_split_rejects_an_uneven_size(original_layout):
    with pytest.raises(ReproError, match="multiple of the 200 classes"):
        build_splits("tiny-imagenet", allow_download=False, val_split=250, val_per_class=True)


def test_fast_path_at_64_px_equals_torchvision(original_layout, cache_in_tmp):
    train, _, _, info = build_splits("tiny-imagenet", allow_download=False)
    images, labels = decode_uint8(train)
    assert images.shape == (600, 3, 64, 64) and labels.tolist() == list(train.base.targets)
    rows, cols = torch.tensor([0, 8, 3]), torch.tensor([8, 0, 5])
    flips = torch.tensor([True, False, True])
    ours = augment(images[:3], rows, cols, flips, info.mean, info.std, padding=4)
    for b in range(3):
        img = TF.crop(TF.pad(train.base[b][0], 4, fill=0), int(rows[b]), int(cols[b]), 64, 64)
        img = TF.hflip(img) if flips[b] else img
        assert torch.allclose(ours[b], TF.normalize(TF.to_tensor(img), info.mean, info.std), atol=1e-6)
    loader = DeviceLoader(train, info, batch_size=100, device="cpu")
    x, y = next(iter(loader.epoch(torch.Generator().manual_seed(0))))
    assert x.shape == (100, 3, 64, 64) and y.shape == (100,)


def test_fast_path_refuses_a_resized_recipe(original_layout, cache_in_tmp):
    train, _, _, info = build_splits("tiny-imagenet", allow_download=False, recipe="deit", image_size=96)
    with pytest.raises(ReproError, match="native size"):
        DeviceLoader(train, info, batch_size=10, device="cpu")


def test_cache_key_follows_the_files_of_an_image_folder(tmp_path, monkeypatch, cache_in_tmp):
    """ImageFolder copies are keyed by each file's path, size and mtime: a replaced file is decoded again."""
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    rng = np.random.default_rng(3)
    for split in ("train", "test"):
        for c in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"):
            (tmp_path / "c10" / split / c).mkdir(parents=True)
            image = Image.fromarray(rng.integers(0, 255, (32, 32, 3)).astype(np.uint8))
            image.save(tmp_path / "c10" / split / c / "0.png")
    train = build_splits("cifar10", root=str(tmp_path / "c10"), allow_download=False)[0]
    first, _ = decode_uint8(train)
    path = tmp_path / "c10" / "train" / "cat" / "0.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse-clock file systems
    second, _ = decode_uint8(train)
    assert len(list((tmp_path / "cache").glob("decoded-*.pt"))) == 2
    assert not torch.equal(first, second) and int(second[3].sum()) == 0


def test_rankmixup_tiny_imagenet_config_trains_on_the_fast_path(original_layout, cache_in_tmp, tmp_path):
    """The paper-scale config end to end (per-class split, device cache, MRL) with a CPU-sized model."""
    import json
    from pathlib import Path

    from common.train import main

    config = Path(__file__).resolve().parents[2] / "papers/rankmixup/configs/paper/tiny_imagenet.yaml"
    out = tmp_path / "run"
    assert main(["--config", str(config), "--method", "mrl", "--output", str(out), "train.epochs=1",
                 "train.max_steps_per_epoch=2", "train.batch_size=16", "data.num_workers=0",
                 "data.val_split=200", "data.device_cache=true", "model.name=preact_resnet18_cifar",
                 "model.kwargs.width=8"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["select"] == "best_val" and 0 <= metrics["final"]["top1"] <= 100
    assert len(list((tmp_path / "cache").glob("decoded-*.pt"))) == 1
