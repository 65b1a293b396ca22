"""C-Mixup's datasets besides Airfoil, registered into `common.data`'s registry (specs/cmixup.md §3).

Each loader follows the official one in huaxiuyao/C-Mixup `src/data/` (read, not copied):

* `no2`: the StatLib NO2 table (`no2.csv`, 500 rows, target = log NO2 concentration, 7 inputs). The official
  loader (`no2.py`) reads pre-split, pre-scaled `.npy` files that were never published, so the split is rebuilt:
  the in-distribution split of the official tabular loaders (`communities_and_crime.py` / `skillcraft.py` with
  `is_ood = 0`): `np.random.permutation(N)` of the run's seed, first `int(0.7 N)` train, next `int(0.1 N)` valid,
  the rest test (`config.py` 'NO2': `id_train_val_split = [0.7, 0.1, 0.2]`), i.e. 350 / 50 / 100; inputs min-max
  scaled with the min and max of all rows (as every shipped loader does), target untouched.
* `no2_authors`: the authors' `.npy` splits, used as shipped, for whoever has them (`$REPRO_DATA_DIR/no2/`).
* `exchange_rate`, `electricity`: LSTNet windows (`time_series.py` `Data_utility`, normalize=2).
* `communities_and_crime`, `skillcraft`: the out-of-distribution splits (`is_ood = 1`): domains (state; league)
  in ascending id order, whole domains to train until `int(0.7 N)` rows are reached (that domain itself goes to
  validation), the next ones to validation until `int(0.1 N)` more, the rest to test; missing values (`?`) are the
  column mean over all rows; inputs min-max scaled over all rows; each split's order is a seeded permutation
  (the official loaders permute train, valid, test in that order right after `set_seed(seed)`). Every split
  carries the domain of each example (`TabularDataset.domains`), so evaluation reports the worst test domain.
* `rcf_mnist`: rotated, coloured Fashion-MNIST built from the idx file as `src/data/RCF_MNIST.py` (`rcf_mnist.py`;
  `data.root`, else `$REPRO_DATA_DIR/fashion_mnist/`, else Debian's `/usr/share/datasets/fashion-mnist/`).
* `dti`: the authors' `DTI_sub100_*.pkl` (`dti.py`, `$REPRO_DATA_DIR/dti/`), read by a tensors-only unpickler.

Committed samples of a few dozen rows (`tests/data/<name>-mini/`, `scripts/make_cmixup_samples.py`) are
registered as `<name>-mini` with the same parsing and splitting, for smoke runs and tests on a fresh clone
(`rcf_mnist-mini`: the first 120 training images of the committed Fashion-MNIST sample, `tests/data/fashion-mnist-mini/`).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from common.data import (
    DATA_ROOT_ENV,
    REPO_ROOT,
    DataInfo,
    WindowedSeries,
    _find_files,
    _RawSplits,
    _sha256,
    _Tabular,
    register_dataset,
)
from common.errors import ReproError
from papers.cmixup import dti, rcf_mnist

SAMPLES = REPO_ROOT / "tests" / "data"
ID_SPLIT = (0.7, 0.1)  # config.py id_train_val_split [0.7, 0.1, 0.2]: train and valid shares (the rest: test)

NO2_FILE, NO2_COLUMNS = "no2.csv", 8  # target, then 7 inputs
NO2_AUTHOR_FILES = tuple(f"{xy}_{split}.npy" for xy in ("x", "y") for split in ("train", "valid", "test"))
CRIME_FILE, CRIME_COLUMNS = "communities.data", 128
SKILLCRAFT_FILE, SKILLCRAFT_COLUMNS = "SkillCraft1_Dataset.csv", 20
# LSTNet series (laiguokun/multivariate-time-series-data): file, window, horizon (config.py)
TIME_SERIES = {"exchange_rate": ("exchange_rate.txt", 24 * 7, 12), "electricity": ("electricity.txt", 24 * 7, 24)}
TIME_SERIES_URL = "https://github.com/laiguokun/multivariate-time-series-data"
UCI = "https://archive.ics.uci.edu/dataset"


# ------------------------------------------------------------------------------------------ pure helpers
def min_max_stats(features: np.ndarray) -> tuple[tuple, tuple]:
    """`(min, max - min)` per column over all rows, as `(mean, std)` for `(x - mean) / std`.

    A constant column would divide by zero in the official loaders (NaN inputs); it is left at 0 instead."""
    low, high = features.min(axis=0), features.max(axis=0)
    span = high - low
    return tuple(low.tolist()), tuple(np.where(span > 0, span, 1.0).tolist())


def impute_column_means(table: np.ndarray) -> np.ndarray:
    """Missing entries (NaN) replaced by their column's mean over the present ones (the official `data_mean`)."""
    missing = np.isnan(table)
    if missing.all(axis=0).any():
        raise ReproError(f"column(s) {np.flatnonzero(missing.all(axis=0)).tolist()} have no value at all.")
    return np.where(missing, np.nanmean(table, axis=0), table)


def in_distribution_split(n: int, split_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of the official in-distribution split: a seeded permutation cut at int(0.7 n), int(0.1 n)."""
    order = np.random.RandomState(int(split_seed) % 2**32).permutation(n)
    n_train, n_val = int(n * ID_SPLIT[0]), int(n * ID_SPLIT[1])
    return order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]


def domain_split(domains: np.ndarray, split_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of the official out-of-distribution split (`is_ood = 1`), in the official order.

    Domains sorted by id; `idx1` is the first domain at which the cumulative row count reaches `int(0.7 N)`,
    `idx2` the first (from `idx1` on) at which it reaches that count plus `int(0.1 N)`; domains `[:idx1]` train,
    `[idx1:idx2]` valid, `[idx2:]` test. Within a split, rows go by domain then row number, and are then
    permuted by `RandomState(split_seed)`: train, valid, test, in that order (the official loaders do it
    right after `set_seed(seed)`).

    Args:
        domains: `(N,)` integer domain id of each row.
        split_seed: the run's seed.
    """
    ids, counts = np.unique(domains, return_counts=True)
    cumulative = np.cumsum(counts)
    n = len(domains)
    n_train, n_val = int(n * ID_SPLIT[0]), int(n * ID_SPLIT[1])
    idx1 = int(np.argmax(cumulative >= n_train))  # exists: the last cumulative count is N
    later = np.flatnonzero((cumulative >= cumulative[idx1] + n_val) & (np.arange(len(ids)) >= idx1))
    # (the official code would fall back to idx2 = -1 when no domain qualifies; no staged table does that)
    if idx1 == 0 or len(later) == 0 or later[0] == idx1:
        raise ReproError(f"{len(ids)} domains with row counts {counts.tolist()} leave an empty train, validation "
                         "or test split under the official 70 / 10 / 20 rule.")
    idx2 = int(later[0])
    rows_of = [np.flatnonzero(domains == d) for d in ids]
    parts = [np.concatenate(rows_of[a:b]) for a, b in ((0, idx1), (idx1, idx2), (idx2, len(ids)))]
    rng = np.random.RandomState(int(split_seed) % 2**32)
    return tuple(part[rng.permutation(len(part))] for part in parts)


def _source(path: Path, split_seed: int | None) -> str:
    seed = "" if split_seed is None else f" split_seed={split_seed}"
    return f"file:{path} sha256={_sha256(path)}{seed}"


def _tabular_splits(name: str, path: Path, features: np.ndarray, targets: np.ndarray, parts,
                    domains: np.ndarray | None, split_seed: int) -> _RawSplits:
    """Train / valid / test `_Tabular`s from row indices, inputs min-max scaled over all rows."""
    train, val, test = (_Tabular(features[rows], targets[rows], None if domains is None else domains[rows])
                        for rows in parts)
    info = DataInfo(name, "regression", 1, None, None, None, _source(path, split_seed))
    return _RawSplits(train, test, info, stats=min_max_stats(features), val=val)


def _file(name: str, root: Path | None, file: str, where: str, sample: bool) -> Path:
    """The data file: in the committed sample folder (`<name>`-mini) or the user's copy, with a clear error."""
    if sample:
        path = (Path(root) if root is not None else SAMPLES / name) / file
        if not path.is_file():
            raise ReproError(f"the committed sample {path} is missing; rebuild it with "
                             "scripts/make_cmixup_samples.py (needs the full copies in $REPRO_DATA_DIR).")
        return path
    return _find_files(name, root, [file], where) / file


# ------------------------------------------------------------------------------------------------- NO2
def read_no2(path: Path) -> np.ndarray:
    """`(N, 8)` float64: target (log NO2 concentration), then the 7 inputs; header row skipped."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    try:
        table = np.array([[float(v) for v in row] for row in rows[1:] if row], dtype=np.float64)
    except ValueError as err:
        raise ReproError(f"cannot parse {path} ({err}); it should be the StatLib NO2 table with a header row "
                         "(target,cars_per_hour,...).") from err
    if table.ndim != 2 or table.shape[1] != NO2_COLUMNS or len(table) < 10:
        raise ReproError(f"{path} has shape {table.shape}; expected (500, {NO2_COLUMNS}) (target + 7 inputs).")
    return table


def _no2(name: str, root: Path | None, split_seed: int, sample: bool) -> _RawSplits:
    path = _file(name, root, NO2_FILE, "it is OpenML 547 / PMLB 547_no2 / StatLib 'NO2' as CSV with a header, "
                 "target first", sample)
    table = read_no2(path)
    return _tabular_splits(name, path, table[:, 1:], table[:, 0], in_distribution_split(len(table), split_seed),
                           None, split_seed)


@register_dataset("no2", seeded_split=True)
def _no2_full(root: Path | None, allow_download: bool, split_seed: int = 0) -> _RawSplits:
    """NO2, split 350 / 50 / 100 by the seeded permutation (module docstring: the authors' split is not public)."""
    return _no2("no2", root, split_seed, sample=False)


@register_dataset("no2-mini", seeded_split=True)
def _no2_mini(root: Path | None, allow_download: bool, split_seed: int = 0) -> _RawSplits:
    return _no2("no2-mini", root, split_seed, sample=True)


@register_dataset("no2_authors")
def _no2_authors(root: Path | None, allow_download: bool) -> _RawSplits:
    """The authors' NO2 `.npy` splits (7 inputs), used as shipped (`src/data/no2.py`: no rescaling)."""
    folder = _find_files("no2", root, NO2_AUTHOR_FILES, "they are the .npy splits of huaxiuyao/C-Mixup's data "
                         "folder (src/data/NO2/, Google Drive), not public otherwise")
    arrays = {}
    for file in NO2_AUTHOR_FILES:
        try:
            arrays[file[:-4]] = np.load(folder / file).astype(np.float64)
        except (OSError, ValueError) as err:
            raise ReproError(f"cannot read {folder / file} ({err}); re-copy it from the C-Mixup data folder.") from err
    splits = {}
    for split in ("train", "valid", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"].reshape(len(arrays[f"y_{split}"]), -1)
        if x.ndim != 2 or len(x) != len(y) or y.shape[1] != 1:
            raise ReproError(f"{folder}: x_{split}.npy {x.shape} and y_{split}.npy {y.shape} do not pair up as "
                             "(N, D) inputs and (N, 1) targets; re-copy the C-Mixup NO2 files.")
        splits[split] = _Tabular(x, y[:, 0])
    dim = splits["train"].features.shape[1]
    info = DataInfo("no2_authors", "regression", 1, None, None, None, f"folder:{folder}")
    return _RawSplits(splits["train"], splits["test"], info, stats=((0.0,) * dim, (1.0,) * dim),
                      val=splits["valid"])


# ------------------------------------------------------------------------------- Communities and Crime
def read_crime(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(features (N, 122), target (N,), state (N,))` as `communities_and_crime.py` builds them.

    Comma-separated, no header, `?` for missing; column 3 (community name, text) is dropped; columns 0-3 of
    the rest (state, county, community, fold) are not inputs; the last column is `ViolentCrimesPerPop`.
    Missing values become their column's mean over all rows."""
    rows = []
    with open(path, newline="") as fh:
        for number, row in enumerate(csv.reader(fh), start=1):
            if not row:
                continue
            if len(row) != CRIME_COLUMNS:
                raise ReproError(f"{path} line {number} has {len(row)} fields, expected {CRIME_COLUMNS} (UCI "
                                 f"communities.data, comma-separated, no header).")
            del row[3]
            try:
                rows.append([np.nan if v.strip() == "?" else float(v) for v in row])
            except ValueError as err:
                raise ReproError(f"{path} line {number}: {err}; every field but the 4th must be a number or '?'.") \
                    from err
    table = impute_column_means(np.array(rows, dtype=np.float64))
    return table[:, 4:-1], table[:, -1], table[:, 0].astype(np.int64)


def _crime(name: str, root: Path | None, split_seed: int, sample: bool) -> _RawSplits:
    path = _file(name, root, CRIME_FILE, f"it is UCI Communities and Crime ({UCI}/183)", sample)
    features, target, state = read_crime(path)
    return _tabular_splits(name, path, features, target, domain_split(state, split_seed), state, split_seed)


@register_dataset("communities_and_crime", seeded_split=True)
def _crime_full(root: Path | None, allow_download: bool, split_seed: int = 0) -> _RawSplits:
    """Communities and Crime, out-of-distribution over states: 31 / 6 / 9 states, 1,390 / 231 / 373 rows."""
    return _crime("communities_and_crime", root, split_seed, sample=False)


@register_dataset("communities_and_crime-mini", seeded_split=True)
def _crime_mini(root: Path | None, allow_download: bool, split_seed: int = 0) -> _RawSplits:
    return _crime("communities_and_crime-mini", root, split_seed, sample=True)


# -------------------------------------------------------------------------------------------- SkillCraft
def read_skillcraft(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(features (N, 17), target ActionLatency (N,), LeagueIndex (N,))` as `skillcraft.py` builds them.

    Quoted header; fields may be quoted (`"?"` = missing, `"9.6e-06"`), which the official loader `eval`s and a
    CSV reader unquotes. Inputs: every column after GameID and LeagueIndex except ActionLatency (column 13)."""
    with open(path, newline="") as fh:
        rows = [row for row in csv.reader(fh) if row]
    header, body = rows[0], rows[1:]
    if len(header) != SKILLCRAFT_COLUMNS or header[13] != "ActionLatency" or header[1] != "LeagueIndex":
        raise ReproError(f"{path}: header {header[:3]}... is not the UCI SkillCraft1 master table "
                         f"({SKILLCRAFT_COLUMNS} columns, LeagueIndex second, ActionLatency 14th).")
    table = []
    for number, row in enumerate(body, start=2):
        if len(row) != SKILLCRAFT_COLUMNS:
            raise ReproError(f"{path} line {number} has {len(row)} fields, expected {SKILLCRAFT_COLUMNS}.")
        try:
            table.append([np.nan if v.strip() == "?" else float(v) for v in row])
        except ValueError as err:
            raise ReproError(f"{path} line {number}: {err}; fields must be numbers or '?'.") from err
    table = impute_column_means(np.array(table, dtype=np.float64))
    features = np.concatenate([table[:, 2:13], table[:, 14:]], axis=1)
    return features, table[:, 13], table[:, 1].astype(np.int64)


def _skillcraft(name: str, root: Path | None, split_seed: int, sample: bool) -> _RawSplits:
    path = _file(name, root, SKILLCRAFT_FILE, f"it is UCI SkillCraft1 Master Table ({UCI}/272)", sample)
    features, target, league = read_skillcraft(path)
    return _tabular_splits(name, path, features, target, domain_split(league, split_seed), league, split_seed)


@register_dataset("skillcraft", seeded_split=True)
def _skillcraft_full(root: Path | None, allow_download: bool, split_seed: int = 0) -> _RawSplits:
    """SkillCraft, out-of-distribution over leagues: leagues 1-4 / 5 / 6-8, 1,878 / 806 / 711 rows."""
    return _skillcraft("skillcraft", root, split_seed, sample=False)


@register_dataset("skillcraft-mini", seeded_split=True)
def _skillcraft_mini(root: Path | None, allow_download: bool, split_seed: int = 0) -> _RawSplits:
    return _skillcraft("skillcraft-mini", root, split_seed, sample=True)


# ------------------------------------------------------------------------------------------ time series
def _time_series(name: str, root: Path | None, sample: bool = False) -> _RawSplits:
    """LSTNet split of `Data_utility` (normalize=2): each series divided by its max |value| over the whole file;
    rows [P + h - 1, 0.6 n) train, [0.6 n, 0.8 n) valid, [0.8 n, n) test; samples `(window (P, m), row (m,))`."""
    base = name.removesuffix("-mini")
    file, window, horizon = TIME_SERIES[base]
    path = _file(name, root, file, f"{file} is in {TIME_SERIES_URL} (gunzip it)", sample)
    try:
        raw = np.loadtxt(path, delimiter=",", ndmin=2)
    except ValueError as err:
        raise ReproError(f"cannot parse {path} ({err}); it should be comma-separated numbers.") from err
    n, m = raw.shape
    if n < window + horizon + 5:
        raise ReproError(f"{path} has {n} rows; a window of {window} + horizon {horizon} needs more.")
    scale = np.abs(raw).max(axis=0)
    series = torch.as_tensor(raw / np.where(scale > 0, scale, 1.0), dtype=torch.float32)
    n_train, n_valid = int(0.6 * n), int((0.6 + 0.2) * n)
    train, val, test = (WindowedSeries(series, rows, window, horizon) for rows in
                        (range(window + horizon - 1, n_train), range(n_train, n_valid), range(n_valid, n)))
    info = DataInfo(name, "regression", m, None, (0.0,) * m, tuple(scale.tolist()), _source(path, None))
    return _RawSplits(train, test, info, val=val)


@register_dataset("exchange_rate")
def _exchange_rate(root: Path | None, allow_download: bool) -> _RawSplits:
    return _time_series("exchange_rate", root)


@register_dataset("exchange_rate-mini")
def _exchange_rate_mini(root: Path | None, allow_download: bool) -> _RawSplits:
    """The first 400 days of Exchange-Rate (committed), same windows and scaling rule: smoke runs only."""
    return _time_series("exchange_rate-mini", root, sample=True)


@register_dataset("electricity")
def _electricity(root: Path | None, allow_download: bool) -> _RawSplits:
    return _time_series("electricity", root)


# ------------------------------------------------------------------------------------------------ RCF-MNIST
RCF_MINI_IMAGES = 120  # smoke: 80 / 20 / 20 after the official 4 : 1 : 1 split


def _rcf_mnist(name: str, root: Path | None, split_seed: int, sample: bool) -> _RawSplits:
    """RCF-MNIST built from the Fashion-MNIST training images (papers/cmixup/rcf_mnist.py)."""
    if sample:
        folder = Path(root) if root is not None else SAMPLES / "fashion-mnist-mini"  # shared with ICM's tests
        path = folder / f"{rcf_mnist.TRAIN_IMAGES}.gz"
        if not path.is_file():
            raise ReproError(f"the committed sample {path} is missing; rebuild it with `python "
                             "scripts/make_fashion_mnist_mini.py` (needs Fashion-MNIST).")
    else:
        _, path = rcf_mnist.fashion_mnist_folder(root)
    images = rcf_mnist.read_idx(path)
    if sample:
        images = images[:RCF_MINI_IMAGES]
    if images.ndim != 3:
        raise ReproError(f"{path} holds an array of shape {images.shape}; expected (N, 28, 28) images (the "
                         "train-images idx file, not the labels).")
    splits = rcf_mnist.build_rcf_mnist(images, split_seed)
    info = DataInfo(name, "regression", 1, images.shape[1], (0.5,) * 3, (0.5,) * 3, _source(path, split_seed))
    return _RawSplits(splits["train"], splits["test"], info, val=splits["valid"])


@register_dataset("rcf_mnist", seeded_split=True)
def _rcf_mnist_full(root: Path | None, allow_download: bool, split_seed: int = 0) -> _RawSplits:
    """RCF-MNIST from the 60,000 Fashion-MNIST training images: 40,000 / 10,000 / 10,000; 2 test domains."""
    return _rcf_mnist("rcf_mnist", root, split_seed, sample=False)


@register_dataset("rcf_mnist-mini", seeded_split=True)
def _rcf_mnist_mini(root: Path | None, allow_download: bool, split_seed: int = 0) -> _RawSplits:
    """RCF-MNIST from the first 120 images of the committed sample (tests/data/fashion-mnist-mini/): smoke only."""
    return _rcf_mnist("rcf_mnist-mini", root, split_seed, sample=True)


# ------------------------------------------------------------------------------------------------------ DTI
@register_dataset("dti")
def _dti(root: Path | None, allow_download: bool) -> _RawSplits:
    """The authors' DTI subsample (papers/cmixup/dti.py): train 2013-2018, validation (their holdout), test
    2019 and 2020 (the domains)."""
    folder = _find_files("dti", root, dti.DTI_FILES, "they are the DTI_sub100_*.pkl files of huaxiuyao/C-Mixup's "
                         "data folder dti/ (their README's Google Drive link), not rebuilt here")
    splits = {name: rcf_mnist.ImageRegression(*tensors) for name, tensors in dti.dti_splits(folder).items()}
    info = DataInfo("dti", "regression", 1, None, None, None, f"folder:{folder}")
    return _RawSplits(splits["train"], splits["test"], info, val=splits["valid"])


__all__ = ["DATA_ROOT_ENV", "domain_split", "in_distribution_split", "min_max_stats", "read_crime", "read_no2",
           "read_skillcraft"]
