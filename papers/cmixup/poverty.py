"""PovertyMap (WILDS `poverty_v1.1`), C-Mixup's out-of-distribution satellite-image regression (specs/cmixup.md §3):
the loader, registered as `poverty`, and the official model, registered into timm as `resnet18_poverty`.

Official code: huaxiuyao/C-Mixup (0b88fb3) `PovertyMap/main.py`, `config.py`, `main.sh`, `mixup.py`,
`models/poverty.py` (`Model.getDataLoaders`, `Poverty_Batched_Dataset`), `models/resnet_multispectral.py`; it
reads the data through WILDS' `PovertyMapDataset` (p-lambda/wilds v2.0.0 `wilds/datasets/poverty_dataset.py`,
`wilds/common/utils.py` `subsample_idxs`, `wilds/common/metrics/all_metrics.py` `PearsonCorrelation`). Both read,
not copied; the `wilds` package is not needed here.

Data layout (what WILDS downloads to `<root_dir>/poverty_v1.1/`, 13 GB compressed): `dhs_metadata.csv`, one row per
DHS cluster (19,669 rows; columns used: `country` (a name of `DHS_COUNTRIES`), `urban` (True/False), `wealthpooled`
(the asset wealth index, the label)), and `images/landsat_poverty_img_<i>.npz` for row `i`, key `x`, an
`(8, 224, 224)` array (7 Landsat bands then night lights, already normalised). It goes in
`$REPRO_DATA_DIR/wilds/poverty_v1.1/` (the official `--data-dir D` reads `D/wilds/poverty_v1.1/`), or `data.root`
(that folder, or the WILDS root above it).

Splits (`PovertyMapDataset(fold, use_ood_val=True, no_nl=False)`, `split_scheme='official'`): fold F's test
countries are the OOD test split, its val countries the OOD validation split; the other rows ("in-country") are
shuffled by `np.random.default_rng(ord(F) + 541433)`: the first 1,000 are ID validation, the next 1,000 ID test,
the rest train. Each split lists its rows in ascending row order (`np.where` of the split array). main.py overrides
`--fold` with `['A', 'B', 'C', 'D', 'E'][seed % 5]`: the fold follows the run's seed (`data.split_seed: null`);
`data.options.fold` pins one. Training selects on the OOD validation split (`tv_loaders['val']`) and reports the OOD
test split.

Domains: evaluation groups rows by `urban` (WILDS' `_eval_grouper`, groups rural = 0, urban = 1); `r_wg` is the
smaller Pearson r of the two groups (`PearsonCorrelation.worst` = minimum, NaN groups ignored), `r_all` the r of
the whole split. Every split here carries `domains` = urban, which the trainer's metrics group by
(`common.metrics.regression_metrics`: `r`, `r_worst_group`). The training set's own domains in the official code
are countries (`Poverty_Batched_Dataset.domains`), which only order the partner pool (`d_idx`), not its law; they
are kept as `countries`.

Transforms: none. `initialize_poverty_train_transform` builds a list (ToPILImage, Resize, flips, RandomAffine,
ColorJitter, cutout) but returns `transforms.Compose([])`, and the same empty transform is passed to the
evaluation splits; the list could not run anyway (`ToPILImage` refuses more than 4 channels: "pic should not have
> 4 channels. Got 8 channels"). `no_nl` (False in the official call) zeroes the night-lights band as WILDS'
`get_input` (`img[-1] = 0`).

Model: `ResNet18(num_classes=1, num_channels=8)` of `resnet_multispectral.py` = torchvision's ResNet-18 layout with
an 8-channel stem: conv 7x7/2 (8 -> 64, no bias), BN, ReLU, max-pool 3/2, four stages of two BasicBlocks (64, 128,
256, 512; the first block of stages 2-4 has stride 2 in its first 3x3 conv and a 1x1/2 conv + BN shortcut), global
average pool, `Linear(512, 1)`; convs Kaiming-normal (fan_out, relu), BN weight 1 / bias 0, no zero-init of the
last BN (`zero_init_residual=False`). timm's `ResNet(BasicBlock, [2, 2, 2, 2], in_chans=8, zero_init_last=False)` is
that network layer for layer, with the same parameter names (tests/papers/test_cmixup_poverty.py checks names,
shapes, strides and outputs against a longhand version and, when the official file is at hand, against it).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models.resnet import BasicBlock, ResNet
from torch.utils.data import Dataset

from common.data import DATA_ROOT_ENV, DataInfo, _RawSplits, register_dataset
from common.errors import ReproError
from common.models import _entry_kwargs, register_model_once

WILDS_URL = "https://worksheets.codalab.org/rest/bundles/0xfc0aa86ad9af4eb08c42dfc40eacf094/contents/blob/"
FOLDER = Path("wilds") / "poverty_v1.1"  # under $REPRO_DATA_DIR
METADATA = "dhs_metadata.csv"
IMAGE_SHAPE = (8, 224, 224)  # BLUE, GREEN, RED, SWIR1, SWIR2, TEMP1, NIR, NIGHTLIGHTS
NUM_EVAL = 2000  # in-country rows held out: 1,000 ID validation + 1,000 ID test (WILDS >= 1.1)
SUBSAMPLE_OFFSET = 541433  # subsample_idxs: default_rng(seed + 541433), seed = ord(fold)
FOLDS = ("A", "B", "C", "D", "E")
DHS_COUNTRIES = (
    "angola", "benin", "burkina_faso", "cameroon", "cote_d_ivoire", "democratic_republic_of_congo", "ethiopia",
    "ghana", "guinea", "kenya", "lesotho", "malawi", "mali", "mozambique", "nigeria", "rwanda", "senegal",
    "sierra_leone", "tanzania", "togo", "uganda", "zambia", "zimbabwe",
)  # fmt: skip
# SURVEY_NAMES['2009-17<fold>']: the OOD validation and test countries; every other country is in-country
FOLD_COUNTRIES = {
    "A": {"val": ("benin", "burkina_faso", "guinea", "sierra_leone", "tanzania"),
          "test": ("angola", "cote_d_ivoire", "ethiopia", "mali", "rwanda")},
    "B": {"val": ("cameroon", "ghana", "malawi", "zimbabwe"),
          "test": ("benin", "burkina_faso", "guinea", "sierra_leone", "tanzania")},
    "C": {"val": ("democratic_republic_of_congo", "mozambique", "nigeria", "togo", "uganda"),
          "test": ("cameroon", "ghana", "malawi", "zimbabwe")},
    "D": {"val": ("kenya", "lesotho", "senegal", "zambia"),
          "test": ("democratic_republic_of_congo", "mozambique", "nigeria", "togo", "uganda")},
    "E": {"val": ("angola", "cote_d_ivoire", "ethiopia", "mali", "rwanda"),
          "test": ("kenya", "lesotho", "senegal", "zambia")},
}
SPLITS = ("train", "id_val", "id_test", "val", "test")


# ------------------------------------------------------------------------------------------------- folder
def poverty_folder(root: Path | None, allow_download: bool = False) -> Path:
    """The `poverty_v1.1` folder: `root` (that folder or a WILDS root holding it), else
    `$REPRO_DATA_DIR/wilds/poverty_v1.1/`; with `allow_download` and the `wilds` package importable, WILDS
    downloads it there (13 GB) as the official `download=True` does. Otherwise a ReproError saying where to put it."""
    env = os.environ.get(DATA_ROOT_ENV)
    if root is not None:
        candidates = [Path(root), Path(root) / FOLDER.name]
    else:
        candidates = [Path(env).expanduser() / FOLDER] if env else []
    for folder in candidates:
        if (folder / METADATA).is_file():
            return folder
    if allow_download and env and root is None and importlib.util.find_spec("wilds") is not None:
        from wilds.datasets.poverty_dataset import PovertyMapDataset  # optional, only to download

        PovertyMapDataset(version="1.1", root_dir=str(Path(env).expanduser() / FOLDER.parent), download=True)
        return poverty_folder(None, allow_download=False)
    tried = ", ".join(str(c / METADATA) for c in candidates) or f"nothing (${DATA_ROOT_ENV} is not set)"
    raise ReproError(
        f"PovertyMap (WILDS poverty_v1.1) not found: tried {tried}. Download poverty_v1.1 from {WILDS_URL} (a "
        f"13 GB tar.gz; or `pip install wilds` and rerun, which downloads it) and unpack it so that "
        f"${DATA_ROOT_ENV}/{FOLDER}/{METADATA} and ${DATA_ROOT_ENV}/{FOLDER}/images/landsat_poverty_img_0.npz "
        "exist, or set data.root to that folder.")


# ----------------------------------------------------------------------------------------------- metadata
def read_metadata(path: Path) -> dict[str, np.ndarray]:
    """`dhs_metadata.csv` -> `{'country': (N,) str, 'urban': (N,) int64 0/1, 'wealthpooled': (N,) float64}`."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ReproError(f"cannot read {path} ({err}); re-copy dhs_metadata.csv of poverty_v1.1.") from err
    needed = ("country", "urban", "wealthpooled")
    if not rows or any(k not in rows[0] for k in needed):
        raise ReproError(f"{path} has no rows or lacks the columns {', '.join(needed)} (found: "
                         f"{', '.join(rows[0]) if rows else 'none'}); it is not WILDS' dhs_metadata.csv.")
    truth = {"true": 1, "1": 1, "1.0": 1, "false": 0, "0": 0, "0.0": 0}
    country, urban, wealth = [], [], []
    for line, row in enumerate(rows, start=2):
        if row["country"] not in DHS_COUNTRIES:
            raise ReproError(f"{path} line {line}: country {row['country']!r} is not one of WILDS' 23 DHS countries.")
        if row["urban"].strip().lower() not in truth:
            raise ReproError(f"{path} line {line}: urban {row['urban']!r} is not True/False.")
        try:
            wealth.append(float(row["wealthpooled"]))
        except ValueError:
            raise ReproError(f"{path} line {line}: wealthpooled {row['wealthpooled']!r} is not a number.") from None
        country.append(row["country"])
        urban.append(truth[row["urban"].strip().lower()])
    return {"country": np.asarray(country), "urban": np.asarray(urban, dtype=np.int64),
            "wealthpooled": np.asarray(wealth, dtype=np.float64)}


def subsample(idxs: np.ndarray, num: int, take_rest: bool, seed: int) -> np.ndarray:
    """WILDS' `subsample_idxs`: shuffle a copy with `default_rng(seed + 541433)`, keep the first `num` or the rest."""
    idxs = np.array(idxs, copy=True)
    np.random.default_rng(seed + SUBSAMPLE_OFFSET).shuffle(idxs)
    return idxs[num:] if take_rest else idxs[:num]


def fold_of_seed(seed: int) -> str:
    """main.py: `args.fold = ['A', 'B', 'C', 'D', 'E'][args.seed % 5]`."""
    return FOLDS[int(seed) % 5]


def fold_splits(countries: np.ndarray, fold: str) -> dict[str, np.ndarray]:
    """Row indices (ascending) of `train`, `id_val`, `id_test`, `val` (OOD) and `test` (OOD) for one fold."""
    if fold not in FOLD_COUNTRIES:
        raise ReproError(f"fold must be one of {', '.join(FOLDS)} (or null: the run's seed % 5), got {fold!r}.")
    rows = np.arange(len(countries))
    ood_test = np.isin(countries, FOLD_COUNTRIES[fold]["test"])
    ood_val = np.isin(countries, FOLD_COUNTRIES[fold]["val"]) & ~ood_test
    in_country = rows[~ood_test & ~ood_val]
    held_out = subsample(in_country, NUM_EVAL, take_rest=False, seed=ord(fold))
    split = {"train": subsample(in_country, NUM_EVAL, take_rest=True, seed=ord(fold)),
             "id_val": held_out[:NUM_EVAL // 2], "id_test": held_out[NUM_EVAL // 2:],
             "val": rows[ood_val], "test": rows[ood_test]}
    return {name: np.sort(idx) for name, idx in split.items()}


# ------------------------------------------------------------------------------------------------ images
def read_image(path: Path, no_nl: bool = False, shape: tuple[int, ...] = IMAGE_SHAPE) -> torch.Tensor:
    """One `landsat_poverty_img_<i>.npz` -> `(8, 224, 224)` float32 (night lights zeroed with `no_nl`)."""
    if not path.is_file():
        raise ReproError(f"PovertyMap image {path} is missing; the images/ folder of poverty_v1.1 is incomplete "
                         f"(re-download from {WILDS_URL}).")
    try:
        with np.load(path, allow_pickle=False) as archive:
            image = np.array(archive["x"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ReproError(f"cannot read {path} as an npz holding 'x' ({type(err).__name__}: {err}); the file is "
                         f"corrupt, re-download poverty_v1.1 from {WILDS_URL}.") from err
    if image.shape != tuple(shape):
        raise ReproError(f"{path}: image of shape {image.shape}, expected {tuple(shape)} (8 bands x 224 x 224, "
                         "poverty_v1.1).")
    if no_nl:
        image[-1] = 0  # WILDS get_input: the night-lights band
    return torch.from_numpy(image).float()


class PovertyImages(Dataset):
    """One split: yields `(image (8, 224, 224) float32, wealth index (1,) float32)`, read from disk per item.

    Attributes:
        rows: `(N,)` row numbers in `dhs_metadata.csv` (= image file numbers).
        targets: `(N, 1)` float32 labels (C-Mixup's partner law reads them all).
        domains: `(N,)` int64 urban flag, the groups of the worst-group r.
        countries: `(N,)` int64 index into `DHS_COUNTRIES`.
    """

    def __init__(self, folder: Path, rows: np.ndarray, meta: dict[str, np.ndarray], no_nl: bool = False,
                 shape: tuple[int, ...] = IMAGE_SHAPE):
        self.folder, self.rows, self.no_nl, self.shape = Path(folder), np.asarray(rows, dtype=np.int64), no_nl, shape
        # float32 as WILDS' y_array (torch.from_numpy(wealthpooled).float())
        self.targets = torch.from_numpy(meta["wealthpooled"][self.rows]).float().reshape(-1, 1)
        self.domains = torch.from_numpy(meta["urban"][self.rows])
        index = {c: i for i, c in enumerate(DHS_COUNTRIES)}
        self.countries = torch.tensor([index[c] for c in meta["country"][self.rows]], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def image_path(self, index: int) -> Path:
        return self.folder / "images" / f"landsat_poverty_img_{int(self.rows[index])}.npz"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return read_image(self.image_path(index), self.no_nl, self.shape), self.targets[index]


def poverty_splits(folder: Path, fold: str, no_nl: bool = False, use_ood_val: bool = True,
                   shape: tuple[int, ...] = IMAGE_SHAPE) -> dict[str, PovertyImages]:
    """`{'train', 'val', 'test'}` of one fold: val = OOD validation (`use_ood_val`, the official) or ID validation."""
    meta = read_metadata(folder / METADATA)
    rows = fold_splits(meta["country"], fold)
    chosen = {"train": rows["train"], "val": rows["val" if use_ood_val else "id_val"], "test": rows["test"]}
    for name, idx in chosen.items():
        if len(idx) == 0:
            raise ReproError(f"{folder / METADATA}: fold {fold} leaves the {name} split empty; the metadata is not "
                             "the full poverty_v1.1 table.")
    return {name: PovertyImages(folder, idx, meta, no_nl, shape) for name, idx in chosen.items()}


@register_dataset("poverty", seeded_split=True)
def _poverty(root: Path | None, allow_download: bool, split_seed: int = 0, *, fold: str | None = None,
             no_nl: bool = False, use_ood_val: bool = True) -> _RawSplits:
    """WILDS PovertyMap, one fold: `fold` (A-E), or null = `split_seed % 5` (main.py; `data.split_seed: null`
    is the run's seed); `no_nl` zeroes the night-lights band; `use_ood_val` selects on OOD validation."""
    folder = poverty_folder(root, allow_download)
    chosen = fold if fold is not None else fold_of_seed(split_seed)
    splits = poverty_splits(folder, chosen, no_nl, use_ood_val)
    info = DataInfo("poverty", "regression", 1, IMAGE_SHAPE[1], None, None, f"folder:{folder} fold:{chosen}")
    return _RawSplits(splits["train"], splits["test"], info, val=splits["val"], ready=True)


# --------------------------------------------------------------------------------------------------- model
@register_model_once
def resnet18_poverty(pretrained: bool = False, num_classes: int = 1, in_chans: int = 8, **kwargs: Any) -> ResNet:
    """`resnet_multispectral.ResNet18(num_classes=1, num_channels=8)`: timm's ResNet-18 with an 8-channel stem and
    no zero-init of the last BN of each block (the official `zero_init_residual=False`); random init only."""
    _entry_kwargs("resnet18_poverty", pretrained, kwargs, ("num_classes", "in_chans"))
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, in_chans=in_chans, zero_init_last=False)
