"""C-Mixup's datasets (papers/cmixup/data.py): parsing and splits against the official loaders written out, on the
committed samples (always) and on the full copies (`full_data`, skipped without them); clear errors."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data import DATA_ROOT_ENV, TabularDataset, build_datasets, build_splits
from common.errors import ReproError
from papers.cmixup.data import SAMPLES, domain_split

SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"


def full_copy(name: str, file: str) -> Path:
    for folder in ([Path(os.environ[DATA_ROOT_ENV]) / name] if os.environ.get(DATA_ROOT_ENV) else []) + [SHARED / name]:
        if (folder / file).is_file():
            return folder
    pytest.skip(f"no full copy of {name} ({file}) in $REPRO_DATA_DIR or ../shared/datasets")


# ------------------------------------------------------------------- the official loaders, written out
def official_ood_packet(data: np.ndarray, domain_col: int, x_cols, y_col: int, seed: int):
    """src/data/communities_and_crime.py / skillcraft.py with is_ood = 1, after the table is parsed to floats
    with -1 for '?': mean imputation over entries >= -0.5, domains by np.unique, the cumulative 70 / 10 rule,
    np.random.seed(seed) then permutations of train, valid, test; x min-max over all rows, y raw."""
    data_mean = [data[:, i][data[:, i] >= -0.5].mean() for i in range(data.shape[1])]
    data = np.array([[data[i, j] if data[i, j] >= -0.5 else data_mean[j] for j in range(data.shape[1])]
                     for i in range(data.shape[0])])
    idx2assay = np.array([int(v) for v in data[:, domain_col]])
    lookup = np.unique(idx2assay)
    assay2idx = [np.nonzero(idx2assay == d)[0] for d in lookup]
    counts = [len(ix) for ix in assay2idx]
    forward = [sum(counts[:i + 1]) for i in range(len(counts))]
    train_num, valid_num = int(sum(counts) * 0.7), int(sum(counts) * 0.1)
    idx1 = idx2 = -1
    for i in range(len(forward)):
        if forward[i] >= train_num and idx1 == -1:
            idx1 = i
        if idx1 != -1 and forward[i] >= forward[idx1] + valid_num and idx2 == -1:
            idx2 = i
    np.random.seed(seed)
    train_idx = np.array([k for sub in assay2idx[:idx1] for k in sub])
    valid_idx = np.array([k for sub in assay2idx[idx1:idx2] for k in sub])
    test_idx = np.array([k for sub in assay2idx[idx2:] for k in sub])
    train_idx = train_idx[np.random.permutation(len(train_idx))]
    valid_idx = valid_idx[np.random.permutation(len(valid_idx))]
    test_idx = test_idx[np.random.permutation(len(test_idx))]
    x = data[:, x_cols]
    x = (x - x.min(axis=0)) / (x.max(axis=0) - x.min(axis=0))
    y = data[:, y_col]
    return {split: (x[ix], y[ix], idx2assay[ix]) for split, ix in
            (("train", train_idx), ("valid", valid_idx), ("test", test_idx))}


def official_crime(path: Path, seed: int):
    rows = []
    for line in path.read_text().splitlines():
        t = line.strip().split(",")
        t.pop(3)
        rows.append([-1 if v == "?" else float(v) for v in t])
    data = np.array(rows)
    return official_ood_packet(data, 0, slice(4, -1), -1, seed)


def official_skillcraft(path: Path, seed: int):
    def change_type(v):  # the official eval, on literals only
        v = ast.literal_eval(v)
        return -1 if v == "?" else float(v)

    rows = [[change_type(v) for v in line.strip().split(",")] for line in path.read_text().splitlines()[1:]]
    data = np.array(rows)
    return official_ood_packet(data, 1, np.r_[2:13, 14:data.shape[1]], 13, seed)


def official_id_split(table: np.ndarray, x_cols, y_col: int, seed: int):
    """The in-distribution mode of the same loaders (our NO2 split): permutation, int(0.7 N), int(0.1 N)."""
    np.random.seed(seed)
    order = np.random.permutation(len(table))
    n_train, n_val = int(len(table) * 0.7), int(len(table) * 0.1)
    x = table[:, x_cols]
    x = (x - x.min(axis=0)) / (x.max(axis=0) - x.min(axis=0))
    parts = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    return {split: (x[ix], table[ix, y_col]) for split, ix in zip(("train", "valid", "test"), parts, strict=True)}


def assert_split_equals(ours, official, with_domains=True):
    for ds, split in zip(ours, ("train", "valid", "test"), strict=True):
        x, y = official[split][:2]
        assert torch.equal(ds.features, torch.tensor(x, dtype=torch.float32)), split
        assert torch.equal(ds.targets, torch.tensor(y, dtype=torch.float32).reshape(-1, 1)), split
        if with_domains:
            assert torch.equal(ds.domains, torch.tensor(official[split][2])), split
        else:
            assert ds.domains is None


# ------------------------------------------------------------------------------------ committed samples
@pytest.mark.parametrize("seed", [0, 3])
def test_crime_sample_equals_the_official_ood_loader(seed, monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    train, val, test, info = build_splits("communities_and_crime-mini", allow_download=False, split_seed=seed)
    assert_split_equals((train, val, test), official_crime(SAMPLES / "communities_and_crime-mini" /
                                                           "communities.data", seed))
    assert train.features.shape[1] == 122 and info.task == "regression" and f"split_seed={seed}" in info.source
    # whole states per split, disjoint
    assert not (set(train.domains.tolist()) & set(test.domains.tolist()))
    assert not (set(val.domains.tolist()) & set(test.domains.tolist()))
    assert len(set(test.domains.tolist())) == 2


def test_crime_sample_imputes_missing_values_with_the_column_mean():
    lines = (SAMPLES / "communities_and_crime-mini" / "communities.data").read_text().splitlines()
    column = next(j for j in range(5, 127) if any(line.split(",")[j] == "?" for line in lines))
    values = [line.split(",")[column] for line in lines]
    present = np.array([float(v) for v in values if v != "?"])
    train, val, test, _ = build_splits("communities_and_crime-mini", allow_download=False, split_seed=0)
    raw = np.array([float(v) if v != "?" else present.mean() for v in values])
    feature = column - 5  # columns 0-4 (state, county, community, name, fold) are not inputs
    scaled = (raw - raw.min()) / (raw.max() - raw.min())
    ours = torch.cat([train.features, val.features, test.features])[:, feature].double().sort().values
    torch.testing.assert_close(ours, torch.tensor(np.sort(scaled)), rtol=0, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 5])
def test_skillcraft_sample_equals_the_official_ood_loader(seed):
    path = SAMPLES / "skillcraft-mini" / "SkillCraft1_Dataset.csv"
    text = path.read_text()
    assert '"?"' in text and re.search(r'"[0-9.]+e-[0-9]+"', text)  # quoted missing values and quoted numbers
    train, val, test, _ = build_splits("skillcraft-mini", allow_download=False, split_seed=seed)
    assert_split_equals((train, val, test), official_skillcraft(path, seed))
    assert train.features.shape[1] == 17
    assert sorted(set(test.domains.tolist())) == [7, 8] and set(val.domains.tolist()) == {6}


@pytest.mark.parametrize("seed", [0, 2])
def test_no2_sample_split_is_the_official_in_distribution_rule(seed):
    path = SAMPLES / "no2-mini" / "no2.csv"
    table = np.array([[float(v) for v in line.split(",")] for line in path.read_text().splitlines()[1:]])
    train, val, test, info = build_splits("no2-mini", allow_download=False, split_seed=seed)
    assert (len(train), len(val), len(test)) == (35, 5, 10) and train.features.shape[1] == 7
    assert_split_equals((train, val, test), official_id_split(table, slice(1, 8), 0, seed), with_domains=False)
    assert info.mean == tuple(table[:, 1:].min(axis=0))  # min-max over all rows, target first and raw


def test_exchange_rate_sample_loads_with_lstnet_windows():
    train, val, test, info = build_splits("exchange_rate-mini", allow_download=False)
    assert (len(train), len(val), len(test)) == (240 - 179, 80, 80) and info.num_classes == 8
    x, y = train[0]
    assert x.shape == (168, 8) and y.shape == (8,) and float(train.targets.abs().max()) <= 1.0


def test_time_series_windows_follow_lstnet(tmp_path):
    n, m = 400, 3
    series = np.random.default_rng(0).normal(size=(n, m)) * np.array([1.0, 10.0, 100.0])
    np.savetxt(tmp_path / "exchange_rate.txt", series, delimiter=",")
    train_ds, val_ds, test_ds, info = build_splits("exchange_rate", root=tmp_path, allow_download=False)
    window, horizon = 168, 12
    assert info.num_classes == m and info.std == tuple(np.abs(series).max(0))
    assert (len(train_ds), len(val_ds), len(test_ds)) == (240 - (window + horizon - 1), 80, 80)
    scaled = series / np.abs(series).max(0)
    # Data_utility._batchify: target row t, window rows [t - h - P + 1, t - h + 1)
    for ds, first in ((train_ds, window + horizon - 1), (val_ds, 240), (test_ds, 320)):
        for k in (0, len(ds) - 1):
            x, y = ds[k]
            t = first + k
            assert x.shape == (window, m) and y.shape == (m,)
            torch.testing.assert_close(x, torch.tensor(scaled[t - horizon + 1 - window:t - horizon + 1],
                                                       dtype=torch.float32))
            torch.testing.assert_close(y, torch.tensor(scaled[t], dtype=torch.float32))
    assert train_ds.targets.shape == (len(train_ds), m)


def test_no2_authors_uses_the_shipped_splits_as_is(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in {"train": 20, "valid": 6, "test": 5}.items():
        np.save(tmp_path / f"x_{split}.npy", rng.normal(size=(n, 7)))
        np.save(tmp_path / f"y_{split}.npy", rng.normal(size=(n, 1)))
    train_ds, val_ds, test_ds, info = build_splits("no2_authors", root=tmp_path, allow_download=False)
    assert (len(train_ds), len(val_ds), len(test_ds)) == (20, 6, 5) and info.num_classes == 1
    torch.testing.assert_close(val_ds.features, torch.tensor(np.load(tmp_path / "x_valid.npy"), dtype=torch.float32))
    torch.testing.assert_close(test_ds.targets, torch.tensor(np.load(tmp_path / "y_test.npy"), dtype=torch.float32))
    np.save(tmp_path / "y_test.npy", rng.normal(size=(4, 1)))
    with pytest.raises(ReproError, match="do not pair up"):
        build_splits("no2_authors", root=tmp_path, allow_download=False)


# ------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name,file", [("no2", "no2.csv"), ("exchange_rate", "exchange_rate.txt"),
                                       ("electricity", "electricity.txt"),
                                       ("communities_and_crime", "communities.data"),
                                       ("skillcraft", "SkillCraft1_Dataset.csv")])
def test_absent_full_copies_say_what_to_put_where(tmp_path, monkeypatch, name, file):
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    with pytest.raises(ReproError) as info:
        build_datasets(name, allow_download=True)
    message = str(info.value)
    assert f"$REPRO_DATA_DIR/{name}/" in message and str(tmp_path / name / file) in message
    monkeypatch.delenv(DATA_ROOT_ENV)
    with pytest.raises(ReproError, match="REPRO_DATA_DIR is not set"):
        build_datasets(name)


def test_malformed_files_fail_with_the_line(tmp_path):
    (tmp_path / "communities.data").write_text("8,?,?,Lakewoodcity,1,0.19\n")
    with pytest.raises(ReproError, match="line 1 has 6 fields, expected 128"):
        build_splits("communities_and_crime", root=tmp_path, allow_download=False)
    good = (SAMPLES / "skillcraft-mini" / "SkillCraft1_Dataset.csv").read_text().splitlines()
    (tmp_path / "SkillCraft1_Dataset.csv").write_text("\n".join([good[0], good[1].replace(",", ",x", 1)]) + "\n")
    with pytest.raises(ReproError, match="line 2"):
        build_splits("skillcraft", root=tmp_path, allow_download=False)
    (tmp_path / "no2.csv").write_text("target,a\n1,2\n")
    with pytest.raises(ReproError, match="expected \\(500, 8\\)"):
        build_splits("no2", root=tmp_path, allow_download=False)


def test_domain_split_refuses_a_table_that_leaves_a_split_empty():
    with pytest.raises(ReproError, match="empty"):
        domain_split(np.array([1] * 80 + [2] * 20), split_seed=0)  # one domain holds 70 % of the rows
    train, val, test = domain_split(np.repeat(np.arange(10), 10), split_seed=0)
    assert (len(train), len(val), len(test)) == (60, 10, 30)  # domain 6 reaches 70 rows: it goes to validation
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(100))


def test_tabular_dataset_checks_its_domains():
    features, targets = np.zeros((4, 2)), np.zeros(4)
    assert TabularDataset(features, targets, 0.0, 1.0, domains=np.array([1, 1, 2, 2])).domains.tolist() == [1, 1, 2, 2]
    with pytest.raises(ReproError, match="one id per example"):
        TabularDataset(features, targets, 0.0, 1.0, domains=np.array([1, 2]))


# ----------------------------------------------------------------------------------------- full copies
@pytest.mark.full_data
def test_crime_full_split_is_the_official_one():
    folder = full_copy("communities_and_crime", "communities.data")
    train, val, test, _ = build_splits("communities_and_crime", root=folder, allow_download=False, split_seed=1)
    assert (len(train), len(val), len(test)) == (1390, 231, 373)
    assert len(set(train.domains.tolist())) == 31 and len(set(test.domains.tolist())) == 9
    assert_split_equals((train, val, test), official_crime(folder / "communities.data", 1))


@pytest.mark.full_data
def test_skillcraft_full_split_is_the_official_one():
    folder = full_copy("skillcraft", "SkillCraft1_Dataset.csv")
    train, val, test, _ = build_splits("skillcraft", root=folder, allow_download=False, split_seed=2)
    assert (len(train), len(val), len(test)) == (1878, 806, 711)
    assert set(train.domains.tolist()) == {1, 2, 3, 4} and set(test.domains.tolist()) == {6, 7, 8}
    assert_split_equals((train, val, test), official_skillcraft(folder / "SkillCraft1_Dataset.csv", 2))


@pytest.mark.full_data
def test_no2_full_split():
    folder = full_copy("no2", "no2.csv")
    table = np.loadtxt(folder / "no2.csv", delimiter=",", skiprows=1)
    train, val, test, _ = build_splits("no2", root=folder, allow_download=False, split_seed=4)
    assert (len(train), len(val), len(test)) == (350, 50, 100)
    assert_split_equals((train, val, test), official_id_split(table, slice(1, 8), 0, 4), with_domains=False)
