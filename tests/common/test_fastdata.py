"""The device-resident fast path: exact pixels, torchvision's augmentation law, a training run with it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision import transforms as T

from common.data import build_splits
from common.fastdata import DeviceLoader, augment, decode_uint8, draw_crops
from common.train import main

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "papers/mixup/configs/smoke/cifar10_preactresnet18.yaml"
TINY = ["model.kwargs.width=8", "train.batch_size=50", "data.num_workers=0"]


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_CACHE_DIR", str(tmp_path / "cache"))


def test_decoded_pixels_equal_the_pil_images_and_are_cached(tmp_path):
    train, _, _, _ = build_splits("cifar10-mini")
    images, labels = decode_uint8(train)
    assert images.shape == (1000, 3, 32, 32) and images.dtype == torch.uint8
    base = train.base
    for i in (0, 17, 999):
        assert torch.equal(images[i], torch.from_numpy(np.array(base[i][0])).permute(2, 0, 1))
        assert int(labels[i]) == base[i][1]
    assert len(list((tmp_path / "cache").glob("decoded-*.pt"))) == 1
    again, _ = decode_uint8(train)
    assert torch.equal(again, images)


def test_augment_equals_torchvision_pad_crop_flip_normalise():
    train, _, _, info = build_splits("cifar10-mini")
    images, _ = decode_uint8(train)
    rows, cols = torch.tensor([0, 8, 3, 5]), torch.tensor([8, 0, 4, 1])
    flips = torch.tensor([False, True, True, False])
    ours = augment(images[:4], rows, cols, flips, info.mean, info.std)
    for b in range(4):
        pil = train.base[b][0]
        img = TF.crop(TF.pad(pil, 4, fill=0), int(rows[b]), int(cols[b]), 32, 32)
        if flips[b]:
            img = TF.hflip(img)
        want = TF.normalize(TF.to_tensor(img), info.mean, info.std)
        assert torch.allclose(ours[b], want, atol=1e-6)


def test_augmented_batches_are_contiguous_nchw_like_the_dataloader_path():
    """Same memory layout as the standard path: a channels-last batch takes other CPU kernels (torch 2.14's
    convolution backward segfaults on 64-px channels-last batches on AVX-512 hosts)."""
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    rows, cols, flips = torch.tensor([0, 4, 8]), torch.tensor([8, 4, 0]), torch.tensor([True, False, True])
    out = augment(images, rows, cols, flips, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert out.shape == (3, 3, 64, 64) and out.is_contiguous()
    centre = (images[1].float() / 255 - 0.5) / 0.25  # offset (4, 4) of a 4-padded image = the image itself
    assert torch.allclose(out[1], centre, atol=1e-6)


def test_crop_and_flip_law_matches_torchvision_random_crop():
    """Offsets uniform over {0..8} and flips with probability 1/2, like RandomCrop(32, 4) + RandomHorizontalFlip."""
    n = 9000
    rows, cols, flips = draw_crops(torch.Generator().manual_seed(0), n, padding=4)
    torch.manual_seed(0)
    tv = torch.tensor([T.RandomCrop.get_params(torch.zeros(3, 40, 40), (32, 32)) for _ in range(n)])
    for ours, theirs in ((rows, tv[:, 0]), (cols, tv[:, 1])):
        assert int(ours.min()) == int(theirs.min()) == 0 and int(ours.max()) == int(theirs.max()) == 8
        counts = torch.bincount(ours, minlength=9).double()
        chi2 = float(((counts - n / 9) ** 2 / (n / 9)).sum())
        assert chi2 < 26.1  # 8 degrees of freedom, p = 0.001
    assert abs(flips.double().mean().item() - 0.5) < 0.02


def test_device_loader_epoch_is_deterministic_and_covers_the_data():
    train, _, _, info = build_splits("cifar10-mini")
    loader = DeviceLoader(train, info, batch_size=100, device="cpu")
    batches = list(loader.epoch(torch.Generator().manual_seed(1)))
    again = list(loader.epoch(torch.Generator().manual_seed(1)))
    assert len(batches) == len(loader) == 10
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    labels = torch.cat([b[1] for b in batches])
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 100))


def test_training_with_the_device_cache(tmp_path):
    out = tmp_path / "run"
    assert main(["--config", str(SMOKE), "--method", "mixup", "--output", str(out), "train.epochs=1",
                 "data.device_cache=true", "train.max_steps_per_epoch=3", *TINY]) == 0
    assert json.loads((out / "metrics.json").read_text())["final"]["top1"] >= 0


def test_a_damaged_cache_is_decoded_again_and_replaced(tmp_path):
    train, _, _, _ = build_splits("cifar10-mini")
    images, _ = decode_uint8(train)
    (cached,) = (tmp_path / "cache").glob("decoded-*.pt")
    cached.write_bytes(cached.read_bytes()[:1000])  # a truncated file, as a killed writer could leave
    with pytest.warns(UserWarning, match="unreadable"):
        again, _ = decode_uint8(train)
    assert torch.equal(again, images)
    assert torch.equal(decode_uint8(train)[0], images)  # the replaced cache reads back without a warning
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_concurrent_decoders_leave_one_complete_cache(tmp_path):
    """Packed runs decode the same data at once: every writer uses its own temporary file."""
    import threading

    train, _, _, _ = build_splits("cifar10-mini")
    results, errors = [], []

    def decode():
        try:
            results.append(decode_uint8(train)[0])
        except Exception as err:  # noqa: BLE001 -- any failure in a thread must fail the test
            errors.append(err)

    threads = [threading.Thread(target=decode) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3 and all(torch.equal(r, results[0]) for r in results)
    assert len(list((tmp_path / "cache").glob("decoded-*.pt"))) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))
    assert torch.equal(decode_uint8(train)[0], results[0])
