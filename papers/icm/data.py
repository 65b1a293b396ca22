"""ICM's data: MNIST-family images with complementary labels (CLs) and cluster ids (specs/icm.md §1, §4, §5).

Official code (maitanha/cll_ot 0946ff2, read, not copied): `imb_cll/dataset/clmnist_cluster_label.py` (`CLMNIST`,
`features_space`), `imb_cll/dataset/base_dataset.py` (`get_img_num_per_cls`, `gen_imbalanced_data`,
`gen_complementary_target`, `gen_bias_complementary_label`).

The training set yields `(x (784,), target (3,))` with `target = [complementary label, true label, cluster id]`:
the method learns from the first only; the true label is read to *measure* the complementary-label noise of the
pairs it draws (never to train), the cluster id picks ICM's partners. Evaluation splits yield `(x, true label)`.
`val` is the official score's view of the test set: its first ``floor(N / test_drop_last) * test_drop_last``
images in file order (the official test loader: batch 512, no shuffle, ``drop_last=True``, 272 images never scored);
`test` is all 10,000 images, the honest number.

Order of the official draws, kept exactly:
1. ``imb_type='exp'`` (the README's commands pass it even for balanced data): class by class in ascending order,
   ``np.random.shuffle`` of that class's indices on the global NumPy RNG seeded with the run seed, the first
   ``int(n_max * imb_factor ** (c / (K - 1)))`` kept (``n_max`` = N / K, 5000 for MNIST); the data is then in class
   order. Without it, the file order.
2. CLs on a NumPy RNG seeded with the constant 1126 (`cl_seed`), one draw per example in that order: uniform
   (``np.random.choice`` of 1 from the K - 1 other classes, without replacement) or biased ("setup 2":
   ``np.random.choice(K, p=T[y])``, ``T[i, j] ∝ int(100 (1/b)^(j / (K - 1)))``, ``T[i, i] = 0``). A per-example loop
   here because only it reproduces NumPy's stream draw for draw (once per run, before training; ~1 s).
3. Cluster ids (K-means) over the kept training images, from a named source (`clusters`): ``pca`` (K-means on the
   L2-normalised PCA projection of the normalised pixels), ``pixels`` (on the L2-normalised pixels), ``simsiam``
   (on L2-normalised features of a SimSiam ResNet-18 checkpoint the user supplies: the official source; loaded with
   ``weights_only=True``), or ``labels`` (the true classes: what the official code does with its default
   ``--k_cluster 0`` — an oracle no complementary-label learner has, never reported as ICM).
   Our K-means is Lloyd's algorithm with k-means++ seeding from `cluster_seed`, one start, on torch; the official
   one is scikit-learn's ``KMeans(k, random_state=1126)`` on SimSiam features: the cluster ids differ, and every run
   records the purity of its clusters so the difference is measured, not assumed.

Where the images come from (one line error naming the fix when absent):
* Fashion-MNIST: `data.root`, else ``$REPRO_DATA_DIR/fashion_mnist/``, else Debian's package
  (``apt-get install dataset-fashion-mnist`` → ``/usr/share/datasets/fashion-mnist/``), else torchvision's download.
* MNIST / KMNIST: `data.root`, else ``$REPRO_DATA_DIR/mnist/`` or ``$REPRO_DATA_DIR/kmnist/``, else torchvision's
  download (``allow_download``). A folder may hold the four idx files (``.gz`` or not) directly or in torchvision's
  layout (``<root>/MNIST/raw/``, ``<root>/KMNIST/raw/``, ``<root>/FashionMNIST/raw/``).
* CIFAR-10 (`cifar10_cll`, the paper-scale GPU configuration): the project's CIFAR-10 loader (``common.data``:
  ``$REPRO_DATA_DIR/cifar10/``), decoded once to uint8 arrays; per-channel normalisation of the official
  `clcifar_cluster_label.py`, 5000 images per class before the long-tail cut.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from common.data import (  # noqa: F401  (read_idx / write_idx: the shared idx reader, re-exported)
    DATA_ROOT_ENV,
    REPO_ROOT,
    DataInfo,
    _cache_dir,
    _RawSplits,
    read_idx,
    register_dataset,
    write_idx,
)
from common.errors import ReproError

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
MINI_DIR = REPO_ROOT / "tests" / "data" / "fashion-mnist-mini"
CL_SEED = 1126  # base_dataset.py: np.random.seed(1126) before the CL draw
# (torchvision class, folder under $REPRO_DATA_DIR, torchvision raw folder, normalisation, n_max of the exp profile)
SOURCES = {
    "fashion_mnist": ("FashionMNIST", "fashion_mnist", "FashionMNIST", (0.2860, 0.3530), None),
    "mnist": ("MNIST", "mnist", "MNIST", (0.1307, 0.3081), 5000),  # get_img_num_per_cls: MNIST takes 5000
    "kmnist": ("KMNIST", "kmnist", "KMNIST", (0.2860, 0.3530), None),  # Fashion-MNIST's statistics, as official
    # clcifar_cluster_label.py: CIFAR-10's per-channel statistics; images decoded by common.data's CIFAR loader
    "cifar10": ("CIFAR10", "cifar10", "CIFAR10", ((0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616)), None),
}
CLASSES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
    "mnist": tuple(str(d) for d in range(10)),
    "kmnist": ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}
CLUSTER_SOURCES = ("pca", "pixels", "simsiam", "labels")


# ------------------------------------------------------------------------------------------------ idx files
def _idx_folder(folder: Path, raw_name: str | None = None) -> dict[str, Path] | None:
    """The four idx files in `folder` or in its torchvision subfolder `<raw_name>/raw/` (e.g. MNIST/raw: only the
    named dataset's, so a shared torchvision root never hands out another dataset), `.gz` or not; None if absent."""
    for base in [folder, *([folder / raw_name / "raw"] if raw_name else [])]:
        found = {}
        for stem in IDX_FILES:
            hits = [base / stem, base / f"{stem}.gz"]
            hit = next((h for h in hits if h.is_file()), None)
            if hit is None:
                break
            found[stem] = hit
        else:
            return found
    return None


def find_idx_files(source: str, root: Path | None, allow_download: bool) -> tuple[dict[str, Path], str]:
    """Where the four idx files of `source` are, and a provenance string (rules in the module docstring)."""
    tv_name, env_folder, raw_name, _, _ = SOURCES[source]
    candidates = []
    if root is not None:
        candidates.append(root)
    elif os.environ.get(DATA_ROOT_ENV):
        candidates.append(Path(os.environ[DATA_ROOT_ENV]) / env_folder)
    if root is None and source == "fashion_mnist":
        candidates.append(DEBIAN_FASHION)
    if root is None:
        candidates.append(_cache_dir(env_folder))
    for folder in candidates:
        if folder.is_dir() and (files := _idx_folder(folder, raw_name)) is not None:
            return files, str(folder)
    if allow_download and root is None:
        import torchvision

        target = _cache_dir(env_folder)
        getattr(torchvision.datasets, tv_name)(str(target), train=True, download=True)
        getattr(torchvision.datasets, tv_name)(str(target), train=False, download=True)
        if (files := _idx_folder(target, raw_name)) is not None:
            return files, f"torchvision download into {target}"
    where = ", ".join(str(c) for c in candidates)
    fix = ("`apt-get install dataset-fashion-mnist` (Debian) or put the four idx files in "
           f"${DATA_ROOT_ENV}/fashion_mnist/" if source == "fashion_mnist"
           else f"put the four idx files (torchvision's layout is fine) in ${DATA_ROOT_ENV}/{env_folder}/ or data.root")
    raise ReproError(f"{tv_name} not found (looked in {where}): {fix}.")


# ------------------------------------------------------------------------------------------- the CLL setting
def class_counts(n_max: float, num_classes: int, imb_factor: float) -> list[int]:
    """`get_img_num_per_cls` with imb_type 'exp': ``int(n_max * imb_factor ** (c / (K - 1)))`` per class."""
    return [int(n_max * imb_factor ** (c / (num_classes - 1.0))) for c in range(num_classes)]


def long_tail_indices(labels: np.ndarray, counts: list[int], rng: np.random.RandomState) -> np.ndarray:
    """`gen_imbalanced_data`: class by class (ascending), a shuffled class's first `counts[c]` indices."""
    kept = []
    for c, n in zip(np.unique(labels), counts, strict=False):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        kept.append(idx[:n])
    return np.concatenate(kept)


def uniform_complementary_labels(labels: np.ndarray, num_classes: int, seed: int = CL_SEED) -> np.ndarray:
    """`gen_complementary_target`: per example, one class drawn uniformly from the K - 1 others (NumPy's
    ``choice(..., 1, replace=False)`` on a RandomState seeded with `seed`, draw for draw)."""
    rng = np.random.RandomState(seed)
    others = [np.array([j for j in range(num_classes) if j != c]) for c in range(num_classes)]
    return np.array([rng.choice(others[int(y)], 1, False)[0] for y in labels], dtype=np.int64)


def biased_transition(num_classes: int, transition_bias: float) -> np.ndarray:
    """Setup 2's CL transition `T[y, cl]`: ``int(100 (1/b)^(j / (K - 1)))`` for j != y, rows normalised."""
    weights = np.array([int(100 * (1.0 / transition_bias) ** (j / (num_classes - 1.0))) for j in range(num_classes)],
                       dtype=float)
    t = np.tile(weights, (num_classes, 1))
    np.fill_diagonal(t, 0.0)
    return t / t.sum(axis=1, keepdims=True)


def biased_complementary_labels(labels: np.ndarray, num_classes: int, transition_bias: float,
                                seed: int = CL_SEED) -> np.ndarray:
    """`gen_bias_complementary_label`: ``np.random.choice(K, p=T[y])`` per example, seeded with `seed`."""
    t = biased_transition(num_classes, transition_bias)
    rng = np.random.RandomState(seed)
    return np.array([rng.choice(num_classes, p=t[int(y)]) for y in labels], dtype=np.int64)


# --------------------------------------------------------------------------------------------------- clusters
def kmeans(features: torch.Tensor, k: int, seed: int, iters: int = 100) -> torch.Tensor:
    """Lloyd's K-means with k-means++ seeding (one start), vectorised; returns `(N,)` int64 cluster ids.

    Args:
        features: `(N, D)` float.
        k: number of clusters (<= N).
        seed: seeds the k-means++ draws (a torch Generator).
    """
    x = features.double()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ReproError(f"k_cluster={k} must be between 1 and the {n} training examples.")
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(n, (1,), generator=g)]
    closest = torch.cdist(x, centres).squeeze(1) ** 2
    for _ in range(1, k):  # k-means++: the next centre with probability proportional to the squared distance
        probs = closest / closest.sum() if closest.sum() > 0 else torch.full_like(closest, 1.0 / n)
        new = x[torch.multinomial(probs, 1, generator=g)]
        centres = torch.cat([centres, new])
        closest = torch.minimum(closest, (torch.cdist(x, new).squeeze(1)) ** 2)
    assign = torch.cdist(x, centres).argmin(dim=1)
    for _ in range(iters):
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)  # an empty cluster keeps its centre
        new_assign = torch.cdist(x, centres).argmin(dim=1)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return assign


def pca_project(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`(N, D)` centred and projected on its top `dim` principal axes (eigenvectors of the covariance)."""
    x = x.double()
    centred = x - x.mean(dim=0)
    cov = centred.T @ centred / max(1, x.shape[0] - 1)
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    return centred @ vectors[:, -dim:].flip(1)


def simsiam_features(images: torch.Tensor, checkpoint: str, shape: tuple = (1, 28, 28)) -> torch.Tensor:
    """Features of the official clustering network: torchvision ResNet-18 with a 3x3 stride-1 stem on `shape`,
    the ``module.encoder.`` weights of a SimSiam checkpoint (``state_dict`` key), fc removed (`features_space`)."""
    import torchvision

    from common.safeload import safe_load

    state = safe_load(checkpoint, what="SimSiam checkpoint")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    prefix = "module.encoder."
    encoder = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not k.startswith(prefix + "fc")}
    if not encoder:
        raise ReproError(f"{checkpoint} has no 'module.encoder.*' weights (a SimSiam checkpoint's state_dict); "
                         "give the SimSiam pretraining checkpoint of this dataset.")
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.load_state_dict(encoder, strict=False)
    net.fc = torch.nn.Identity()
    net.eval()
    with torch.no_grad():
        return torch.cat([net(chunk.view(-1, *shape).float()) for chunk in images.split(1024)])


def cluster_ids(images: torch.Tensor, labels: np.ndarray, source: str, k: int, seed: int, pca_dim: int = 50,
                simsiam_checkpoint: str | None = None, shape: tuple = (1, 28, 28)) -> np.ndarray:
    """Cluster id per training image from the named `source` (module docstring)."""
    if source == "labels":
        return np.asarray(labels, dtype=np.int64).copy()
    if source == "pca":
        feats = pca_project(images, min(pca_dim, images.shape[1]))
    elif source == "pixels":
        feats = images
    elif source == "simsiam":
        if not simsiam_checkpoint:
            raise ReproError("clusters=simsiam needs data.options.simsiam_checkpoint: the path of a SimSiam "
                             "ResNet-18 checkpoint pretrained on this dataset.")
        feats = simsiam_features(images, simsiam_checkpoint, shape)
    else:
        raise ReproError(f"clusters={source!r} is not a cluster source; use one of {', '.join(CLUSTER_SOURCES)}.")
    feats = torch.nn.functional.normalize(feats.double(), dim=1)  # features_space: F.normalize before K-means
    return kmeans(feats, k, seed).numpy()


def cluster_purity(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Share of examples whose cluster's majority true class is their own class."""
    clusters, labels = np.asarray(clusters), np.asarray(labels)
    k, classes = int(clusters.max()) + 1, int(labels.max()) + 1
    table = np.zeros((k, classes), dtype=np.int64)
    np.add.at(table, (clusters, labels), 1)
    return float(table.max(axis=1).sum() / max(1, len(labels)))


# --------------------------------------------------------------------------------------------------- datasets
class CLLTrainSet(Dataset):
    """Flat normalised images with `[complementary label, true label, cluster id]` targets."""

    def __init__(self, images: torch.Tensor, complementary: np.ndarray, labels: np.ndarray, clusters: np.ndarray,
                 purity: float):
        self.images = images
        self.targets = torch.stack([torch.as_tensor(np.asarray(a), dtype=torch.int64)
                                    for a in (complementary, labels, clusters)], dim=1)
        self.purity = purity

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


class LabelledImages(Dataset):
    def __init__(self, images: torch.Tensor, labels: np.ndarray):
        self.images, self.targets = images, torch.as_tensor(np.asarray(labels), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


def normalise(images: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 `(N, H, W)` or `(N, H, W, C)` → float32 `(N, C*H*W)` channel-first, ToTensor then Normalize."""
    pixels = torch.from_numpy(np.array(images, dtype=np.float32))  # a copy: idx arrays are read-only buffers
    if pixels.dim() == 3:
        pixels = pixels.unsqueeze(-1)
    pixels = pixels.permute(0, 3, 1, 2) / 255.0
    mean = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    return ((pixels - mean) / std).reshape(len(images), -1)


def read_idx_splits(files: dict[str, Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) of the four idx files."""
    return (read_idx(files[IDX_FILES[0]]), read_idx(files[IDX_FILES[1]]).astype(np.int64),
            read_idx(files[IDX_FILES[2]]), read_idx(files[IDX_FILES[3]]).astype(np.int64))


def build_cll(source: str, splits: tuple, origin: str, split_seed: int, *, cl: str, transition_bias: float,
              cl_seed: int, imb_type: str | None, imb_factor: float, clusters: str, k_cluster: int,
              cluster_seed: int, pca_dim: int, simsiam_checkpoint: str | None, test_drop_last: int,
              name: str) -> _RawSplits:
    """The complementary-label training set, the official test view and the full test set (module docstring).
    `splits`: uint8 train images, int labels, test images, labels (`read_idx_splits`, `cifar_arrays`)."""
    _, _, _, (mean, std), n_max = SOURCES[source]
    train_x, train_y, test_x, test_y = splits
    num_classes = 10
    if imb_type not in (None, "exp"):
        raise ReproError(f"imb_type={imb_type!r}: use 'exp' (the README's commands) or null (file order, all data).")
    if imb_type == "exp":
        if imb_factor not in (0.01, 0.02, 0.1, 1, 1.0):
            # weighting_calculation accepts these only (any other value crashes the official run)
            raise ReproError(f"imb_factor={imb_factor} is not one the official code runs (0.01, 0.02, 0.1, 1).")
        counts = class_counts(n_max or len(train_y) / num_classes, num_classes, imb_factor)
        keep = long_tail_indices(train_y, counts, np.random.RandomState(split_seed))
        train_x, train_y = train_x[keep], train_y[keep]
    if cl == "uniform":
        comp = uniform_complementary_labels(train_y, num_classes, cl_seed)
    elif cl == "biased":
        comp = biased_complementary_labels(train_y, num_classes, transition_bias, cl_seed)
    else:
        raise ReproError(f"cl={cl!r}: use 'uniform' (setup 1) or 'biased' (setup 2, with transition_bias).")
    images = normalise(train_x, mean, std)
    shape = (1, *train_x.shape[1:3]) if train_x.ndim == 3 else (train_x.shape[3], *train_x.shape[1:3])
    ids = cluster_ids(images, train_y, clusters, k_cluster, cluster_seed, pca_dim, simsiam_checkpoint, shape)
    purity = cluster_purity(ids, train_y)
    test_images = normalise(test_x, mean, std)
    n_scored = (len(test_y) // test_drop_last) * test_drop_last if test_drop_last else len(test_y)
    if n_scored == 0:
        raise ReproError(f"test_drop_last={test_drop_last} exceeds the {len(test_y)} test images: lower it.")
    channels = 1 if train_x.ndim == 3 else train_x.shape[-1]
    info = DataInfo(name=name, task="classification", num_classes=num_classes, image_size=int(train_x.shape[1]),
                    mean=tuple(np.broadcast_to(mean, channels).tolist()),
                    std=tuple(np.broadcast_to(std, channels).tolist()), source=origin, classes=CLASSES[source])
    return _RawSplits(
        train=CLLTrainSet(images, comp, train_y, ids, purity),
        val=LabelledImages(test_images[:n_scored], test_y[:n_scored]),
        test=LabelledImages(test_images, test_y), info=info, ready=True)


def _register(name: str, source: str, mini: bool = False):
    @register_dataset(name, seeded_split=True)
    def builder(root: Path | None, allow_download: bool, split_seed: int = 0, *, cl: str = "uniform",
                transition_bias: float = 10.0, cl_seed: int = CL_SEED, imb_type: str | None = "exp",
                imb_factor: float = 1.0, clusters: str = "pca", k_cluster: int = 50, cluster_seed: int = CL_SEED,
                pca_dim: int = 50, simsiam_checkpoint: str | None = None, test_drop_last: int = 512) -> _RawSplits:
        if source == "cifar10":
            splits, origin = cifar_arrays(root, allow_download)
        elif mini:
            files, origin = _idx_folder(MINI_DIR), f"committed sample {MINI_DIR.relative_to(REPO_ROOT)}"
            if files is None:
                raise ReproError(f"the committed sample {MINI_DIR} is missing; restore it with git checkout.")
            splits = read_idx_splits(files)
        else:
            files, origin = find_idx_files(source, root, allow_download)
            splits = read_idx_splits(files)
        return build_cll(source, splits, origin, split_seed, cl=cl, transition_bias=transition_bias, cl_seed=cl_seed,
                         imb_type=imb_type, imb_factor=imb_factor, clusters=clusters, k_cluster=k_cluster,
                         cluster_seed=cluster_seed, pca_dim=pca_dim, simsiam_checkpoint=simsiam_checkpoint,
                         test_drop_last=test_drop_last, name=name)

    return builder


def cifar_arrays(root: Path | None, allow_download: bool) -> tuple[tuple, str]:
    """CIFAR-10 decoded to uint8 `(N, 32, 32, 3)` arrays through the project's CIFAR-10 loader (local parquet or
    folder copy, `$REPRO_DATA_DIR/cifar10`, or its download)."""
    from common.data import _DATASETS

    raw = _DATASETS["cifar10"](root, allow_download)
    out = []
    for split in (raw.train, raw.test):
        out += [np.stack([np.asarray(split[i][0]) for i in range(len(split))]),
                np.asarray([split[i][1] for i in range(len(split))], dtype=np.int64)]
    return tuple(out), raw.info.source


for _name, _source in OrderedDict([("fashion_mnist_cll", "fashion_mnist"), ("mnist_cll", "mnist"),
                                   ("kmnist_cll", "kmnist"), ("cifar10_cll", "cifar10")]).items():
    _register(_name, _source)
_register("fashion_mnist_cll-mini", "fashion_mnist", mini=True)
