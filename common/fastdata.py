"""Fast path for small image datasets: decode once, keep uint8 images on the device, augment there.

For CIFAR- and Tiny-ImageNet-sized data the standard path (PIL decode + torchvision transforms in DataLoader
workers) leaves a GPU mostly idle. Here the training split is decoded once into a uint8 tensor, cached on
disk under a key made from the data itself (the encoded bytes, or each file's path, size and modification
time, so a changed file can never reuse a stale cache), moved to the device, and each batch is augmented
there with the pad-crop-flip recipe: zero padding 4, a uniform random crop at the native size (torchvision
`RandomCrop.get_params`: offsets uniform in {0, ..., 2 * pad}), a horizontal flip with probability 1/2,
scaling to [0, 1] and per-channel normalisation: the same law as `common.data`'s 'pad_crop_flip' / 'cifar' /
'mixup_official' recipes. All draws come from a CPU generator seeded per epoch, so runs stay exactly
resumable.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from common.data import PAD_CROP_FLIP
from common.errors import ReproError

CACHE_ENV = "REPRO_CACHE_DIR"
PADDING = 4  # at the native size, as the standard path's RandomCrop(size, padding=4)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "mixrepro"))


def _base_and_indices(dataset):
    """Unwrap Subset layers down to the encoded-image dataset; returns (images_with_targets, indices)."""
    indices = None
    while isinstance(dataset, Subset):
        sub = np.asarray(dataset.indices)
        indices = sub if indices is None else sub[indices]
        dataset = dataset.dataset
    base = getattr(dataset, "base", None)
    if base is None or not hasattr(base, "targets"):
        raise ReproError("data.device_cache works for image datasets read through common.data (CIFAR, "
                         f"Tiny-ImageNet); got {type(dataset).__name__}. Set data.device_cache=false.")
    return base, (np.arange(len(base)) if indices is None else indices)


def _key(base, indices) -> str:
    digest = hashlib.sha256()
    if getattr(base, "_buffer", None) is not None:  # the encoded bytes themselves (parquet, hub, files)
        digest.update(memoryview(base._buffer))
    elif isinstance(getattr(base, "data", None), np.ndarray):  # torchvision's CIFAR: the decoded array
        digest.update(np.ascontiguousarray(base.data).tobytes())
    elif getattr(base, "samples", None) is not None:  # ImageFolder: every file's path, size and mtime
        for path, _ in base.samples:
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    else:
        raise ReproError(f"data.device_cache cannot key a cache on {type(base).__name__} (no bytes, array or "
                         "file list to hash); set data.device_cache=false.")
    digest.update(np.asarray(base.targets, dtype=np.int64).tobytes())
    digest.update(np.asarray(indices, dtype=np.int64).tobytes())
    return digest.hexdigest()[:24]


def decode_uint8(dataset, use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of `dataset` as uint8 (N, 3, H, W) and labels (N,), decoded once and cached on disk."""
    base, indices = _base_and_indices(dataset)
    path = cache_dir() / f"decoded-{_key(base, indices)}.pt"
    if use_cache and path.exists():
        try:
            cached = torch.load(path, weights_only=True)
            return cached["images"], cached["labels"]
        except (RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError) as err:
            # a damaged cache is only a miss: decode again and replace it
            warnings.warn(f"device cache {path} is unreadable ({type(err).__name__}: {err}); decoding again.",
                          stacklevel=2)
    first = np.asarray(base[int(indices[0])][0])
    images = np.empty((len(indices), *first.shape), dtype=np.uint8)
    for row, index in enumerate(indices):  # once per dataset, then never again
        image = np.asarray(base[int(index)][0])
        if image.shape != first.shape:
            raise ReproError(f"image {int(index)} of the training set is {image.shape[1]}x{image.shape[0]}, not "
                             f"{first.shape[1]}x{first.shape[0]} like the others; data.device_cache needs one "
                             "image size: set data.device_cache=false.")
        images[row] = image
    labels = torch.as_tensor(np.asarray(base.targets, dtype=np.int64)[indices])
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        # packed runs may decode the same data at once: each writes its own temporary file, and the atomic
        # rename leaves one complete cache whoever finishes last
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            torch.save({"images": tensor, "labels": labels}, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return tensor, labels


def draw_crops(generator: torch.Generator, batch_size: int, padding: int):
    """Crop offsets (rows, cols) uniform in {0..2*padding} and flip flags with probability 1/2."""
    offsets = torch.randint(0, 2 * padding + 1, (2, batch_size), generator=generator)
    flips = torch.rand(batch_size, generator=generator) < 0.5
    return offsets[0], offsets[1], flips


def augment(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, flips: torch.Tensor,
            mean, std, padding: int = 4) -> torch.Tensor:
    """Pad-crop-flip-normalise a uint8 batch on its device.

    Args:
        images: (B, C, H, W) uint8.
        rows, cols: (B,) crop offsets into the zero-padded image; flips: (B,) bool.
    Returns:
        (B, C, H, W) float32, normalised.
    """
    B, C, H, W = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    r = rows.to(device).view(B, 1, 1) + torch.arange(H, device=device).view(1, H, 1)
    c = cols.to(device).view(B, 1, 1) + torch.arange(W, device=device).view(1, 1, W)
    c = torch.where(flips.to(device).view(B, 1, 1), c.flip(-1), c)  # flipping after the crop = reversed columns
    batch = torch.arange(B, device=device).view(B, 1, 1)
    crops = padded.permute(0, 2, 3, 1)[batch, r, c]  # (B, H, W, C)
    # contiguous NCHW, as the DataLoader path hands out: the permuted view is channels-last, and torch 2.14's CPU
    # convolution backward segfaults on channels-last 64-px batches on AVX-512 hosts (train.channels_last opts in)
    out = crops.permute(0, 3, 1, 2).contiguous().float().div_(255.0)
    mean = torch.tensor(mean, device=device).view(1, C, 1, 1)
    std = torch.tensor(std, device=device).view(1, C, 1, 1)
    return out.sub_(mean).div_(std)


class DeviceLoader:
    """Batches of augmented training images made on the device from a resident uint8 copy.

    Per epoch: one permutation of the training set and one crop/flip draw per position of it, all from a CPU
    generator seeded by the caller with the same seed on every process. Global batch i is positions
    [i * B, (i + 1) * B) of the permutation (B = batch_size * world) and process r takes its r-th block of
    batch_size, as the trainer's GlobalBatchSampler: the processes together train on exactly the augmented
    batches one process with batch B would, and each image keeps the crop drawn for its position. The last
    incomplete global batch is dropped.
    """

    def __init__(self, dataset, info, batch_size: int, device, rank: int = 0, world: int = 1):
        if info.recipe not in PAD_CROP_FLIP or info.image_size != info.native_size:
            raise ReproError(f"data.device_cache supports the recipes {PAD_CROP_FLIP} at the images' native size, "
                             f"not recipe {info.recipe!r} at {info.image_size} px (native: {info.native_size}); "
                             "set data.device_cache=false.")
        images, labels = decode_uint8(dataset)
        self.images, self.labels = images.to(device), labels.to(device)
        self.mean, self.std = info.mean, info.std
        self.batch_size, self.rank, self.world = batch_size, rank, world

    def __len__(self) -> int:
        return len(self.labels) // (self.world * self.batch_size)

    def epoch(self, generator: torch.Generator):
        order = torch.randperm(len(self.labels), generator=generator)
        rows, cols, flips = draw_crops(generator, len(order), padding=PADDING)
        global_batch = self.world * self.batch_size
        for step in range(len(self)):
            start = step * global_batch + self.rank * self.batch_size
            part = slice(start, start + self.batch_size)
            index = order[part].to(self.images.device)
            yield (augment(self.images[index], rows[part], cols[part], flips[part], self.mean, self.std,
                           padding=PADDING),
                   self.labels[index])
