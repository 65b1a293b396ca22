"""RCF-MNIST: rotated, coloured Fashion-MNIST, C-Mixup's out-of-distribution image regression (specs/cmixup.md §3).

Built as the official generator huaxiuyao/C-Mixup `src/data/RCF_MNIST.py` builds it (read, not copied):
`get_RCF_MNIST_data_packet` with `construct_color_data = 1`, `spurious_ratio = 0.8`, `all_pos_color = 0`,
`use_rotate_class = 0` (`src/config.py` 'RCF_MNIST'), whose pickles every training run then reads:

1. the 60,000 Fashion-MNIST **training** images only (the test idx file is unused), split 40,000 / 10,000 /
   10,000 by `random_split`; the training part is then re-ordered by the shuffled `DataLoader` that gathers it
   (`get_all_batches`), validation and test keep the split's order;
2. each image, grey replicated to 3 channels and scaled to [-1, 1], is rotated by `degree ~ U[0, 360)`
   (`torch.rand(1) * 360`) with PIL's `Image.rotate` (nearest neighbour, same size, black fill) after the
   round trip `ToPILImage` does (`(x / 2 + 0.5) * 255` truncated to a byte); the label is `degree / 360`;
3. colour (`color_linear_red_blue`, `red_blue_linear_map`, on [0, 1] pixels): a pixel brighter than 5/255 keeps
   `r * v` in red, 0 in green and `(1 - r) * v` in blue. Training: 80% of the images (`np.random.choice`
   without replacement) get `r = label` (domain 0), the rest `r = 1 - label` (domain 1); validation:
   `r ~ U[0, 1)` (no spurious link, one domain); test (`inv = True`): the chosen 80% get `r = 1 - label`
   (domain 0), the rest `r = label` (domain 1), so the colour shortcut learnt in training misleads on most test
   images. The test domains are the two groups `cal_worst_acc` reports the worst of.
4. images back to [-1, 1] (`img_numpy2torch`): `(N, 3, 28, 28)` float32.

Every float operation is done in the official order and precision (float32; the validation ratios are NumPy
float64 and the product is rounded back to float32), so with the same draws the arrays are the official ones.
Deviation (randomness only): the official generator draws from torch's and NumPy's global streams once
(`set_seed` before `load_data`) and stores pickles that every run reads; we draw from `torch.Generator(seed)`
(split, gathering order, degrees) and `np.random.RandomState(seed)` (colour groups, validation ratios) with
`seed = data.split_seed` (0: one dataset for every run seed, as the stored pickles), rebuilding the data in
memory at the start of a run (about 10 s; 560 MB of float32 for the full set).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.data import read_idx, write_idx  # noqa: F401 (part of this module's API: data.py and the tests use them)
from common.errors import ReproError

DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
FOLDER_NAME = "fashion_mnist"  # $REPRO_DATA_DIR/fashion_mnist/
TRAIN_IMAGES = "train-images-idx3-ubyte"  # .gz or uncompressed
OFFICIAL_SPLIT = (40000, 10000, 10000)  # random_split of the 60,000 training images
SPURIOUS_RATIO = 0.8  # config.py 'RCF_MNIST' spurious_ratio
COLOR_LOWER_BOUND = np.float32(5 / 255)  # red_blue_linear_map: only pixels above it are coloured


# ---------------------------------------------------------------------------------------------- idx files
def fashion_mnist_folder(root: Path | None) -> tuple[Path, Path]:
    """`(folder, train-images file)`: `data.root`, else `$REPRO_DATA_DIR/fashion_mnist/`, else Debian's folder."""
    env = os.environ.get("REPRO_DATA_DIR")
    candidates = [Path(root)] if root is not None else \
        ([Path(env).expanduser() / FOLDER_NAME] if env else []) + [DEBIAN_FOLDER]
    for folder in candidates:
        for name in (f"{TRAIN_IMAGES}.gz", TRAIN_IMAGES):
            if (folder / name).is_file():
                return folder, folder / name
    tried = ", ".join(str(c / f"{TRAIN_IMAGES}.gz") for c in candidates)
    raise ReproError(f"Fashion-MNIST not found (tried {tried}): install it with `apt-get install "
                     f"dataset-fashion-mnist` (puts the idx files in {DEBIAN_FOLDER}/) or put {TRAIN_IMAGES}.gz in "
                     f"$REPRO_DATA_DIR/{FOLDER_NAME}/ (or data.root).")


# ------------------------------------------------------------------------------------------ pure helpers
def split_sizes(n: int) -> tuple[int, int, int]:
    """40,000 / 10,000 / 10,000 of 60,000 (the official `random_split`); the same 2/3, 1/6, 1/6 of a sample."""
    if n == 60000:
        return OFFICIAL_SPLIT
    n_val = n // 6
    if n_val < 1:
        raise ReproError(f"{n} Fashion-MNIST images are too few for a train / validation / test split (>= 6).")
    return n - 2 * n_val, n_val, n_val


def official_round_trip(images: np.ndarray) -> np.ndarray:
    """Bytes `(N, 28, 28)` -> the bytes `ToPILImage` sees in `rotate_img`: `((v / 255 - .5) / .5) / 2 + .5`
    in float32 (`ToTensor`, `Normalize(.5, .5)`, unnormalise), times 255, truncated (`mul(255).byte()`)."""
    pixels = torch.tensor(images).float().div(255)  # a copy: the idx buffer is read-only
    pixels = (pixels - 0.5) / 0.5
    pixels = pixels / 2 + 0.5
    return pixels.mul(255).byte().numpy()


def rotate(images: np.ndarray, degrees: torch.Tensor) -> np.ndarray:
    """`(N, 28, 28)` bytes rotated counter-clockwise by `degrees` (N,) float32 with PIL's nearest-neighbour
    `Image.rotate` (same size, black corners), as `rotate_img`; grey images, the 3 equal channels rotate alike."""
    out = np.empty_like(images)
    for k, (image, degree) in enumerate(zip(images, degrees.tolist(), strict=True)):
        out[k] = np.asarray(Image.fromarray(image, mode="L").rotate(degree))
    return out


def unit_pixels(rotated: np.ndarray) -> torch.Tensor:
    """Rotated bytes -> the [0, 1] float32 pixels colouring sees: `ToTensor`, `(x - .5) * 2`, then `x / 2 + .5`."""
    pixels = torch.as_tensor(rotated).float().div(255)
    pixels = (pixels - 0.5) * 2.0
    return pixels / 2 + 0.5


def colour(pixels: torch.Tensor, ratio: np.ndarray) -> torch.Tensor:
    """`red_blue_linear_map` then `img_numpy2torch`: `(N, H, W)` [0, 1] grey -> `(N, 3, H, W)` in [-1, 1].

    Args:
        pixels: `(N, H, W)` float32 in [0, 1].
        ratio: `(N,)` red share of each image; float32 (labels) or float64 (validation's `np.random.rand`: the
            products are then float64, rounded to float32 when stored, as the official in-place assignment).
    """
    grey = pixels.numpy()
    r = np.asarray(ratio).reshape(-1, 1, 1)
    bright = grey > COLOR_LOWER_BOUND
    red = np.where(bright, grey * r, grey).astype(np.float32)
    green = np.where(bright, np.float32(0), grey).astype(np.float32)
    blue = np.where(bright, grey * (1 - r), grey).astype(np.float32)
    image = torch.from_numpy(np.stack([red, green, blue], axis=1))
    return (image - 0.5) * 2


def spurious_groups(n: int, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """`(normal, inverse)` row indices: `np.random.choice(n, int(0.8 n), replace=False)` and the rest, sorted."""
    normal = rng.choice(np.arange(n), size=int(n * SPURIOUS_RATIO), replace=False)
    return normal, np.setdiff1d(np.arange(n), normal)


def colour_split(pixels: torch.Tensor, labels: torch.Tensor, kind: str, rng: np.random.RandomState):
    """Colour one split as `color_linear_red_blue`; returns `(images (N, 3, H, W), domains (N,) int64)`.

    kind 'train': ratio = label on the normal 80% (domain 0), 1 - label on the rest (domain 1); 'test'
    (`inv = True`): 1 - label on the normal 80% (domain 0), label on the rest (domain 1); 'valid': ratio ~ U[0, 1),
    domain 0 for all."""
    n = len(labels)
    y = labels.numpy().astype(np.float32)
    domains = np.zeros(n, dtype=np.int64)
    if kind == "valid":
        return colour(pixels, rng.rand(n)), torch.from_numpy(domains)
    if kind not in ("train", "test"):
        raise ReproError(f"kind must be train, valid or test, got {kind!r}.")
    normal, inverse = spurious_groups(n, rng)
    ratio = np.empty(n, dtype=np.float32)
    flip_normal = kind == "test"
    ratio[normal] = (np.float32(1.0) - y[normal]) if flip_normal else y[normal]
    ratio[inverse] = y[inverse] if flip_normal else (np.float32(1.0) - y[inverse])
    domains[inverse] = 1
    return colour(pixels, ratio), torch.from_numpy(domains)


class ImageRegression(Dataset):
    """Images with a regression target and a domain each; yields `(image (3, H, W), target (1,))`, float32.

    `features`, `targets` and `domains` are whole tensors, so C-Mixup fetches partners by index and the trainer
    reports the worst test domain (`common.metrics.regression_metrics`)."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, domains: torch.Tensor):
        self.features, self.targets, self.domains = features, targets.reshape(-1, 1).float(), domains

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.targets[index]


def build_rcf_mnist(images: np.ndarray, seed: int) -> dict[str, ImageRegression]:
    """The three RCF-MNIST splits from Fashion-MNIST training bytes `(N, 28, 28)`, in the official order.

    Draws, in order: `randperm(N)` (random_split), `randperm(n_train)` (the shuffled gathering loader), degrees
    `U[0, 1) * 360` for train, validation, test (get_rotate_imgs), from `torch.Generator().manual_seed(seed)`;
    colour groups of train, validation ratios, colour groups of test from `np.random.RandomState(seed)`."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ReproError(f"Fashion-MNIST images must be (N, H, W) bytes, got {images.shape} {images.dtype}.")
    generator = torch.Generator().manual_seed(int(seed))
    rng = np.random.RandomState(int(seed) % 2**32)
    n_train, n_val, _ = split_sizes(len(images))
    order = torch.randperm(len(images), generator=generator)
    rows = {"train": order[:n_train], "valid": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    rows["train"] = rows["train"][torch.randperm(n_train, generator=generator)]
    degrees = {name: torch.rand(len(r), generator=generator) * 360.0 for name, r in rows.items()}
    base = official_round_trip(images)
    splits = {}
    for name in ("train", "valid", "test"):
        pixels = unit_pixels(rotate(base[rows[name].numpy()], degrees[name]))
        labels = degrees[name] / 360.0  # "critical --> normalize y"
        features, domains = colour_split(pixels, labels, name, rng)
        splits[name] = ImageRegression(features, labels, domains)
    return splits
