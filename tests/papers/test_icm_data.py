"""ICM's data (specs/icm.md §1, §4, §5; papers/icm/data.py): idx files, the official CL draws and long-tail
cut written out as the official loops, K-means and purity, and the datasets built through
common.data.build_splits from the committed Fashion-MNIST sample and from tiny idx files written under
tmp_path."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data import build_splits
from common.errors import ReproError
from papers.icm.data import (
    IDX_FILES,
    MINI_DIR,
    biased_complementary_labels,
    biased_transition,
    class_counts,
    cluster_purity,
    kmeans,
    long_tail_indices,
    read_idx,
    uniform_complementary_labels,
    write_idx,
)

MINI_OPTIONS = {"cl": "uniform", "imb_type": "exp", "imb_factor": 1.0, "clusters": "pca", "k_cluster": 10,
                "test_drop_last": 64}


@pytest.fixture
def global_numpy_rng():
    """The official loops use NumPy's global RNG: restore it afterwards."""
    state = np.random.get_state()
    yield
    np.random.set_state(state)


# ------------------------------------------------------------------------------------------------ idx files
@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, name):
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, size=(5, 28, 28)).astype(np.uint8)
    labels = rng.randint(0, 10, size=300).astype(np.uint8)  # > 255: the 4-byte big-endian count
    write_idx(tmp_path / name, images)
    write_idx(tmp_path / f"labels{name[6:]}", labels)
    back = read_idx(tmp_path / name)
    assert back.dtype == np.uint8 and back.shape == (5, 28, 28) and np.array_equal(back, images)
    assert np.array_equal(read_idx(tmp_path / f"labels{name[6:]}"), labels)
    raw = (tmp_path / name).read_bytes()
    raw = gzip.decompress(raw) if name.endswith(".gz") else raw
    assert raw[:4] == bytes([0, 0, 8, 3])
    assert raw[4:16] == (5).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2


def test_idx_reads_the_committed_sample():
    labels = read_idx(MINI_DIR / f"{IDX_FILES[1]}.gz")
    images = read_idx(MINI_DIR / f"{IDX_FILES[0]}.gz")
    assert images.shape == (len(labels), 28, 28) and labels.max() == 9


@pytest.mark.parametrize("cut", [17, 40, 400])
def test_truncated_idx_body_names_the_file(tmp_path, cut):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((2, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ReproError, match="truncated") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_idx_cut_inside_the_header_names_the_file(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    write_idx(path, np.zeros((2, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(ReproError) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_corrupt_idx_files_name_the_file(tmp_path):
    bad_magic = tmp_path / "train-labels-idx1-ubyte"
    bad_magic.write_bytes(bytes([0, 0, 9, 1, 0, 0, 0, 2, 1, 2]))  # 0x09 is a signed-byte idx file
    with pytest.raises(ReproError, match="magic") as err:
        read_idx(bad_magic)
    assert str(bad_magic) in str(err.value)
    not_gzip = tmp_path / "train-images-idx3-ubyte.gz"
    not_gzip.write_bytes(b"this is not a gzip stream at all")
    with pytest.raises(ReproError) as err:
        read_idx(not_gzip)
    assert str(not_gzip) in str(err.value)
    cut_gzip = tmp_path / "t10k-images-idx3-ubyte.gz"
    write_idx(cut_gzip, np.arange(3 * 28 * 28).reshape(3, 28, 28) % 251)
    cut_gzip.write_bytes(cut_gzip.read_bytes()[:-20])
    with pytest.raises(ReproError) as err:
        read_idx(cut_gzip)
    assert str(cut_gzip) in str(err.value)


# ------------------------------------------------------------------------------------------ the CLL setting
def official_uniform_cls(labels, num_classes):
    """base_dataset.py gen_complementary_target, written out: seed 1126, one choice per example."""
    np.random.seed(1126)
    return [np.random.choice([j for j in range(num_classes) if j != labels[i]], 1, False)
            for i in range(len(labels))]


def test_uniform_cls_equal_the_official_loop(global_numpy_rng):
    labels = np.random.RandomState(3).randint(0, 10, size=500)
    ours = uniform_complementary_labels(labels, 10)
    official = np.array([int(c[0]) for c in official_uniform_cls(labels, 10)])
    assert np.array_equal(ours, official)
    assert (ours != labels).all() and ours.dtype == np.int64
    # the CL seed is an option
    assert not np.array_equal(uniform_complementary_labels(labels, 10, seed=7), ours)


def test_biased_transition_weights():
    t = biased_transition(10, 10)
    weights = np.array([100, 77, 59, 46, 35, 27, 21, 16, 12, 10], dtype=float)
    for i in range(10):
        row = weights.copy()
        row[i] = 0.0
        np.testing.assert_allclose(t[i], row / row.sum(), rtol=0, atol=1e-15)
    assert np.allclose(t.sum(axis=1), 1.0) and (np.diag(t) == 0).all()


def test_biased_cls_equal_the_official_loop(global_numpy_rng):
    labels = np.random.RandomState(4).randint(0, 10, size=300)
    t = biased_transition(10, 10)
    np.random.seed(1126)
    official = np.array([np.random.choice(list(range(10)), p=t[y]) for y in labels])
    ours = biased_complementary_labels(labels, 10, 10)
    assert np.array_equal(ours, official) and (ours != labels).all()


def test_class_counts():
    assert class_counts(6000, 10, 0.1) == [6000, 4645, 3596, 2784, 2156, 1669, 1292, 1000, 774, 600]
    assert class_counts(5000, 10, 1.0) == [5000] * 10
    assert class_counts(6000.0, 10, 0.01)[-1] == 60


def test_long_tail_indices_equal_the_official_cut(global_numpy_rng):
    labels = np.repeat(np.arange(4), 20)[np.random.RandomState(5).permutation(80)]
    counts = [20, 11, 6, 3]
    ours = long_tail_indices(labels, counts, np.random.RandomState(9))
    assert np.bincount(labels[ours]).tolist() == counts
    assert len(set(ours.tolist())) == len(ours)
    assert (np.diff(labels[ours]) >= 0).all()  # class order, ascending
    np.random.seed(9)  # gen_imbalanced_data on the global RNG, written out
    official = []
    for the_class, the_num in zip(np.unique(labels), counts, strict=True):
        idx = np.where(labels == the_class)[0]
        np.random.shuffle(idx)
        official.extend(idx[:the_num].tolist())
    assert ours.tolist() == official


# ---------------------------------------------------------------------------------------------- clusters
def test_kmeans_recovers_separated_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0], [20.0, 20.0]])
    truth = torch.arange(4).repeat_interleave(25)
    points = centres[truth] + 0.5 * torch.randn(100, 2, generator=g)
    ids = kmeans(points, 4, seed=1)
    assert ids.dtype == torch.int64 and ids.shape == (100,)
    mapping = {}
    for t, c in zip(truth.tolist(), ids.tolist(), strict=True):
        assert mapping.setdefault(t, c) == c  # each blob is one cluster
    assert len(set(mapping.values())) == 4  # and the four clusters differ
    assert cluster_purity(ids.numpy(), truth.numpy()) == 1.0
    assert torch.equal(kmeans(points, 4, seed=1), ids)  # seeded
    with pytest.raises(ReproError, match="k_cluster"):
        kmeans(points, 101, seed=1)


def test_cluster_purity_hand_example():
    clusters = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    labels = np.array([1, 1, 2, 0, 0, 2, 3, 3])
    # cluster 0: majority 1 (2 of 3); cluster 1: 0 (2 of 2); cluster 2: 3 (2 of 3) -> 6 of 8
    assert cluster_purity(clusters, labels) == pytest.approx(6 / 8)
    assert cluster_purity(labels, labels) == 1.0


# ---------------------------------------------------------------------------------------------- datasets
@pytest.fixture(scope="module")
def mini_splits():
    return build_splits("fashion_mnist_cll-mini", options=dict(MINI_OPTIONS))


def test_mini_dataset_layout(mini_splits):
    train, val, test, info = mini_splits
    targets = train.targets
    assert targets.shape == (len(train), 3) and info.num_classes == 10 and info.task == "classification"
    cl, y, ids = targets[:, 0], targets[:, 1], targets[:, 2]
    assert bool((cl != y).all())  # every CL is a wrong class
    assert int(ids.min()) >= 0 and int(ids.max()) < 10
    assert train.purity == pytest.approx(cluster_purity(ids.numpy(), y.numpy()))
    assert 0.1 < train.purity <= 1.0
    # the exp profile with imb_factor 1 keeps at most N / K per class, class by class in ascending order
    raw_labels = read_idx(MINI_DIR / f"{IDX_FILES[1]}.gz")
    n_max = int(len(raw_labels) / 10)
    want = [min(n_max, int((raw_labels == c).sum())) for c in range(10)]
    assert torch.bincount(y, minlength=10).tolist() == want
    assert bool((y[1:] >= y[:-1]).all())
    assert torch.equal(cl, torch.from_numpy(uniform_complementary_labels(y.numpy(), 10)))
    # val: the first floor(N / b) * b test images, in file order; test: all of them
    test_labels = read_idx(MINI_DIR / f"{IDX_FILES[3]}.gz").astype(np.int64)
    test_images = read_idx(MINI_DIR / f"{IDX_FILES[2]}.gz")
    n_val = (len(test_labels) // 64) * 64
    assert len(val) == n_val < len(test) == len(test_labels)
    assert val.targets.tolist() == test_labels[:n_val].tolist()
    want_images = (torch.from_numpy(test_images[:n_val].astype(np.float32)) / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(val.images, want_images.reshape(n_val, 784))
    torch.testing.assert_close(test.images[:n_val], val.images)
    x, label = test[len(test) - 1]
    assert x.shape == (784,) and int(label) == int(test_labels[-1])


def test_mini_dataset_seeded_and_deterministic(mini_splits):
    again = build_splits("fashion_mnist_cll-mini", options=dict(MINI_OPTIONS))
    assert torch.equal(again[0].targets, mini_splits[0].targets)
    assert torch.equal(again[0].images, mini_splits[0].images)


def test_unknown_dataset_option_lists_the_accepted_ones():
    with pytest.raises(ReproError) as err:
        build_splits("fashion_mnist_cll-mini", options={"k_clusters": 5})
    message = str(err.value)
    assert "k_clusters" in message
    for accepted in ("cl", "transition_bias", "imb_factor", "clusters", "k_cluster", "test_drop_last"):
        assert accepted in message


def test_bad_option_values_are_repro_errors():
    for options, pattern in (({"cl": "random"}, "uniform"), ({"imb_factor": 0.5}, "imb_factor"),
                             ({"clusters": "sift"}, "pca"), ({"imb_type": "step"}, "exp"),
                             ({"clusters": "simsiam"}, "simsiam_checkpoint")):
        with pytest.raises(ReproError, match=pattern):
            build_splits("fashion_mnist_cll-mini", options={**MINI_OPTIONS, **options})


def test_missing_dataset_is_one_error_naming_the_folder(tmp_path):
    with pytest.raises(ReproError) as err:
        build_splits("mnist_cll", root=tmp_path, allow_download=False)
    message = str(err.value)
    assert str(tmp_path) in message and "MNIST" in message and "\n" not in message


def tiny_mnist(seed: int, n_train: int = 40, n_test: int = 20):
    """Tiny MNIST-like arrays: every class in the training set."""
    rng = np.random.RandomState(seed)
    train_x = rng.randint(0, 256, size=(n_train, 28, 28)).astype(np.uint8)
    train_y = np.concatenate([np.arange(10), rng.randint(0, 10, size=n_train - 10)]).astype(np.uint8)
    test_x = rng.randint(0, 256, size=(n_test, 28, 28)).astype(np.uint8)
    test_y = rng.randint(0, 10, size=n_test).astype(np.uint8)
    return train_x, train_y, test_x, test_y


def write_tiny(folder: Path, arrays, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in zip(IDX_FILES, arrays, strict=True):
        write_idx(folder / (f"{stem}.gz" if gz else stem), array)


def test_mnist_from_torchvision_layout_under_root(tmp_path, global_numpy_rng):
    arrays = tiny_mnist(0)
    write_tiny(tmp_path / "MNIST" / "raw", arrays, gz=True)
    train, val, test, info = build_splits("mnist_cll", root=tmp_path, allow_download=False, split_seed=3,
                                          options={"clusters": "labels", "test_drop_last": 8})
    train_x, train_y, test_x, test_y = arrays
    # imb_type exp with MNIST's n_max 5000 keeps every image, class by class, each class shuffled on the
    # global NumPy RNG seeded with the run seed (gen_imbalanced_data)
    np.random.seed(3)
    order = []
    for c in np.unique(train_y):
        idx = np.where(train_y == c)[0]
        np.random.shuffle(idx)
        order.extend(idx[:5000].tolist())
    want = (torch.from_numpy(train_x[order].astype(np.float32)) / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(train.images, want.reshape(len(order), 784))
    assert train.targets[:, 1].tolist() == train_y[order].tolist()
    assert train.targets[:, 2].tolist() == train_y[order].tolist()  # clusters=labels: the oracle ids
    assert train.purity == 1.0
    official = np.array([int(c[0]) for c in official_uniform_cls(train_y[order].astype(np.int64), 10)])
    assert train.targets[:, 0].tolist() == official.tolist()
    assert len(val) == 16 and len(test) == 20 and val.targets.tolist() == test_y[:16].tolist()
    want_test = (torch.from_numpy(test_x.astype(np.float32)) / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(test.images, want_test.reshape(20, 784))
    assert info.mean == (0.1307,) and info.source == str(tmp_path)


def test_kmnist_from_a_flat_folder_without_long_tail(tmp_path):
    arrays = tiny_mnist(1)
    write_tiny(tmp_path, arrays, gz=False)
    train, _, test, info = build_splits("kmnist_cll", root=tmp_path, allow_download=False,
                                        options={"imb_type": None, "clusters": "pixels", "k_cluster": 3,
                                                 "test_drop_last": 0})
    train_x, train_y, _, test_y = arrays
    # Fashion-MNIST's statistics, as the official code
    want = (torch.from_numpy(train_x.astype(np.float32)) / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(train.images, want.reshape(40, 784))  # file order
    assert train.targets[:, 1].tolist() == train_y.tolist()
    assert set(train.targets[:, 2].tolist()) == {0, 1, 2}
    assert len(test) == 20 and test.targets.tolist() == test_y.tolist()
    assert info.classes[0] == "o"


def test_shared_torchvision_root_loads_the_named_dataset(tmp_path):
    fashion = tuple(np.full_like(a, 200) if a.ndim == 3 else a for a in tiny_mnist(2))
    mnist = tuple(np.full_like(a, 50) if a.ndim == 3 else a for a in tiny_mnist(3))
    write_tiny(tmp_path / "FashionMNIST" / "raw", fashion, gz=True)
    write_tiny(tmp_path / "MNIST" / "raw", mnist, gz=True)
    train, _, _, _ = build_splits("mnist_cll", root=tmp_path, allow_download=False,
                                  options={"clusters": "labels", "test_drop_last": 8})
    torch.testing.assert_close(train.images, torch.full_like(train.images, (50 / 255 - 0.1307) / 0.3081))

