"""Tests of the dataset registry (common/data.py): resolution order, layouts, transforms, errors."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from common import data
from common.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_MINI_DIR,
    CIFAR10_STD,
    DATA_ROOT_ENV,
    build_datasets,
    build_splits,
    build_test_dataset,
    list_datasets,
    register_dataset,
)
from common.errors import ReproError

SHARED_DATASETS = data.REPO_ROOT.parent / "shared" / "datasets"


def shared_copy(name: str, marker_file: str) -> Path:
    """Folder of a full dataset copy ($REPRO_DATA_DIR/<name> or ../shared/datasets/<name>), else skip."""
    candidates = [SHARED_DATASETS / name]
    if os.environ.get(DATA_ROOT_ENV):
        candidates.insert(0, Path(os.environ[DATA_ROOT_ENV]) / name)
    for folder in candidates:
        if (folder / marker_file).is_file():
            return folder
    pytest.skip(f"full {name} copy not found in {[str(c) for c in candidates]}")


@pytest.fixture
def no_data_env(monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)


@pytest.fixture
def mini_as_cifar10(tmp_path, monkeypatch):
    """$REPRO_DATA_DIR/cifar10 holding a copy of the mini parquet files."""
    folder = tmp_path / "cifar10"
    folder.mkdir()
    for split in ("train", "test"):
        shutil.copy(CIFAR10_MINI_DIR / f"{split}.parquet", folder / f"{split}.parquet")
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    return folder


def expected_eval_tensor(jpeg: bytes, mean, std) -> torch.Tensor:
    """ToTensor + Normalize written out by hand: (pixel / 255 - mean) / std, channels first."""
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float64) / 255.0
    normalised = (pixels - np.array(mean)) / np.array(std)
    return torch.from_numpy(normalised).permute(2, 0, 1).float()


# ---------------------------------------------------------------------------------------------
# cifar10-mini
# ---------------------------------------------------------------------------------------------


def test_cifar10_mini_loads_without_env(no_data_env):
    train_ds, test_ds, info = build_datasets("cifar10-mini", allow_download=False)
    assert (len(train_ds), len(test_ds)) == (1000, 200)
    assert info.task == "classification" and info.num_classes == 10 and info.image_size == 32
    assert info.classes == CIFAR10_CLASSES
    assert str(CIFAR10_MINI_DIR) in info.source
    assert np.bincount(train_ds.targets, minlength=10).tolist() == [100] * 10
    assert np.bincount(test_ds.targets, minlength=10).tolist() == [20] * 10

    image, label = test_ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 10
    batch = torch.stack([test_ds[i][0] for i in range(200)])
    # Normalised with the CIFAR-10 statistics: per-channel mean near 0 and std near 1.
    assert batch.mean(dim=(0, 2, 3)).abs().max() < 0.2
    assert ((batch.std(dim=(0, 2, 3)) - 1).abs() < 0.2).all()


def test_eval_transform_is_exact_normalisation(no_data_env):
    _, test_ds, info = build_datasets("cifar10-mini", allow_download=False)
    table = pq.read_table(CIFAR10_MINI_DIR / "test.parquet")
    for index in (0, 57, 199):
        row = table.slice(index, 1).to_pylist()[0]
        image, label = test_ds[index]
        assert label == row["label"]
        expected = expected_eval_tensor(row["img"]["bytes"], CIFAR10_MEAN, CIFAR10_STD)
        torch.testing.assert_close(image, expected, atol=1e-5, rtol=0)
    assert info.mean == CIFAR10_MEAN and info.std == CIFAR10_STD


def test_train_transform_random_test_deterministic(no_data_env):
    train_ds, test_ds, _ = build_datasets("cifar10-mini", allow_download=False)
    torch.manual_seed(0)
    assert any(not torch.equal(train_ds[i][0], train_ds[i][0]) for i in range(20))
    assert all(torch.equal(test_ds[i][0], test_ds[i][0]) for i in range(20))
    # Same label whatever the augmentation.
    assert train_ds[3][1] == train_ds[3][1] == int(train_ds.targets[3])


def test_mixup_official_recipe_uses_its_std(no_data_env):
    _, test_ds, info = build_datasets("cifar10-mini", recipe="mixup_official", allow_download=False)
    assert info.std == (0.2023, 0.1994, 0.2010)
    row = pq.read_table(CIFAR10_MINI_DIR / "test.parquet").slice(5, 1).to_pylist()[0]
    expected = expected_eval_tensor(row["img"]["bytes"], info.mean, info.std)
    torch.testing.assert_close(test_ds[5][0], expected, atol=1e-5, rtol=0)


def test_deit_recipe_upsamples_cifar(no_data_env):
    from timm.data import IMAGENET_DEFAULT_MEAN

    train_ds, test_ds, info = build_datasets(
        "cifar10-mini", recipe="deit", image_size=224, allow_download=False
    )
    assert info.image_size == 224 and info.mean == tuple(IMAGENET_DEFAULT_MEAN)
    assert train_ds[0][0].shape == (3, 224, 224)
    assert test_ds[0][0].shape == (3, 224, 224)
    assert torch.equal(test_ds[1][0], test_ds[1][0])


def test_unknown_recipe_lists_valid_ones(no_data_env):
    with pytest.raises(ReproError, match="Did you mean 'cifar'.*deit"):
        build_datasets("cifar10-mini", recipe="cifarr", allow_download=False)


def test_val_split_holds_out_training_examples(no_data_env):
    train_ds, val_ds, _ = build_datasets("cifar10-mini", val_split=100, split_seed=3, allow_download=False)
    assert (len(train_ds), len(val_ds)) == (900, 100)
    assert set(train_ds.indices).isdisjoint(val_ds.indices)
    assert sorted(train_ds.indices + val_ds.indices) == list(range(1000))
    # Seeded: same seed, same hold-out; another seed, another one.
    _, again, _ = build_datasets("cifar10-mini", val_split=100, split_seed=3, allow_download=False)
    _, other, _ = build_datasets("cifar10-mini", val_split=100, split_seed=4, allow_download=False)
    assert again.indices == val_ds.indices and other.indices != val_ds.indices
    # The held-out part is evaluated without augmentation.
    assert torch.equal(val_ds[0][0], val_ds[0][0])
    # The test split stays reachable.
    assert len(build_test_dataset("cifar10-mini", val_split=100, allow_download=False)) == 200


def test_val_split_too_large_is_an_error(no_data_env):
    with pytest.raises(ReproError, match="val_split=1000"):
        build_datasets("cifar10-mini", val_split=1000, allow_download=False)


# ---------------------------------------------------------------------------------------------
# Resolution and layouts
# ---------------------------------------------------------------------------------------------


def test_cifar10_from_repro_data_dir(mini_as_cifar10):
    train_ds, test_ds, info = build_datasets("cifar10", allow_download=False)
    assert (len(train_ds), len(test_ds)) == (1000, 200)
    assert info.name == "cifar10" and str(mini_as_cifar10 / "train.parquet") in info.source


def test_root_argument_wins_over_env(mini_as_cifar10, tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "elsewhere"))
    _, _, info = build_datasets("cifar10", root=mini_as_cifar10, allow_download=False)
    assert str(mini_as_cifar10) in info.source


def write_image_folder(root: Path, classes, colours, per_class: int = 2) -> None:
    for split in ("train", "test"):
        for name, colour in zip(classes, colours, strict=True):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(per_class):
                Image.new("RGB", (32, 32), colour).save(folder / f"{k}.png")


def test_image_folder_wrong_class_count(tmp_path, no_data_env):
    write_image_folder(tmp_path, ["zebra", "apple", "moth"], [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    with pytest.raises(ReproError, match="3 class folders"):
        build_datasets("cifar10", root=tmp_path, allow_download=False)


def test_image_folder_cifar10_names(tmp_path, no_data_env):
    colours = [(25 * k, 255 - 25 * k, 7 * k) for k in range(10)]
    write_image_folder(tmp_path, CIFAR10_CLASSES, colours, per_class=1)
    train_ds, test_ds, info = build_datasets("cifar10", root=tmp_path, allow_download=False)
    assert (len(train_ds), len(test_ds)) == (10, 10)
    assert info.classes == CIFAR10_CLASSES and info.source == f"imagefolder:{tmp_path}"
    for index in range(10):
        image, label = test_ds[index]
        # Solid PNG of the label's colour: the exact normalised value proves order and transform.
        expected = (torch.tensor(colours[label]) / 255.0 - torch.tensor(CIFAR10_MEAN)) / torch.tensor(
            CIFAR10_STD
        )
        torch.testing.assert_close(image[:, 5, 5], expected.float(), atol=1e-5, rtol=0)
    assert sorted(test_ds.targets.tolist()) == list(range(10))


def test_image_folder_other_names_sorted(tmp_path, no_data_env):
    """Class folders that are not the standard names get ImageFolder's sorted order."""
    from common.data import _image_folder_splits

    write_image_folder(tmp_path, ["zebra", "apple", "moth"], [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    _, test, classes = _image_folder_splits(tmp_path, "train", "test", CIFAR10_CLASSES)
    assert classes == ("apple", "moth", "zebra")
    image, label = test[0]
    assert classes[label] == "apple" and image.getpixel((0, 0)) == (0, 255, 0)


def test_unknown_dataset_names_closest():
    with pytest.raises(ReproError, match="Did you mean 'cifar10'") as info:
        build_datasets("cifar11", allow_download=False)
    assert "airfoil" in str(info.value)  # every valid name is listed


def test_missing_folder_names_paths_tried(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    with pytest.raises(ReproError) as info:
        build_datasets("cifar10", root=missing, allow_download=False)
    message = str(info.value)
    assert str(missing) in message and DATA_ROOT_ENV in message and "train.parquet" in message

    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    with pytest.raises(ReproError) as info:
        build_datasets("cifar10", allow_download=False)
    assert str(tmp_path / "cifar10") in str(info.value)

    monkeypatch.delenv(DATA_ROOT_ENV)
    with pytest.raises(ReproError, match=f"\\${DATA_ROOT_ENV} is not set"):
        build_datasets("cifar10", allow_download=False)


def test_truncated_parquet_names_the_file(mini_as_cifar10):
    bad = mini_as_cifar10 / "train.parquet"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(ReproError, match="re-download") as info:
        build_datasets("cifar10", allow_download=False)
    assert str(bad) in str(info.value)


def test_only_one_split_file_is_an_error(mini_as_cifar10):
    (mini_as_cifar10 / "test.parquet").unlink()
    with pytest.raises(ReproError, match="no test.parquet"):
        build_datasets("cifar10", allow_download=False)


def test_out_of_range_labels_are_rejected(mini_as_cifar10):
    path = mini_as_cifar10 / "test.parquet"
    table = pq.read_table(path)
    labels = table.column("label").to_numpy().copy()
    labels[0] = 12
    pq.write_table(table.set_column(1, "label", pa.array(labels)), path)
    with pytest.raises(ReproError, match=r"labels range over \[0, 12\]"):
        build_datasets("cifar10", allow_download=False)


def test_registry():
    # the papers' own datasets are listed too (C-Mixup's, registered by papers/cmixup/data.py)
    assert {"cifar10", "cifar10-mini", "cifar100", "imagenet", "airfoil", "no2", "exchange_rate",
            "electricity", "communities_and_crime", "skillcraft"} <= set(list_datasets())
    with pytest.raises(ReproError, match="registered twice"):
        register_dataset("cifar10")(lambda root, allow_download: None)


# ---------------------------------------------------------------------------------------------
# Full copies (skipped without them)
# ---------------------------------------------------------------------------------------------


@pytest.mark.full_data
def test_airfoil_official_split_from_shared_copy():
    folder = shared_copy("airfoil", data.AIRFOIL_FILE)
    train_ds, val_ds, test_ds, info = data.build_splits("airfoil", root=folder, allow_download=False, split_seed=3)
    assert (len(train_ds), len(val_ds), len(test_ds)) == (1003, 300, 200)
    assert info.task == "regression" and info.num_classes == 1 and info.image_size is None
    features, target = train_ds[0]
    assert features.shape == (5,) and target.shape == (1,) and features.dtype == torch.float32
    # C-Mixup src/data/airfoil.py, written out: seed, permute, min-max over all rows, 1003/300/200
    np.random.seed(3)
    lines = (folder / data.AIRFOIL_FILE).read_text().splitlines()
    table = np.array([[float(v) for v in line.strip().split("\t")] for line in lines])
    table = table[np.random.permutation(len(table))]
    x = (table[:, :5] - table[:, :5].min(0)) / (table[:, :5].max(0) - table[:, :5].min(0))
    for ds, rows in ((train_ds, slice(0, 1003)), (val_ds, slice(1003, 1303)), (test_ds, slice(1303, 1503))):
        assert torch.equal(ds.features, torch.tensor(x[rows], dtype=torch.float32))
        assert torch.equal(ds.targets, torch.tensor(table[rows, 5:], dtype=torch.float32))  # dB, untouched
    # eval split of build_datasets is the validation split; another seed gives another split
    assert len(build_datasets("airfoil", root=folder, allow_download=False)[1]) == 300
    other = data.build_splits("airfoil", root=folder, allow_download=False, split_seed=4)[0]
    assert not torch.equal(other.targets, train_ds.targets)


@pytest.mark.full_data
def test_full_cifar10_from_shared_copy(monkeypatch):
    folder = shared_copy("cifar10", "train.parquet")
    monkeypatch.setenv(DATA_ROOT_ENV, str(folder.parent))
    train_ds, test_ds, _ = build_datasets("cifar10", allow_download=False)
    assert (len(train_ds), len(test_ds)) == (50000, 10000)
    assert np.bincount(train_ds.targets).tolist() == [5000] * 10
    assert test_ds[9999][0].shape == (3, 32, 32)  # decodes one image only


@pytest.mark.full_data
def test_mini_bytes_match_full_copy():
    """The mini sample carries the full copy's JPEG bytes untouched."""
    folder = shared_copy("cifar10", "test.parquet")
    full = pq.read_table(folder / "test.parquet")
    full_by_path = dict(zip(full.column("img").combine_chunks().field("path").to_pylist(), range(len(full))))
    mini = pq.read_table(CIFAR10_MINI_DIR / "test.parquet").to_pylist()
    for row in mini[::40]:
        original = full.slice(full_by_path[row["img"]["path"]], 1).to_pylist()[0]
        assert original["img"]["bytes"] == row["img"]["bytes"] and original["label"] == row["label"]


# ---------------------------------------------------------------------------------------------
# Public sources (the download itself is replaced by a local stand-in: tests use no network)
# ---------------------------------------------------------------------------------------------


def test_hub_fallback_when_no_local_copy(tmp_path, monkeypatch):
    """With no local copy and downloads allowed, the hub dataset is used (its parquet read locally)."""
    import datasets

    def fake_hub(hub_id):
        assert hub_id == "uoft-cs/cifar10"
        files = {split: str(CIFAR10_MINI_DIR / f"{split}.parquet") for split in ("train", "test")}
        return datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "hf"))

    monkeypatch.setattr(data, "_load_from_hub", fake_hub)
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "empty"))
    train_ds, test_ds, info = build_datasets("cifar10", allow_download=True)
    assert (len(train_ds), len(test_ds)) == (1000, 200) and info.source == "hub:uoft-cs/cifar10"
    assert info.classes == CIFAR10_CLASSES
    _, mini_test, _ = build_datasets("cifar10-mini", allow_download=False)
    assert torch.equal(test_ds[17][0], mini_test[17][0]) and test_ds[17][1] == mini_test[17][1]


def test_hub_failure_is_reported(tmp_path, monkeypatch):
    def offline(hub_id):
        raise ConnectionError("no network")

    monkeypatch.setattr(data, "_load_from_hub", offline)
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    with pytest.raises(ReproError, match="uoft-cs/cifar10.*ConnectionError: no network") as info:
        build_datasets("cifar10", allow_download=True)
    assert str(tmp_path / "cifar10") in str(info.value)


def test_imagenet_error_mentions_token(tmp_path, monkeypatch):
    def gated(hub_id):
        raise PermissionError(f"{hub_id} is gated")

    monkeypatch.setattr(data, "_load_from_hub", gated)
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    with pytest.raises(ReproError, match="gated.*huggingface-cli login"):
        build_datasets("imagenet", allow_download=True)


def test_cifar100_parquet_with_fine_label(tmp_path, no_data_env):
    for split in ("train", "test"):
        table = pq.read_table(CIFAR10_MINI_DIR / f"{split}.parquet")
        pq.write_table(table.rename_columns(["img", "fine_label"]), tmp_path / f"{split}.parquet")
    train_ds, _, info = build_datasets("cifar100", root=tmp_path, allow_download=False)
    assert len(train_ds) == 1000 and info.num_classes == 100
    assert info.mean == data.CIFAR100_MEAN and info.std == data.CIFAR100_STD


# ---------------------------------------------------------------------------------------------
# Airfoil on a synthetic file (the real file is tested above, under full_data)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def synthetic_airfoil(tmp_path):
    rng = np.random.default_rng(1)
    table = np.column_stack([rng.normal(loc=10.0 * k, scale=k + 1, size=1503) for k in range(6)])
    np.savetxt(tmp_path / data.AIRFOIL_FILE, table, delimiter="\t")
    return tmp_path, table


def test_airfoil_split_and_min_max_scaling(synthetic_airfoil, no_data_env):
    folder, table = synthetic_airfoil
    train_ds, val_ds, test_ds, info = data.build_splits("airfoil", root=folder, allow_download=False, split_seed=7)
    assert (len(train_ds), len(val_ds), len(test_ds)) == (1003, 300, 200)
    assert info.source.startswith(f"file:{folder / data.AIRFOIL_FILE} sha256=")
    order = data.airfoil_permutation(7)
    np.random.seed(7)  # the official loader: set_seed(seed), then np.random.permutation(1503)
    assert (order == np.random.permutation(1503)).all()
    # disjoint and covering: the three splits' targets are the file's, in permutation order
    targets = torch.cat([train_ds.targets, val_ds.targets, test_ds.targets]).squeeze(1)
    torch.testing.assert_close(targets, torch.tensor(table[order, 5], dtype=torch.float32))
    features = torch.cat([train_ds.features, val_ds.features, test_ds.features])
    assert features.min() == 0 and features.max() == 1  # min/max over ALL rows, not only train
    assert (features.amin(0) == 0).all() and (features.amax(0) == 1).all()
    np.testing.assert_allclose(info.mean, table[:, :5].min(0))
    np.testing.assert_allclose(np.array(info.std), table[:, :5].max(0) - table[:, :5].min(0))
    with pytest.raises(ReproError, match="own validation split \\(300 examples\\)"):
        build_datasets("airfoil", root=folder, val_split=20, allow_download=False)


def test_airfoil_errors(tmp_path, synthetic_airfoil, no_data_env, monkeypatch):
    folder, _ = synthetic_airfoil
    with pytest.raises(ReproError, match="takes no augmentation recipe"):
        build_datasets("airfoil", root=folder, recipe="cifar", allow_download=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(ReproError, match="airfoil_self_noise.dat in \\$REPRO_DATA_DIR/airfoil/"):
        build_datasets("airfoil", root=tmp_path / "none", allow_download=False)
    (folder / data.AIRFOIL_FILE).write_text("1 2 3\n4 5 6\n")
    with pytest.raises(ReproError, match="expected \\(1503, 6\\)"):
        build_datasets("airfoil", root=folder, allow_download=False)
    (folder / data.AIRFOIL_FILE).write_text("1 2 3 4 5 6\n4 5 6 7 8 9\n")
    with pytest.raises(ReproError, match="expected \\(1503, 6\\)"):
        build_datasets("airfoil", root=folder, allow_download=False)


# (C-Mixup's NO2, time series, Crime and SkillCraft loaders: tests/papers/test_cmixup_data.py)


def test_airfoil_mini_loads_on_a_fresh_clone_with_the_official_proportions(monkeypatch):
    monkeypatch.delenv("REPRO_DATA_DIR", raising=False)
    train, val, test, info = build_splits("airfoil-mini", allow_download=False, split_seed=1)
    assert (len(train), len(val), len(test)) == (201, 60, 40) and info.task == "regression"
    features = torch.cat([train.features, val.features, test.features])
    assert float(features.min()) == 0.0 and float(features.max()) == 1.0  # min-max over all rows
    other, _, _, _ = build_splits("airfoil-mini", allow_download=False, split_seed=2)
    assert not torch.equal(train.targets, other.targets)  # one split per seed


@pytest.mark.full_data
def test_airfoil_mini_is_every_fifth_row_of_the_full_file():
    full = Path(__file__).resolve().parents[3] / "shared/datasets/airfoil/airfoil_self_noise.dat"
    if not full.exists():
        pytest.skip("the full Airfoil file is not beside the checkout")
    mini = Path(__file__).resolve().parents[2] / "tests/data/airfoil-mini/airfoil_self_noise.dat"
    assert mini.read_text().splitlines() == full.read_text().splitlines()[::5]
