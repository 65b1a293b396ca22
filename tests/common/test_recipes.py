"""Tests of the random-resized-crop recipes of common/data.py ('rrc_flip', 'cutmix_imagenet') and their
pieces (`PCALighting`, `TensorColorJitter`): eval transforms against longhand numpy, the lighting's law, the
order of the train transform."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import transforms as T

from common import data
from common.data import (
    CIFAR10_MINI_DIR,
    DATA_ROOT_ENV,
    IMAGENET_PCA_EIGVAL,
    IMAGENET_PCA_EIGVEC,
    DataInfo,
    PCALighting,
    TensorColorJitter,
    build_datasets,
    build_splits,
)
from common.errors import ReproError

RECIPES = ("rrc_flip", "cutmix_imagenet")
SYNTHETIC = "test-recipes-300x200"  # no native size, like ImageNet
WIDTH, HEIGHT = 300, 200
MEAN, STD = np.array(IMAGENET_DEFAULT_MEAN), np.array(IMAGENET_DEFAULT_STD)
EIGVAL, EIGVEC = np.array(IMAGENET_PCA_EIGVAL), np.array(IMAGENET_PCA_EIGVEC)


def synthetic_image(index: int, constant: bool = False) -> Image.Image:
    """A 300x200 RGB noise image (seeded by index), or a single colour."""
    rng = np.random.default_rng(index)
    if constant:
        pixels = np.broadcast_to(rng.integers(0, 256, size=3, dtype=np.uint8), (HEIGHT, WIDTH, 3))
    else:
        pixels = rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


class SyntheticImages(Dataset):
    """Four noise images then two single-colour images, 300 wide x 200 high; yields `(PIL RGB, label)`."""

    def __init__(self):
        self.targets = np.array([0, 1, 0, 1, 0, 1])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return synthetic_image(index, constant=index >= 4), int(self.targets[index])


if SYNTHETIC not in data.list_datasets():

    @data.register_dataset(SYNTHETIC)
    def _synthetic(root, allow_download):
        info = DataInfo(SYNTHETIC, "classification", 2, None, None, None, "synthetic", ("a", "b"))
        return data._RawSplits(SyntheticImages(), SyntheticImages(), info, "rrc_flip")


@pytest.fixture
def no_data_env(monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)


def normalise(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32, ImageNet mean/std, by hand in float64."""
    return torch.from_numpy((pixels / 255.0 - MEAN) / STD).permute(2, 0, 1).float()


def cifar_test_pixels(index: int) -> np.ndarray:
    row = pq.read_table(CIFAR10_MINI_DIR / "test.parquet").slice(index, 1).to_pylist()[0]
    return np.asarray(Image.open(io.BytesIO(row["img"]["bytes"])).convert("RGB"))


# ---------------------------------------------------------------------------------------------
# Recipes through build_datasets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("image_size", [None, 96])
def test_train_output_on_a_300x200_image(recipe, image_size):
    train_ds, _, info = build_datasets(SYNTHETIC, recipe=recipe, image_size=image_size)
    size = image_size or 224  # no native size: ImageNet's 224
    assert (info.recipe, info.image_size, info.mean, info.std) == (
        recipe, size, tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))  # fmt: skip
    torch.manual_seed(0)
    image, label = train_ds[0]
    assert image.shape == (3, size, size) and image.dtype == torch.float32 and label == 0
    # A single-colour image stays one colour under any crop, flip, jitter or lighting; without jitter and
    # lighting it is exactly that colour normalised.
    flat, _ = train_ds[4]
    assert torch.allclose(flat, flat[:, :1, :1].expand_as(flat), atol=1e-6)
    colour = normalise(np.asarray(synthetic_image(4, constant=True))[:1, :1])
    if recipe == "rrc_flip":
        torch.testing.assert_close(flat[:, :1, :1], colour, atol=1e-6, rtol=0)
    else:
        assert not torch.allclose(flat[:, :1, :1], colour, atol=1e-3)


@pytest.mark.parametrize("recipe", RECIPES)
def test_train_output_on_the_cifar_sample(recipe, no_data_env):
    train_ds, _, info = build_datasets("cifar10-mini", recipe=recipe, allow_download=False)
    assert info.image_size == info.native_size == 32
    torch.manual_seed(0)
    images = torch.stack([train_ds[i][0] for i in range(8)])
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert torch.isfinite(images).all()
    # Random: two draws of the same image differ (crop, flip and, for CutMix, colour).
    assert not torch.equal(train_ds[0][0], train_ds[0][0])


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize(("image_size", "short_side"), [(None, 256), (224, 256), (64, 73)])
def test_eval_is_resize_centre_crop_normalise(recipe, image_size, short_side):
    _, eval_ds, info = build_datasets(SYNTHETIC, recipe=recipe, image_size=image_size)
    size = info.image_size
    for index in (0, 3):
        resized = np.asarray(TF.resize(synthetic_image(index), short_side))  # short side -> size / 0.875
        height, width = resized.shape[:2]
        assert height == short_side and width == int(short_side * WIDTH / HEIGHT)
        top, left = round((height - size) / 2), round((width - size) / 2)  # torchvision's centre_crop offsets
        expected = normalise(resized[top:top + size, left:left + size])
        image, label = eval_ds[index]
        assert label == index % 2
        torch.testing.assert_close(image, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("recipe", RECIPES)
def test_native_size_dataset_is_evaluated_on_the_stored_pixels(recipe, no_data_env):
    _, val_ds, test_ds, info = build_splits("cifar10-mini", recipe=recipe, val_split=50, allow_download=False)
    assert (info.image_size, info.native_size, info.mean) == (32, 32, tuple(IMAGENET_DEFAULT_MEAN))
    for index in (0, 57, 199):
        torch.testing.assert_close(test_ds[index][0], normalise(cifar_test_pixels(index)), atol=1e-6, rtol=0)
    assert torch.equal(val_ds[0][0], val_ds[0][0])  # the held-out split uses the deterministic eval transform
    # An explicit image_size equal to the native size is the same; another size resizes and centre-crops:
    # 28 -> short side int(28 / 0.875) = 32 (the stored size), centre crop 28.
    _, _, same, _ = build_splits("cifar10-mini", recipe=recipe, image_size=32, allow_download=False)
    torch.testing.assert_close(same[5][0], test_ds[5][0], atol=0, rtol=0)
    _, _, cropped, info28 = build_splits("cifar10-mini", recipe=recipe, image_size=28, allow_download=False)
    assert info28.image_size == 28
    torch.testing.assert_close(cropped[5][0], normalise(cifar_test_pixels(5)[2:30, 2:30]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("image_size", [4, 64.0, True, "224"])
def test_invalid_image_size_is_rejected(recipe, image_size):
    message = rf"image_size={image_size!r} is invalid for recipe '{recipe}'.*integer >= 8"
    with pytest.raises(ReproError, match=message):
        build_datasets(SYNTHETIC, recipe=recipe, image_size=image_size)


def test_unknown_recipe_lists_the_new_ones(no_data_env):
    with pytest.raises(ReproError, match="Did you mean 'rrc_flip'.*cutmix_imagenet.*rrc_flip"):
        build_datasets("cifar10-mini", recipe="rrc_flp", allow_download=False)


# ---------------------------------------------------------------------------------------------
# The composition and order of the train transforms
# ---------------------------------------------------------------------------------------------


def by_hand(recipe: str, size: int, order: str = "official") -> T.Compose:
    """The train transform composed here from its pieces; 'swapped' puts the lighting before the jitter,
    'jitter_on_pil' uses torchvision's ColorJitter before ToTensor (wrong orders, as negative controls)."""
    pieces = [T.RandomResizedCrop(size, scale=(0.08, 1.0)), T.RandomHorizontalFlip()]
    if recipe == "cutmix_imagenet" and order == "jitter_on_pil":
        pieces += [T.ColorJitter(0.4, 0.4, 0.4), T.ToTensor(), PCALighting(0.1)]
    elif recipe == "cutmix_imagenet":
        colour = [TensorColorJitter(0.4, 0.4, 0.4), PCALighting(0.1)]
        pieces += [T.ToTensor()] + (colour[::-1] if order == "swapped" else colour)
    else:
        pieces += [T.ToTensor()]
    return T.Compose(pieces + [T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


@pytest.mark.parametrize("recipe", RECIPES)
def test_train_transform_is_the_pieces_in_the_official_order(recipe):
    train_ds, _, _ = build_datasets(SYNTHETIC, recipe=recipe, image_size=160)
    for seed in range(4):
        torch.manual_seed(seed)
        ours = train_ds[seed][0]
        torch.manual_seed(seed)
        expected = by_hand(recipe, 160)(synthetic_image(seed))
        assert torch.equal(ours, expected)
        if recipe == "cutmix_imagenet":  # the comparison can tell the orders apart
            for wrong in ("swapped", "jitter_on_pil"):
                torch.manual_seed(seed)
                assert not torch.allclose(ours, by_hand(recipe, 160, wrong)(synthetic_image(seed)), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# PCALighting
# ---------------------------------------------------------------------------------------------


def test_lighting_equals_longhand_numpy():
    image = torch.rand(3, 5, 7)
    for seed in range(5):
        out = PCALighting(0.1, generator=torch.Generator().manual_seed(seed))(image)
        replay = torch.Generator().manual_seed(seed)
        alpha = 0.1 * torch.randn(3, generator=replay, dtype=torch.float64).numpy()
        # official form: eigvec with column j scaled by alpha_j * eigval_j, summed along each row
        rgb = (EIGVEC * (alpha * EIGVAL)[None, :]).sum(axis=1)
        expected = image.numpy().astype(np.float64) + rgb[:, None, None]
        assert out.dtype == torch.float32 and out.shape == image.shape
        np.testing.assert_allclose(out.numpy(), expected, atol=1e-6, rtol=0)
        assert np.abs(rgb).max() > 1e-4  # the check is not vacuous
    # the default generator is torch's global one
    torch.manual_seed(3)
    global_draw = PCALighting(0.1)(image)
    seeded = PCALighting(0.1, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(global_draw, seeded(image))


def test_lighting_alphastd_zero_is_the_identity():
    image = torch.rand(3, 4, 4)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert torch.equal(PCALighting(0.0, generator=generator)(image), image)
    assert torch.equal(generator.get_state(), state)  # no draw either


def test_lighting_offset_has_the_pca_mean_and_covariance():
    alphastd, draws = 0.1, 20_000
    lighting = PCALighting(alphastd, generator=torch.Generator().manual_seed(1234))
    zero = torch.zeros(3, 1, 1, dtype=torch.float64)
    offsets = torch.stack([lighting(zero)[:, 0, 0] for _ in range(draws)]).numpy()
    sigma = EIGVEC @ np.diag((alphastd * EIGVAL) ** 2) @ EIGVEC.T
    # tolerances: 5 standard errors of each estimate (Gaussian: var(x_i x_k) = S_ii S_kk + S_ik^2)
    mean_tol = 5 * np.sqrt(np.diag(sigma) / draws)
    assert (np.abs(offsets.mean(axis=0)) < mean_tol).all()
    cov_tol = 5 * np.sqrt((np.outer(np.diag(sigma), np.diag(sigma)) + sigma**2) / draws)
    empirical = np.cov(offsets, rowvar=False)
    assert (np.abs(empirical - sigma) < cov_tol).all()
    # plausible wrong laws lie far outside these tolerances: eigenvectors as rows, alphastd * sqrt(eigval)
    for wrong in (EIGVEC.T @ np.diag((alphastd * EIGVAL) ** 2) @ EIGVEC,
                  EIGVEC @ np.diag(alphastd**2 * EIGVAL) @ EIGVEC.T):
        assert (np.abs(wrong - sigma) > 3 * cov_tol).any()


# ---------------------------------------------------------------------------------------------
# TensorColorJitter (CutMix's jitter on tensors)
# ---------------------------------------------------------------------------------------------


def test_colour_jitter_equals_longhand_numpy_unclamped():
    image = torch.rand(3, 6, 5)
    image[:, 0, 0] = 1.0  # white and black pixels: brightening and darkening leave [0, 1]
    image[:, 1, 1] = 0.0
    pixels = image.numpy().astype(np.float64)
    left_range = False
    for seed in range(8):
        out = TensorColorJitter(0.4, 0.4, 0.4, generator=torch.Generator().manual_seed(seed))(image)
        replay = torch.Generator().manual_seed(seed)
        order = torch.randperm(3, generator=replay).tolist()
        uniform = torch.rand(3, generator=replay, dtype=torch.float64).numpy()
        alpha = 0.4 * (1 - 2 * uniform)  # lerp weight = 1 - factor
        expected = pixels.copy()
        for op in order:  # clovaai/CutMix-PyTorch utils.py: img.lerp(reference, alpha), alpha ~ U(-0.4, 0.4)
            grey = 0.299 * expected[0] + 0.587 * expected[1] + 0.114 * expected[2]
            references = (np.zeros_like(expected), np.full_like(expected, grey.mean()), np.stack([grey] * 3))
            reference = references[op]  # brightness, contrast, saturation
            expected = expected + alpha[op] * (reference - expected)
        np.testing.assert_allclose(out.numpy(), expected, atol=1e-6, rtol=0)
        left_range |= bool(expected.max() > 1 + 1e-3 or expected.min() < -1e-3)
    assert left_range  # some case checks that nothing is clamped


def test_colour_jitter_factors_span_the_official_range():
    jitter = TensorColorJitter(0.4, 0.0, 0.0, generator=torch.Generator().manual_seed(0))
    grey = torch.full((3, 1, 1), 0.5)
    factors = np.array([float(jitter(grey)[0, 0, 0]) / 0.5 for _ in range(4000)])
    assert 0.6 <= factors.min() < 0.61 and 1.39 < factors.max() <= 1.4
    assert abs(factors.mean() - 1.0) < 0.01


@pytest.mark.parametrize(
    "recipe,erasing,interpolation",
    [("deit", 0.25, "bicubic"), ("deit_noerase", None, "random"), ("deit_bicubic_noerase", None, "bicubic")],
)
def test_deit_recipes_differ_only_in_erasing_and_interpolation(recipe, erasing, interpolation, no_data_env):
    """DeiT's transform (erasing 0.25, bicubic), TransMix's release (no erasing, random interpolation) and
    SMMix's fork (no erasing, bicubic): the same RandAugment crop-flip pipeline otherwise."""
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import RandomResizedCropAndInterpolation

    train_ds, _, info = build_datasets("cifar10-mini", recipe=recipe, allow_download=False)
    steps = train_ds.transform.transforms
    crop = next(t for t in steps if isinstance(t, RandomResizedCropAndInterpolation))
    chosen = "random" if isinstance(crop.interpolation, (tuple, list)) else crop.interpolation.value
    assert chosen == interpolation
    erase = [t for t in steps if isinstance(t, RandomErasing)]
    assert (erase[0].probability if erase else None) == erasing
    assert info.image_size == 224 and info.recipe == recipe
