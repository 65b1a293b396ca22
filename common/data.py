"""Dataset registry: every dataset the papers train on, resolved from a local copy or its usual source.

`build_datasets(name, ...)` returns `(train_ds, eval_ds, info)`. Image datasets yield
`(image (C, H, W) float32 normalised, int label)`; regression datasets yield
`(features (D,) float32, target (1,) float32)` (time series: `(window (P, m), next values (m,))`).
Some datasets bring their own validation split and normalisation (C-Mixup's Airfoil here; NO2, the time
series and the out-of-distribution tables in `papers/cmixup/data.py`, specs/cmixup.md §3); `build_splits`
returns it as the validation split. A tabular split may carry a domain id per example (`TabularDataset.domains`),
from which the trainer reports per-domain errors. Papers register their own datasets with `register_dataset`
(the registry imports `papers` before any lookup).

Where the data comes from, in order (the first that exists wins, and `DataInfo.source` records it):

1. a local folder: the `root` argument (`data.root` in configs), else `$REPRO_DATA_DIR/<name>`;
2. the dataset's usual public source (Hugging Face hub, torchvision, UCI), when `allow_download`;
3. otherwise a `ReproError` naming every path tried and where to put the files.

Augmentation recipes (`RECIPES`, chosen by `recipe` / `data.recipe`): pad-4 crop + flip at the native size
('pad_crop_flip' = 'cifar', 'mixup_official'), timm's DeiT transform ('deit', 'deit_noerase', 'deit_bicubic_noerase'), and the
random-resized-crop recipes 'rrc_flip' and 'cutmix_imagenet' (with `PCALighting` and `TensorColorJitter`).

Image bytes stay encoded in memory and are decoded in `__getitem__`, as the Hugging Face and
torchvision ImageFolder loaders do, so CIFAR-10 costs ~57 MB of RAM rather than ~180 MB of arrays.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import inspect
import io
import json
import os
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from common.errors import ReproError, unknown_name

DATA_ROOT_ENV = "REPRO_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR10_MINI_DIR = REPO_ROOT / "tests" / "data" / "cifar10-mini"

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

# Per-channel statistics of the training images (0-1 scale).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
# facebookresearch/mixup-cifar10 train.py uses this std (a long-standing miscomputed value that
# many CIFAR repos copied); `recipe='mixup_official'` keeps it to match the official numbers.
MIXUP_OFFICIAL_MEAN, MIXUP_OFFICIAL_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)

# 'pad_crop_flip': zero-pad 4, random crop at the native size, horizontal flip (CIFAR's recipe, and
# RankMixup's for Tiny-ImageNet); 'cifar' is its historical name and means the same.
# 'rrc_flip': RandomResizedCrop + flip, ImageNet mean/std (ResizeMix's ImageNet recipe, OpenMixup's
# Tiny-ImageNet and ImageNet ones); 'cutmix_imagenet': the official CutMix ImageNet recipe (rrc_flip plus
# colour jitter and PCA lighting).
RECIPES = ("pad_crop_flip", "cifar", "mixup_official", "deit", "deit_noerase", "deit_bicubic_noerase", "rrc_flip",
           "cutmix_imagenet")
DEIT_RECIPES = {  # name: (random erasing probability, train interpolation)
    "deit": (0.25, "bicubic"),  # DeiT's datasets.py build_transform
    "deit_noerase": (0.0, "random"),  # timm 0.5.4 train.py defaults: the released TransMix recipe (transmix.md §3)
    "deit_bicubic_noerase": (0.0, "bicubic"),  # DeiT's code with --reprob 0: SMMix's fork (smmix.md §3)
}
PAD_CROP_FLIP = ("pad_crop_flip", "cifar", "mixup_official")
RANDOM_RESIZED_CROP = ("rrc_flip", "cutmix_imagenet")
# Evaluation of the random-resized-crop recipes: short side to size / 0.875, centre crop size (256 -> 224).
EVAL_CROP_FRACTION = 0.875
# ImageNet RGB PCA of AlexNet-style lighting noise (fb.resnet.torch, as in clovaai/CutMix-PyTorch train.py):
# eigenvalues, and eigenvectors as the columns of the matrix.
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))
AIRFOIL_URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/00291/airfoil_self_noise.dat"
AIRFOIL_FILE = "airfoil_self_noise.dat"
AIRFOIL_ROWS = 1503
AIRFOIL_SPLIT = (1003, 300, 200)  # C-Mixup src/data/airfoil.py: train / valid / test after the shuffle


@dataclass
class DataInfo:
    """What a training run needs to know about its data.

    Attributes:
        name: registry name.
        task: 'classification' or 'regression'.
        num_classes: number of classes, or the output dimension for regression.
        image_size: side of the (square) image tensors produced, None for tabular data.
        mean, std: normalisation applied (per channel for images, per feature for tabular data).
        source: where the data was read from, for provenance in results.
        classes: class names in label order, when known.
        recipe: the augmentation recipe in use, after resolving 'default' (None for tabular data).
        native_size: side of the stored images when they all share one (CIFAR 32, Tiny-ImageNet 64).
    """

    name: str
    task: str
    num_classes: int
    image_size: int | None
    mean: tuple | None
    std: tuple | None
    source: str
    classes: tuple[str, ...] | None = None
    recipe: str | None = None
    native_size: int | None = None


@dataclass
class _RawSplits:
    """What a registered builder returns: untransformed splits plus facts about them.

    Image splits yield `(PIL.Image RGB, int)`; tabular splits are `_Tabular`.
    """

    train: Any
    test: Any
    info: DataInfo
    default_recipe: str | None = None
    native_size: int | None = None  # side of the stored images when all share one (CIFAR: 32)
    # (mean, std) for the 'cifar' recipe; for tabular data the normalisation the dataset prescribes
    # (features become (x - mean) / std), instead of standardising on the training rows
    stats: tuple[tuple, tuple] | None = None
    val: Any = None  # the dataset's own validation split, if it has one (then val_split must be 0)
    # the splits are final torch Datasets (tensors, already normalised): no transforms are added (ICM's flat
    # MNIST-family images, whose augmentation runs batched on the device inside the method)
    ready: bool = False


_DATASETS: dict[str, Callable[..., _RawSplits]] = {}
_SEEDED_SPLITS: set[str] = set()


def register_dataset(name: str, seeded_split: bool = False) -> Callable:
    """Decorator registering `builder(root: Path | None, allow_download: bool) -> _RawSplits`.

    With `seeded_split`, the builder also takes `split_seed` (the dataset's own split is seeded, as
    C-Mixup's Airfoil permutation is).
    """

    def decorator(builder: Callable) -> Callable:
        if name in _DATASETS:
            raise ReproError(
                f"dataset {name!r} is registered twice ({_DATASETS[name].__module__} and "
                f"{builder.__module__}); rename one of them."
            )
        _DATASETS[name] = builder
        if seeded_split:
            _SEEDED_SPLITS.add(name)
        return builder

    return decorator


def _import_papers() -> None:
    import papers  # noqa: F401  (papers register their own datasets; late: papers import us)


def list_datasets() -> list[str]:
    """Registered dataset names (the papers' own included), sorted."""
    _import_papers()
    return sorted(_DATASETS)


# --------------------------------------------------------------------------------------------
# Dataset classes
# --------------------------------------------------------------------------------------------


class EncodedImages(Dataset):
    """Encoded images (JPEG/PNG bytes) in one contiguous buffer; yields `(PIL RGB image, label)`.

    One numpy buffer plus offsets instead of a list of `bytes` objects: DataLoader workers forked
    from the main process then share the pages instead of copying them on refcount updates.
    """

    def __init__(self, blobs: Sequence[bytes], targets: np.ndarray, origin: str):
        lengths = np.fromiter((len(b) for b in blobs), dtype=np.int64, count=len(blobs))
        self._offsets = np.concatenate([[0], np.cumsum(lengths)])
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.origin = origin

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        start, stop = self._offsets[index], self._offsets[index + 1]
        try:
            image = Image.open(io.BytesIO(self._buffer[start:stop].tobytes())).convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ReproError(
                f"image {index} of {self.origin} cannot be decoded ({err}); the file is corrupt: "
                "re-download or re-copy it."
            ) from err
        return image, int(self.targets[index])


class HubImages(Dataset):
    """A Hugging Face `datasets.Dataset` read lazily (ImageNet-sized); yields `(PIL RGB, label)`."""

    def __init__(self, hf_dataset: Any, image_column: str, label_column: str):
        self.hf_dataset = hf_dataset
        self.image_column = image_column
        self.label_column = label_column

    @property
    def targets(self) -> list[int]:
        return self.hf_dataset[self.label_column]

    def __len__(self) -> int:
        return len(self.hf_dataset)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        row = self.hf_dataset[int(index)]
        return row[self.image_column].convert("RGB"), int(row[self.label_column])


class TransformedImages(Dataset):
    """Applies a transform to a dataset yielding `(PIL image, label)`; the base is shared, not copied."""

    def __init__(self, base: Dataset, transform: Callable | None):
        self.base = base
        self.transform = transform

    @property
    def targets(self) -> np.ndarray:
        return np.asarray(self.base.targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, base={type(self.base).__name__})\n{self.transform}"


class _OrderedImageFolder(ImageFolder):
    """ImageFolder that keeps a dataset's standard label order when the class folders match it."""

    def __init__(self, root: str, standard_classes: Sequence[str] | None = None, **kwargs):
        self.standard_classes = standard_classes  # set first: ImageFolder.__init__ calls find_classes
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes, _ = super().find_classes(directory)
        if self.standard_classes is not None and set(classes) == set(self.standard_classes):
            classes = list(self.standard_classes)  # the dataset's own order, not alphabetical
        return classes, {c: i for i, c in enumerate(classes)}


@dataclass
class _Tabular:
    features: np.ndarray  # (N, D) raw
    targets: np.ndarray  # (N,) raw
    domains: np.ndarray | None = None  # (N,) int domain id per example (out-of-distribution tables)

    def __len__(self) -> int:
        return len(self.targets)


class TabularDataset(Dataset):
    """Standardised features and raw targets; yields `(features (D,), target (1,))`, float32.

    `domains` (optional, `(N,)` int64): the domain of each example; evaluation then also reports per-domain
    errors (`common.metrics.regression_metrics`)."""

    def __init__(self, features: np.ndarray, targets: np.ndarray, mean: np.ndarray, std: np.ndarray,
                 domains: np.ndarray | None = None):
        self.features = torch.as_tensor((features - mean) / std, dtype=torch.float32)
        self.targets = torch.as_tensor(targets, dtype=torch.float32).reshape(-1, 1)
        self.domains = None if domains is None else torch.as_tensor(np.asarray(domains), dtype=torch.int64)
        if self.domains is not None and self.domains.shape != (len(self.targets),):
            raise ReproError(f"domains {tuple(self.domains.shape)} must hold one id per example ({len(self.targets)}).")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.targets[index]


class WindowedSeries(Dataset):
    """LSTNet-style samples of a multivariate series: `(series[t-h-P+1 : t-h+1] (P, m), series[t] (m,))`.

    Mirrors `Data_utility._batchify` (C-Mixup `src/data/time_series.py`) without materialising the
    `(n, P, m)` windows (Electricity: 3 GB); `targets` is `(n, m)`.
    """

    def __init__(self, series: torch.Tensor, rows: range, window: int, horizon: int):
        self.series, self.rows, self.window, self.horizon = series, rows, window, horizon
        self.targets = series[rows.start:rows.stop]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.rows[index] - self.horizon + 1
        return self.series[end - self.window:end], self.targets[index]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def build_datasets(
    name: str,
    root: str | os.PathLike | None = None,
    recipe: str = "default",
    allow_download: bool = True,
    val_split: int = 0,
    split_seed: int = 0,
    image_size: int | None = None,
    val_per_class: bool = False,
    options: dict | None = None,
) -> tuple[Dataset, Dataset, DataInfo]:
    """Build the training and evaluation datasets of a registered dataset.

    Args:
        name: registry name (see `list_datasets()`).
        root: local folder holding the data; default `$REPRO_DATA_DIR/<name>`.
        recipe: augmentation recipe: 'default' (the dataset's usual one); 'pad_crop_flip' (= 'cifar') or
            'mixup_official' (pad-4 random crop + flip at the native size); 'deit', 'deit_noerase' or 'deit_bicubic_noerase' (timm's
            DeiT transform); 'rrc_flip' (RandomResizedCrop + flip; eval resize size / 0.875 + centre crop);
            'cutmix_imagenet' (rrc_flip + the official CutMix colour jitter and PCA lighting). Tabular data
            takes 'default' only.
        allow_download: fall back to the public source when no local copy is found.
        val_split: when > 0, hold out that many training examples (seeded by `split_seed`) and
            return them, with the evaluation transform, as `eval_ds`; otherwise `eval_ds` is the
            test split.
        split_seed: seed of the validation hold-out.
        val_per_class: hold out `val_split / num_classes` examples of every class (the last ones of a
            seeded shuffle within each class, as RankMixup's Tiny-ImageNet split) instead of a uniform draw.
        image_size: output image side; None keeps the recipe's default (the native size for 'cifar', 224
            for 'deit', the native size if the dataset has one else 224 for 'rrc_flip' and 'cutmix_imagenet').
            With 'deit' on CIFAR this upsamples.
        options: the dataset's own options (`data.options`), keyword arguments of its registered builder.

    Returns:
        `(train_ds, eval_ds, info)`.
    """
    train_ds, val_ds, test_ds, info = _build(
        name, root, recipe, allow_download, val_split, split_seed, image_size, val_per_class, options
    )
    return train_ds, (val_ds if val_ds is not None else test_ds), info


def build_splits(
    name: str,
    root: str | os.PathLike | None = None,
    recipe: str = "default",
    allow_download: bool = True,
    val_split: int = 0,
    split_seed: int = 0,
    image_size: int | None = None,
    val_per_class: bool = False,
    options: dict | None = None,
):
    """`(train_ds, val_ds or None, test_ds, info)`: every split, for trainers that select on validation."""
    return _build(name, root, recipe, allow_download, val_split, split_seed, image_size, val_per_class, options)


def build_test_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    recipe: str = "default",
    allow_download: bool = True,
    val_split: int = 0,
    split_seed: int = 0,
    image_size: int | None = None,
    val_per_class: bool = False,
    options: dict | None = None,
) -> Dataset:
    """The test split with the evaluation transform, whatever `val_split` is.

    Pass the same arguments as to `build_datasets` so tabular features get the same standardisation.
    """
    return _build(name, root, recipe, allow_download, val_split, split_seed, image_size, val_per_class, options)[2]


def _build(name, root, recipe, allow_download, val_split, split_seed, image_size, val_per_class=False,
           options=None):
    _import_papers()
    if name not in _DATASETS:
        raise unknown_name("dataset", name, _DATASETS)
    extra = {"split_seed": split_seed} if name in _SEEDED_SPLITS else {}
    extra.update(_check_options(name, _DATASETS[name], options or {}))
    raw = _DATASETS[name](Path(root).expanduser() if root is not None else None, allow_download, **extra)
    if raw.ready:  # final tensor datasets: no transforms, no hold-out of ours
        if val_split:
            raise ReproError(f"dataset {name!r} builds its own splits; set data.val_split=0.")
        return raw.train, raw.val, raw.test, copy.copy(raw.info)
    if raw.val is not None and val_split:
        raise ReproError(
            f"dataset {name!r} has its own validation split ({len(raw.val)} examples), so "
            f"data.val_split={val_split!r} cannot hold out another one; set data.val_split=0."
        )
    targets = None
    if val_per_class:
        if raw.info.task != "classification":
            raise ReproError(f"data.val_per_class needs a classification dataset; {name!r} is "
                             f"{raw.info.task}. Set data.val_per_class=false.")
        targets = np.asarray(raw.train.targets, dtype=np.int64)
    train_idx, val_idx = _split_indices(len(raw.train), val_split, split_seed, name, targets)
    info = copy.copy(raw.info)

    if info.task == "regression":
        if recipe != "default":
            raise ReproError(
                f"dataset {name!r} is tabular and takes no augmentation recipe, got recipe={recipe!r}; "
                "remove the recipe setting (or set it to 'default')."
            )
        if not isinstance(raw.train, _Tabular):  # already a Dataset (time-series windows), normalised
            return raw.train, raw.val, raw.test, info
        if raw.stats is not None:  # the dataset's own normalisation (C-Mixup: min-max over all rows)
            mean, std = (np.asarray(v, dtype=np.float64) for v in raw.stats)
        else:
            fit_rows = raw.train.features if train_idx is None else raw.train.features[train_idx]
            mean, std = fit_rows.mean(axis=0), fit_rows.std(axis=0)
            std = np.where(std > 0, std, 1.0)  # a constant column stays constant instead of NaN
        info.mean, info.std = tuple(mean.tolist()), tuple(std.tolist())
        train_full, test_ds = (TabularDataset(t.features, t.targets, mean, std, t.domains)
                               for t in (raw.train, raw.test))
        if raw.val is not None:
            return train_full, TabularDataset(raw.val.features, raw.val.targets, mean, std, raw.val.domains), \
                test_ds, info
        if train_idx is None:
            return train_full, None, test_ds, info
        return Subset(train_full, train_idx), Subset(train_full, val_idx), test_ds, info

    train_tf, eval_tf, info.mean, info.std, info.image_size = _make_transforms(recipe, raw, image_size)
    info.recipe = raw.default_recipe if recipe == "default" else recipe
    info.native_size = raw.native_size
    test_ds = TransformedImages(raw.test, eval_tf)
    train_ds = TransformedImages(raw.train, train_tf)
    if train_idx is None:
        return train_ds, None, test_ds, info
    val_ds = Subset(TransformedImages(raw.train, eval_tf), val_idx)
    return Subset(train_ds, train_idx), val_ds, test_ds, info


def _check_options(name: str, builder: Callable, options: dict) -> dict:
    """`data.options` checked against the builder's keyword-only parameters (its options)."""
    accepted = [p.name for p in inspect.signature(builder).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = f"it takes {', '.join(accepted)}" if accepted else "it takes none"
        raise ReproError(f"dataset {name!r} has no option {', '.join(map(repr, unknown))} (data.options): {takes}.")
    return dict(options)


def _split_indices(
    n: int, val_split: int, seed: int, name: str, targets: np.ndarray | None = None
) -> tuple[list | None, list | None]:
    """Seeded (train, val) index lists; with `targets`, the same number of validation examples per class."""
    if not isinstance(val_split, int) or isinstance(val_split, bool) or not 0 <= val_split < n:
        raise ReproError(
            f"val_split={val_split!r} is invalid for dataset {name!r} with {n} training examples; "
            f"use an integer in [0, {n - 1}] (0 evaluates on the test split)."
        )
    if val_split == 0:
        return None, None
    generator = torch.Generator().manual_seed(int(seed))
    if targets is None:
        order = torch.randperm(n, generator=generator).tolist()
        return sorted(order[val_split:]), sorted(order[:val_split])
    counts = np.bincount(targets)
    classes = int((counts > 0).sum())
    per_class = val_split // classes
    if per_class * classes != val_split or per_class >= counts[counts > 0].min():
        raise ReproError(
            f"data.val_per_class: val_split={val_split} must be a multiple of the {classes} classes of "
            f"{name!r} and leave training examples in every class (smallest class: {counts[counts > 0].min()}); "
            f"e.g. val_split={classes * max(1, int(counts[counts > 0].min()) // 10)}."
        )
    # a seeded shuffle within every class, then its last `per_class` examples: sort by (class, random key)
    keys = torch.rand(n, generator=generator).numpy()
    order = np.lexsort((keys, targets))
    sorted_targets = targets[order]
    rank = np.arange(n) - np.searchsorted(sorted_targets, sorted_targets, side="left")
    is_val = rank >= counts[sorted_targets] - per_class
    return sorted(order[~is_val].tolist()), sorted(order[is_val].tolist())


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


class PCALighting:
    """AlexNet-style PCA lighting noise: adds one random colour offset to every pixel of an image.

    `alpha ~ Normal(0, alphastd)` of shape (3,), offset `rgb = eigvec @ (alpha * eigval)`, output
    `image + rgb[:, None, None]`; the offset's covariance is `eigvec diag((alphastd * eigval)^2) eigvec^T`. As
    `utils.Lighting` of clovaai/CutMix-PyTorch (its ImageNet recipe: alphastd 0.1, ImageNet PCA), applied to
    the 0-1 tensor after ToTensor and before Normalize, not clamped.

    Args:
        alphastd: standard deviation of the weights of the principal components; 0 is the identity.
        eigval: (3,) eigenvalues of the RGB covariance.
        eigvec: (3, 3) eigenvectors as columns (row i = channel i).
        generator: torch.Generator for the draws; None draws from torch's global RNG, as the torchvision
            transforms next to it do (DataLoader workers seed it per worker).
    """

    def __init__(
        self,
        alphastd: float = 0.1,
        eigval: Sequence[float] = IMAGENET_PCA_EIGVAL,
        eigvec: Sequence[Sequence[float]] = IMAGENET_PCA_EIGVEC,
        generator: torch.Generator | None = None,
    ):
        if not alphastd >= 0:
            raise ValueError(f"PCALighting alphastd={alphastd!r} is invalid; use a standard deviation >= 0.")
        self.alphastd = float(alphastd)
        self.eigval = torch.as_tensor(eigval, dtype=torch.float64)
        self.eigvec = torch.as_tensor(eigvec, dtype=torch.float64)
        if self.eigval.shape != (3,) or self.eigvec.shape != (3, 3):
            raise ValueError(
                f"PCALighting needs eigval (3,) and eigvec (3, 3), got {tuple(self.eigval.shape)} and "
                f"{tuple(self.eigvec.shape)}; pass an RGB PCA (IMAGENET_PCA_EIGVAL, IMAGENET_PCA_EIGVEC)."
            )
        self.generator = generator

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """image: (3, H, W) float -> (3, H, W), same dtype."""
        if self.alphastd == 0:  # no draw either, as the official Lighting
            return image
        alpha = torch.randn(3, generator=self.generator, dtype=torch.float64) * self.alphastd
        rgb = self.eigvec @ (alpha * self.eigval)
        return image + rgb.to(image.dtype)[:, None, None]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alphastd={self.alphastd}, eigval={tuple(self.eigval.tolist())})"


class TensorColorJitter:
    """Brightness, contrast and saturation jitter of a 0-1 float image tensor, in a random order, unclamped.

    The colour jitter of the official CutMix ImageNet recipe (clovaai/CutMix-PyTorch `utils.ColorJitter`,
    applied after ToTensor): each operation blends the image with a reference,
    `f * image + (1 - f) * reference` with `f ~ U(1 - v, 1 + v)`; the reference is black (brightness), the
    image's mean grey level (contrast) or the pixel's grey level (saturation), grey = 0.299 R + 0.587 G +
    0.114 B. torchvision's ColorJitter has the same laws but clamps to [0, 1] after every operation (and rounds
    to uint8 on PIL images); the official one does neither, so neither do we.

    Args:
        brightness, contrast, saturation: the half-widths `v` (0 leaves that operation out).
        generator: torch.Generator for the draws (order, then the three factors); None: torch's global RNG.
    """

    GREY_WEIGHTS = (0.299, 0.587, 0.114)

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 generator: torch.Generator | None = None):
        self.strengths = (float(brightness), float(contrast), float(saturation))
        if not all(0 <= v <= 1 for v in self.strengths):
            raise ValueError(f"TensorColorJitter strengths {self.strengths} must lie in [0, 1] (CutMix: 0.4)")
        self.generator = generator

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """image: (3, H, W) float -> (3, H, W), same dtype."""
        order = torch.randperm(3, generator=self.generator).tolist()
        uniform = torch.rand(3, generator=self.generator, dtype=torch.float64)
        weights = torch.tensor(self.GREY_WEIGHTS, dtype=image.dtype, device=image.device)[:, None, None]
        for op in order:  # 0 brightness, 1 contrast, 2 saturation, each with its own factor
            strength = self.strengths[op]
            if strength == 0:
                continue
            factor = 1.0 + strength * (2.0 * float(uniform[op]) - 1.0)
            if op == 0:
                reference = torch.zeros((), dtype=image.dtype, device=image.device)
            else:
                grey = (image * weights).sum(dim=0, keepdim=True)
                reference = grey.mean() if op == 1 else grey
            image = factor * image + (1.0 - factor) * reference
        return image

    def __repr__(self) -> str:
        b, c, s = self.strengths
        return f"{type(self).__name__}(brightness={b}, contrast={c}, saturation={s})"


def _make_transforms(recipe: str, raw: _RawSplits, image_size: int | None):
    """Return `(train_transform, eval_transform, mean, std, output_size)` for an image dataset."""
    if recipe == "default":
        recipe = raw.default_recipe
    if recipe not in RECIPES:
        raise unknown_name("recipe", recipe, RECIPES)
    bad_type = not isinstance(image_size, int) or isinstance(image_size, bool)
    if image_size is not None and (bad_type or image_size < 8):
        raise ReproError(f"image_size={image_size!r} is invalid for recipe {recipe!r}; use an integer >= 8 "
                         "(or leave it unset for the recipe's default size).")

    if recipe in RANDOM_RESIZED_CROP:
        return _random_resized_crop_transforms(recipe, raw, image_size)

    if recipe in DEIT_RECIPES:
        # DeiT (facebookresearch/deit datasets.py build_transform) through timm's create_transform; the variants
        # differ only in random erasing and the train interpolation (DEIT_RECIPES)
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

        erase_prob, interpolation = DEIT_RECIPES[recipe]
        size = image_size or 224
        train_tf = create_transform(
            size,
            is_training=True,
            auto_augment="rand-m9-mstd0.5-inc1",
            re_prob=erase_prob,
            re_mode="pixel",
            re_count=1,
            interpolation=interpolation,
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
        )
        eval_tf = create_transform(
            size,
            is_training=False,
            crop_pct=0.875,
            interpolation="bicubic",
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
        )
        return train_tf, eval_tf, tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD), size

    # 'pad_crop_flip' (= 'cifar') and 'mixup_official': pad-4 random crop + flip (mixup-cifar10 train.py)
    native = raw.native_size
    if native is None or (recipe == "mixup_official" and native != 32):
        kind = "32x32 CIFAR images" if recipe == "mixup_official" else "datasets whose images share one size"
        raise ReproError(
            f"recipe {recipe!r} is for {kind} but dataset {raw.info.name!r} is not; "
            "use recipe='rrc_flip' or 'deit' (or 'default')."
        )
    mean, std = (MIXUP_OFFICIAL_MEAN, MIXUP_OFFICIAL_STD) if recipe == "mixup_official" else raw.stats
    size = image_size or native
    resize = [] if size == native else [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)]
    train_tf = T.Compose(
        resize
        + [
            T.RandomCrop(size, padding=4 * size // native),  # padding scales with the image side
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    eval_tf = T.Compose(resize + [T.ToTensor(), T.Normalize(mean, std)])
    return train_tf, eval_tf, tuple(mean), tuple(std), size


def _random_resized_crop_transforms(recipe: str, raw: _RawSplits, image_size: int | None):
    """'rrc_flip' and 'cutmix_imagenet': torchvision RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3),
    bilinear) + horizontal flip [+ CutMix's colour jitter and PCA lighting], ImageNet mean/std.

    Evaluation: resize the short side to `int(size / 0.875)` and centre-crop `size` (256 / 224), except on a
    dataset whose stored images all have the output size (Tiny-ImageNet at 64, CIFAR at 32), evaluated on the
    stored images as they are (OpenMixup's Tiny-ImageNet recipe). The size is `image_size`, else the dataset's
    native size, else 224.
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    # ImageNet mean/std whatever the dataset (not `raw.stats`): ResizeMix's DALI pipeline and OpenMixup's
    # Tiny-ImageNet and ImageNet configs normalise with them, as CutMix's train.py does.
    mean, std = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    native = raw.native_size
    size = image_size or native or 224
    # ResizeMix's ImageNet runs decode and resize with NVIDIA DALI (JayQine/ResizeMix configs/train_base.py:
    # triangular filter when shrinking, Lanczos-3 when enlarging), whose pixels differ slightly from PIL's
    # antialiased bilinear used here; a documented difference, not replicated.
    train_tf = [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor()]
    if recipe == "cutmix_imagenet":
        # clovaai/CutMix-PyTorch train.py: RandomResizedCrop(224), flip, ToTensor, then ColorJitter(0.4, 0.4,
        # 0.4) and Lighting(0.1, ImageNet PCA) on the 0-1 tensor (their own tensor ops, unclamped), Normalize.
        train_tf += [TensorColorJitter(0.4, 0.4, 0.4), PCALighting(0.1)]
    train_tf.append(T.Normalize(mean, std))
    if size == native:
        resize = []
    else:
        resize = [T.Resize(int(size / EVAL_CROP_FRACTION)), T.CenterCrop(size)]
    eval_tf = T.Compose(resize + [T.ToTensor(), T.Normalize(mean, std)])
    return T.Compose(train_tf), eval_tf, mean, std, size


# --------------------------------------------------------------------------------------------
# Local resolution helpers
# --------------------------------------------------------------------------------------------


def _local_candidates(name: str, root: Path | None) -> tuple[list[Path], list[str]]:
    """Folders to look in, and a human description of each for error messages."""
    if root is not None:
        return [root], [f"{root} (root argument / data.root)"]
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        folder = Path(env).expanduser() / name
        return [folder], [f"{folder} (${DATA_ROOT_ENV}/{name})"]
    return [], [f"${DATA_ROOT_ENV}/{name} (${DATA_ROOT_ENV} is not set)"]


def _parquet_files(folder: Path, split: str) -> list[Path]:
    """`<split>.parquet`, or hub-style shards `<split>-*.parquet` in the folder or one level down."""
    for pattern in (f"{split}.parquet", f"{split}-*.parquet", f"*/{split}-*.parquet"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    return []


def _hf_class_names(schema: Any, label_column: str) -> tuple[str, ...] | None:
    """Class names from the Hugging Face feature metadata that hub parquet files carry."""
    try:
        meta = json.loads(schema.metadata[b"huggingface"])
        return tuple(meta["info"]["features"][label_column]["names"])
    except (KeyError, TypeError, ValueError):
        return None


def _read_parquet_split(
    files: list[Path], image_columns: Sequence[str], label_columns: Sequence[str], num_classes: int
) -> tuple[EncodedImages, tuple[str, ...] | None]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    tables = []
    for path in files:
        try:
            tables.append(pq.read_table(path))
        except (pa.ArrowException, OSError) as err:
            raise ReproError(
                f"cannot read {path}: {err}. The file is truncated or corrupt; re-download it or "
                "re-copy it from the original source."
            ) from err
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    origin = ", ".join(str(p) for p in files)
    image_column = next((c for c in image_columns if c in table.column_names), None)
    label_column = next((c for c in label_columns if c in table.column_names), None)
    if image_column is None or label_column is None:
        raise ReproError(
            f"{origin} has columns {table.column_names}; expected an image column "
            f"({' or '.join(image_columns)}, a struct of bytes/path) and a label column "
            f"({' or '.join(label_columns)}). Use the Hugging Face hub parquet layout."
        )
    if table.num_rows == 0:
        raise ReproError(f"{origin} has no rows; re-download or re-copy it.")
    images = table.column(image_column).combine_chunks()
    blobs = pc.struct_field(images, "bytes") if pa.types.is_struct(images.type) else images
    if blobs.null_count:
        raise ReproError(
            f"{origin}: {blobs.null_count} rows of column {image_column!r} hold no image bytes "
            "(only a path); re-export the parquet with embedded images."
        )
    labels = table.column(label_column)
    if labels.null_count:
        raise ReproError(f"{origin}: {labels.null_count} rows have no label; re-download or re-copy it.")
    targets = labels.to_numpy().astype(np.int64)
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ReproError(
            f"{origin}: labels range over [{targets.min()}, {targets.max()}] but the dataset has "
            f"{num_classes} classes (0..{num_classes - 1}); this is not the expected dataset, check "
            "the files or the dataset name."
        )
    return EncodedImages(blobs.to_pylist(), targets, origin), _hf_class_names(table.schema, label_column)


def _image_folder_splits(
    folder: Path, train_split: str, test_split: str, standard_classes: Sequence[str] | None
) -> tuple[Dataset, Dataset, tuple[str, ...]]:
    """torchvision ImageFolder over `folder/<split>/<class>/*`; standard class order when it applies."""
    try:
        train = _OrderedImageFolder(str(folder / train_split), standard_classes)
        test = _OrderedImageFolder(str(folder / test_split), standard_classes)
    except (FileNotFoundError, OSError) as err:
        raise ReproError(
            f"image folder {folder} is incomplete ({err}); it needs {train_split}/<class>/*.jpg|png and "
            f"{test_split}/<class>/*.jpg|png."
        ) from err
    if test.classes != train.classes:
        raise ReproError(
            f"{folder}/{test_split} has classes {test.classes} but {folder}/{train_split} has "
            f"{train.classes}; both splits need the same class folders."
        )
    return train, test, tuple(train.classes)


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST-family images / labels; ``.gz`` or raw) as a uint8 array: ``(N, 28, 28)`` or ``(N,)``.

    Raises:
        ReproError: naming the file, when it cannot be read, is not an unsigned-byte idx file, or is truncated.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as err:
        raise ReproError(f"cannot read {path} ({err}); replace the file with a good copy.") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ReproError(f"{path} is not an unsigned-byte idx file (magic {data[:4].hex()}, expected 0000080N); "
                         "replace it with a good copy.")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ReproError(f"{path} ends inside its header: the file is truncated; replace it with a good copy.")
    shape = tuple(int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ReproError(f"{path}: header says {shape} ({int(np.prod(shape))} values) but {body.size} follow: the "
                         "file is truncated; replace it with a good copy.")
    return body.reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write unsigned bytes as an idx file, gzipped (reproducibly: no timestamp) when `path` ends in .gz."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(gzip.compress(data, mtime=0) if str(path).endswith(".gz") else data)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_dir(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mixrepro" / name


# --------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------


@dataclass
class _CifarSpec:
    name: str
    title: str
    num_classes: int
    hub_id: str
    label_columns: tuple[str, ...]
    mean: tuple
    std: tuple
    standard_classes: tuple[str, ...] | None
    torchvision_folder: str  # the extracted python-pickle layout torchvision downloads
    torchvision_class: str
    image_columns: tuple[str, ...] = field(default=("img", "image"))


_CIFAR10 = _CifarSpec(
    "cifar10", "CIFAR-10", 10, "uoft-cs/cifar10", ("label",), CIFAR10_MEAN, CIFAR10_STD,
    CIFAR10_CLASSES, "cifar-10-batches-py", "CIFAR10",
)  # fmt: skip
_CIFAR100 = _CifarSpec(
    "cifar100", "CIFAR-100", 100, "uoft-cs/cifar100", ("fine_label", "label"), CIFAR100_MEAN,
    CIFAR100_STD, None, "cifar-100-python", "CIFAR100",
)  # fmt: skip


def _cifar_raw(spec: _CifarSpec, train, test, source: str, classes) -> _RawSplits:
    info = DataInfo(spec.name, "classification", spec.num_classes, 32, None, None, source, classes)
    return _RawSplits(train, test, info, "cifar", 32, (spec.mean, spec.std))


def _load_cifar_local(spec: _CifarSpec, folder: Path) -> _RawSplits | None:
    """Load a CIFAR copy from `folder` in any accepted layout; None if the folder holds none."""
    train_files, test_files = _parquet_files(folder, "train"), _parquet_files(folder, "test")
    if train_files or test_files:
        if not (train_files and test_files):
            missing = "test" if train_files else "train"
            raise ReproError(
                f"{folder} has {'train' if train_files else 'test'} parquet data but no {missing}.parquet; "
                f"copy both train.parquet and test.parquet of {spec.title} there."
            )
        train, classes = _read_parquet_split(
            train_files, spec.image_columns, spec.label_columns, spec.num_classes
        )
        test, _ = _read_parquet_split(test_files, spec.image_columns, spec.label_columns, spec.num_classes)
        source = "parquet:" + ",".join(str(p) for p in train_files + test_files)
        return _cifar_raw(spec, train, test, source, classes or spec.standard_classes)
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        train, test, classes = _image_folder_splits(folder, "train", "test", spec.standard_classes)
        if len(classes) != spec.num_classes:
            raise ReproError(
                f"{folder}/train has {len(classes)} class folders but {spec.title} has {spec.num_classes}; "
                "check the folder or the dataset name."
            )
        return _cifar_raw(spec, train, test, f"imagefolder:{folder}", classes)
    if (folder / spec.torchvision_folder).is_dir():
        return _load_cifar_torchvision(spec, folder, download=False)
    return None


def _load_cifar_torchvision(spec: _CifarSpec, folder: Path, download: bool) -> _RawSplits:
    import torchvision.datasets

    cls = getattr(torchvision.datasets, spec.torchvision_class)
    train = cls(str(folder), train=True, download=download)
    test = cls(str(folder), train=False, download=download)
    return _cifar_raw(
        spec, train, test, f"torchvision:{folder / spec.torchvision_folder}", tuple(train.classes)
    )


def _load_from_hub(hub_id: str) -> Any:
    import datasets

    return datasets.load_dataset(hub_id)


def _hub_encoded_splits(hub_id: str, splits: Sequence[str], image_columns: Sequence[str],
                        label_columns: Sequence[str]) -> tuple[list[EncodedImages], tuple[str, ...]]:
    """Encoded images of hub splits (the stored bytes, not decoded images), and the class names."""
    import pyarrow.compute as pc

    dataset_dict = _load_from_hub(hub_id)
    out = []
    for split in splits:
        table = dataset_dict[split].with_format("arrow")[:]
        image_column = next(c for c in image_columns if c in table.column_names)
        label_column = next(c for c in label_columns if c in table.column_names)
        blobs = pc.struct_field(table.column(image_column).combine_chunks(), "bytes").to_pylist()
        out.append(EncodedImages(blobs, table.column(label_column).to_numpy(), f"hub:{hub_id}/{split}"))
    return out, tuple(dataset_dict[splits[0]].features[label_column].names)


def _load_cifar_hub(spec: _CifarSpec) -> _RawSplits:
    (train, test), classes = _hub_encoded_splits(spec.hub_id, ("train", "test"), spec.image_columns,
                                                 spec.label_columns)
    return _cifar_raw(spec, train, test, f"hub:{spec.hub_id}", classes)


def _resolve_cifar(spec: _CifarSpec, root: Path | None, allow_download: bool) -> _RawSplits:
    folders, tried = _local_candidates(spec.name, root)
    for folder in folders:
        if folder.is_dir():
            raw = _load_cifar_local(spec, folder)
            if raw is not None:
                return raw
    failures = []
    if allow_download:
        try:
            return _load_cifar_hub(spec)
        # Hub failures come as requests, httpx, huggingface_hub and datasets errors with no
        # common base class; any of them means "not available from here", so try the next source.
        except Exception as err:  # noqa: BLE001
            failures.append(f"Hugging Face hub {spec.hub_id!r}: {type(err).__name__}: {err}")
        if spec is _CIFAR100:
            target = folders[0] if folders else _cache_dir(spec.name)
            try:
                return _load_cifar_torchvision(spec, target, download=True)
            except (OSError, RuntimeError) as err:  # network errors; RuntimeError: bad checksum
                failures.append(f"torchvision download into {target}: {type(err).__name__}: {err}")
    else:
        failures.append("downloads disabled (allow_download=False)")
    raise ReproError(
        f"{spec.title} not found. Tried: {'; '.join(tried + failures)}. Fix: put train.parquet and "
        f"test.parquet (Hugging Face {spec.hub_id} layout) or an image-folder tree train/<class>/, "
        f"test/<class>/ in ${DATA_ROOT_ENV}/{spec.name}/, or set data.root to such a folder"
        + ("" if allow_download else f", or allow downloads to fetch {spec.hub_id} from the hub")
        + "."
    )


@register_dataset("cifar10")
def _cifar10(root: Path | None, allow_download: bool) -> _RawSplits:
    return _resolve_cifar(_CIFAR10, root, allow_download)


@register_dataset("cifar100")
def _cifar100(root: Path | None, allow_download: bool) -> _RawSplits:
    return _resolve_cifar(_CIFAR100, root, allow_download)


@register_dataset("cifar10-mini")
def _cifar10_mini(root: Path | None, allow_download: bool) -> _RawSplits:
    """1,000/200 balanced CIFAR-10 sample committed for tests and smoke runs."""
    folder = root if root is not None else CIFAR10_MINI_DIR
    raw = _load_cifar_local(_CIFAR10, folder) if folder.is_dir() else None
    if raw is None:
        raise ReproError(
            f"cifar10-mini not found in {folder}; regenerate it with `python scripts/make_cifar10_mini.py` "
            "(needs the full CIFAR-10 parquet copy) or restore tests/data/cifar10-mini/ from git."
        )
    raw.info.name = "cifar10-mini"
    return raw


# --------------------------------------------------------------------------------------------
# ImageNet
# --------------------------------------------------------------------------------------------

IMAGENET_HUB_ID = "ILSVRC/imagenet-1k"


@register_dataset("imagenet")
def _imagenet(root: Path | None, allow_download: bool) -> _RawSplits:
    folders, tried = _local_candidates("imagenet", root)
    for folder in folders:
        if (folder / "train").is_dir() and (folder / "val").is_dir():
            train, test, classes = _image_folder_splits(folder, "train", "val", None)
            info = DataInfo("imagenet", "classification", len(classes), None, None, None,
                            f"imagefolder:{folder}", classes)  # fmt: skip
            return _RawSplits(train, test, info, "deit")
    failures = []
    if allow_download:
        try:
            dataset_dict = _load_from_hub(IMAGENET_HUB_ID)
            train = HubImages(dataset_dict["train"], "image", "label")
            test = HubImages(dataset_dict["validation"], "image", "label")
            classes = tuple(dataset_dict["train"].features["label"].names)
            info = DataInfo("imagenet", "classification", len(classes), None, None, None,
                            f"hub:{IMAGENET_HUB_ID}", classes)  # fmt: skip
            return _RawSplits(train, test, info, "deit")
        except Exception as err:  # noqa: BLE001 -- as in _resolve_cifar: hub errors share no base class
            failures.append(f"Hugging Face hub {IMAGENET_HUB_ID!r}: {type(err).__name__}: {err}")
    else:
        failures.append("downloads disabled (allow_download=False)")
    raise ReproError(
        f"ImageNet-1k not found. Tried: {'; '.join(tried + failures)}. Fix: put the ILSVRC-2012 images "
        f"as train/<wnid>/*.JPEG and val/<wnid>/*.JPEG in ${DATA_ROOT_ENV}/imagenet/ or set data.root "
        f"to such a folder; or, for the hub copy {IMAGENET_HUB_ID} (gated), accept its terms on "
        "huggingface.co, log in with `huggingface-cli login` (or set HF_TOKEN) and allow downloads."
    )


# --------------------------------------------------------------------------------------------
# Tiny-ImageNet (200 classes, 64x64)
# --------------------------------------------------------------------------------------------

TINY_HUB_ID = "zh-plus/tiny-imagenet"
TINY_CLASSES, TINY_SIZE = 200, 64
TINY_TEST_SPLITS = ("valid", "val", "validation")  # the labelled official validation set is the test split


def _tiny_raw(train, test, source: str, classes) -> _RawSplits:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    info = DataInfo("tiny-imagenet", "classification", TINY_CLASSES, TINY_SIZE, None, None, source, classes)
    stats = (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
    return _RawSplits(train, test, info, "pad_crop_flip", TINY_SIZE, stats)


def _read_files(paths: Sequence[Path], targets: Sequence[int], origin: str) -> EncodedImages:
    """The encoded bytes of image files (decoded lazily, like the parquet copies)."""
    try:
        blobs = [path.read_bytes() for path in paths]
    except OSError as err:
        raise ReproError(f"cannot read {err.filename} ({err.strerror}); re-copy {origin}.") from err
    return EncodedImages(blobs, np.asarray(targets, dtype=np.int64), origin)


def _load_tiny_original(folder: Path) -> _RawSplits:
    """The layout of the official tiny-imagenet-200.zip: train/<wnid>/images/*.JPEG and
    val/images/*.JPEG labelled by val/val_annotations.txt. Labels follow the sorted wnids (what
    ImageFolder over train/ gives, as most Tiny-ImageNet code uses)."""
    wnids = sorted((folder / "wnids.txt").read_text().split())
    if len(wnids) != TINY_CLASSES:
        raise ReproError(f"{folder}/wnids.txt lists {len(wnids)} classes, Tiny-ImageNet has {TINY_CLASSES}; "
                         "re-extract tiny-imagenet-200.zip.")
    label = {wnid: i for i, wnid in enumerate(wnids)}
    train_paths, train_targets = [], []
    for wnid in wnids:
        files = sorted((folder / "train" / wnid / "images").glob("*.JPEG"))
        if not files:
            raise ReproError(f"{folder}/train/{wnid}/images/ holds no .JPEG files; re-extract tiny-imagenet-200.zip.")
        train_paths += files
        train_targets += [label[wnid]] * len(files)
    test_paths, test_targets = [], []
    for line in (folder / "val" / "val_annotations.txt").read_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label:
            raise ReproError(f"{folder}/val/val_annotations.txt has a malformed line {line!r}; re-extract the zip.")
        test_paths.append(folder / "val" / "images" / fields[0])
        test_targets.append(label[fields[1]])
    train = _read_files(train_paths, train_targets, f"{folder}/train")
    test = _read_files(test_paths, test_targets, f"{folder}/val")
    return _tiny_raw(train, test, f"tiny-imagenet-200:{folder}", tuple(wnids))


def _load_tiny_local(folder: Path) -> _RawSplits | None:
    """Tiny-ImageNet from `folder` in any accepted layout; None if the folder holds none."""
    if (folder / "tiny-imagenet-200").is_dir():
        folder = folder / "tiny-imagenet-200"
    train_files = _parquet_files(folder, "train")
    test_files = next((f for f in (_parquet_files(folder, s) for s in TINY_TEST_SPLITS) if f), [])
    if train_files or test_files:
        if not (train_files and test_files):
            raise ReproError(
                f"{folder} has {'train' if train_files else 'valid'} parquet data but not the other split; "
                f"copy both (Hugging Face {TINY_HUB_ID} layout: train-*.parquet and valid-*.parquet)."
            )
        train, classes = _read_parquet_split(train_files, ("image", "img"), ("label",), TINY_CLASSES)
        test, _ = _read_parquet_split(test_files, ("image", "img"), ("label",), TINY_CLASSES)
        return _tiny_raw(train, test, "parquet:" + ",".join(str(p) for p in train_files + test_files), classes)
    if (folder / "wnids.txt").is_file() and (folder / "val" / "val_annotations.txt").is_file():
        return _load_tiny_original(folder)
    if (folder / "train").is_dir() and (folder / "val").is_dir():
        train, test, classes = _image_folder_splits(folder, "train", "val", None)
        if len(classes) != TINY_CLASSES:
            raise ReproError(f"{folder}/train has {len(classes)} class folders, Tiny-ImageNet has "
                             f"{TINY_CLASSES}; check the folder or the dataset name.")
        return _tiny_raw(train, test, f"imagefolder:{folder}", classes)
    return None


@register_dataset("tiny-imagenet")
def _tiny_imagenet(root: Path | None, allow_download: bool) -> _RawSplits:
    folders, tried = _local_candidates("tiny-imagenet", root)
    for folder in folders:
        raw = _load_tiny_local(folder) if folder.is_dir() else None
        if raw is not None:
            return raw
    failures = []
    if allow_download:
        try:
            (train, test), classes = _hub_encoded_splits(TINY_HUB_ID, ("train", "valid"), ("image",), ("label",))
            return _tiny_raw(train, test, f"hub:{TINY_HUB_ID}", classes)
        except Exception as err:  # noqa: BLE001 -- as in _resolve_cifar: hub errors share no base class
            failures.append(f"Hugging Face hub {TINY_HUB_ID!r}: {type(err).__name__}: {err}")
    else:
        failures.append("downloads disabled (allow_download=False)")
    raise ReproError(
        f"Tiny-ImageNet not found. Tried: {'; '.join(tried + failures)}. Fix: extract tiny-imagenet-200.zip "
        f"(http://cs231n.stanford.edu/tiny-imagenet-200.zip) into ${DATA_ROOT_ENV}/tiny-imagenet/, or put the "
        f"Hugging Face {TINY_HUB_ID} parquet files (train-*.parquet, valid-*.parquet) or an image-folder tree "
        "train/<wnid>/, val/<wnid>/ there, or set data.root to such a folder."
    )


# --------------------------------------------------------------------------------------------
# UCI Airfoil Self-Noise (regression)
# --------------------------------------------------------------------------------------------


def _read_airfoil(path: Path) -> np.ndarray:
    try:
        table = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise ReproError(
            f"cannot parse {path} ({err}); it should be the UCI file: 6 whitespace-separated numeric "
            f"columns, no header. Re-download it from {AIRFOIL_URL}."
        ) from err
    if table.shape[0] == 0 or table.shape[1] != 6:
        raise ReproError(
            f"{path} has shape {table.shape}, expected (1503, 6); re-download it from {AIRFOIL_URL}."
        )
    return table


def _download(url: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".part")
    with urllib.request.urlopen(url, timeout=10) as response:
        partial.write_bytes(response.read())
    partial.replace(target)  # atomic: an interrupted download never leaves a truncated file


@register_dataset("airfoil", seeded_split=True)
def _airfoil(root: Path | None, allow_download: bool, split_seed: int = 0) -> _RawSplits:
    """C-Mixup's Airfoil split (`src/data/airfoil.py`): 1,003 train / 300 valid / 200 test rows.

    The rows are shuffled by `np.random.permutation` right after `set_seed(seed)`, i.e. the permutation
    of `RandomState(split_seed)` (official: split_seed = the run's seed). Inputs are min-max scaled with
    the min and max of all 1,503 rows (so they lie in [0, 1]); the target (dB) is left as is.
    """
    folders, tried = _local_candidates("airfoil", root)
    cache = _cache_dir("airfoil") / AIRFOIL_FILE
    candidates = [f if f.suffix == ".dat" else f / AIRFOIL_FILE for f in folders] + [cache]
    tried = tried + [f"{cache} (download cache)"]
    path = next((p for p in candidates if p.is_file()), None)
    failures = []
    if path is None and allow_download:
        try:
            _download(AIRFOIL_URL, cache)
            path = cache
        except (OSError, ValueError) as err:  # URLError and timeouts are OSErrors
            failures.append(f"download {AIRFOIL_URL}: {type(err).__name__}: {err}")
    elif path is None:
        failures.append("downloads disabled (allow_download=False)")
    if path is None:
        raise ReproError(
            f"UCI Airfoil Self-Noise not found. Tried: {'; '.join(tried + failures)}. Fix: put "
            f"{AIRFOIL_FILE} in ${DATA_ROOT_ENV}/airfoil/ or set data.root to its folder "
            f"(download it from {AIRFOIL_URL})."
        )
    return _airfoil_splits(path, "airfoil", AIRFOIL_ROWS, AIRFOIL_SPLIT, split_seed)


AIRFOIL_MINI_DIR = Path(__file__).resolve().parents[1] / "tests" / "data" / "airfoil-mini"
AIRFOIL_MINI_ROWS, AIRFOIL_MINI_SPLIT = 301, (201, 60, 40)  # every 5th row; the official 2:0.6:0.4 shares


@register_dataset("airfoil-mini", seeded_split=True)
def _airfoil_mini(root: Path | None, allow_download: bool, split_seed: int = 0) -> _RawSplits:
    """A committed 301-row sample of Airfoil (every 5th row, `scripts/make_airfoil_mini.py`), for smoke runs
    and tests on a fresh clone; split and scaling as the official Airfoil split, proportionally."""
    path = (Path(root) if root is not None else AIRFOIL_MINI_DIR) / AIRFOIL_FILE
    if not path.is_file():
        raise ReproError(f"the Airfoil sample {path} is missing; regenerate it with scripts/make_airfoil_mini.py.")
    return _airfoil_splits(path, "airfoil-mini", AIRFOIL_MINI_ROWS, AIRFOIL_MINI_SPLIT, split_seed)


def _airfoil_splits(path: Path, name: str, rows: int, split: tuple, split_seed: int) -> _RawSplits:
    table = _read_airfoil(path)
    if len(table) != rows:
        raise ReproError(f"{path} has shape {table.shape}, expected ({rows}, 6); re-download it from {AIRFOIL_URL}.")
    table = table[np.random.RandomState(int(split_seed) % 2**32).permutation(rows)]  # = airfoil_permutation
    x_min, x_max = table[:, :5].min(axis=0), table[:, :5].max(axis=0)
    n_train, n_val, _ = split
    parts = [slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, rows)]
    train, val, test = (_Tabular(table[part, :5], table[part, 5]) for part in parts)
    info = DataInfo(name, "regression", 1, None, None, None,
                    f"file:{path} sha256={_sha256(path)} split_seed={split_seed}")  # fmt: skip
    return _RawSplits(train, test, info, stats=(tuple(x_min), tuple(x_max - x_min)), val=val)


def airfoil_permutation(split_seed: int) -> np.ndarray:
    """Row order of the official Airfoil split: `np.random.seed(seed); np.random.permutation(1503)`."""
    return np.random.RandomState(int(split_seed) % 2**32).permutation(AIRFOIL_ROWS)


# --------------------------------------------------------------------------------------------
# Local-only datasets (the papers' own loaders use this: papers/cmixup/data.py)
# --------------------------------------------------------------------------------------------


def _find_files(name: str, root: Path | None, files: Sequence[str], where: str) -> Path:
    """The first candidate folder holding every one of `files`, else a ReproError saying what to put where."""
    folders, tried = _local_candidates(name, root)
    for folder in folders:
        if all((folder / f).is_file() for f in files):
            return folder
    missing = [str(folder / f) for folder in folders for f in files if not (folder / f).is_file()]
    raise ReproError(
        f"dataset {name!r} not found (it is not downloaded automatically). Tried: {'; '.join(tried)}"
        + (f"; missing: {', '.join(missing)}" if missing else "")
        + f". Fix: put {', '.join(files)} in ${DATA_ROOT_ENV}/{name}/ or set data.root to their folder; {where}."
    )
