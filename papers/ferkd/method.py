"""FKD training on stored region labels, with FerKD's SelfMix — the `fkd` method.

"A Fast Knowledge Distillation Framework for Visual Recognition" (Shen, Xing; ECCV 2022, arXiv 2112.01528) and
"FerKD: Surgical Label Adaptation for Efficient Distillation" (Shen; ICCV 2023, arXiv 2312.17473). Official
code: szq0214/FKD (read at afd5294): this step mirrors ``FKD/train_FKD.py`` ``train()`` and ``utils_FKD.py``
(`ImageFolder_FKD`, `Recover_soft_label`, `Soft_CrossEntropy`, `mixup_cutmix`).

* Data (`RegionDataset`): each load of an image draws ``r = randperm(R_i)`` and rebuilds the stored regions
  ``r[:crops]`` (distinct within a load, with replacement across loads): crop at the stored fractions times
  the image size, resize bilinear, stored flip, normalise. It yields ``(crops (n, C, S, S), targets (n, 2 +
  L))`` with each target row ``[ground truth, region index, stored label flattened]``.
* Step: rows concatenated **crop-major** (crop 1 of every image, then crop 2, ...), labels recovered
  (`recover_soft_labels`), optional official Mixup/CutMix across images, optional SelfMix, loss
  ``SCE(z / tau, t)`` (no hard-label term, no tau^2). FerKD is this method on an adapted label set.
* Epochs (`fkd_passes`): a pass over the images with n crops each counts n epochs (the lr is set once per pass
  at the pass's first epoch); the last n epochs run one crop per image with n times as many images per batch,
  as the official loop. ``train.batch_size`` is the official ``-b`` (rows per step): ceil(b / n) images per
  multi-crop batch. Needs ``schedule.per: epoch``.

Deviations: randomness comes from the step's generator (the official code uses NumPy's and torch's global
RNGs; same laws and draw order); SelfMix's operator, alpha and probability are not published (configs that set
them are ``*_placeholder``); in single-crop passes SelfMix has no second crop of the image and does nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from common.errors import ReproError
from common.methods import Method, TrainPass, register_method
from common.mixing import (
    cutmix_box,
    mix_targets,
    mixup_images,
    paste_box,
    sample_beta,
    smooth_one_hot,
    soft_target_cross_entropy,
)
from papers.ferkd.labels import (
    RegionLabels,
    canonical_label_type,
    label_shape,
    load_label_set,
    recover_soft_labels,
)

TARGET_SOURCES = ("teacher", "ground_truth")


# ------------------------------------------------------------------------------------------ epoch plan
def fkd_passes(epochs: int, n_crops: int, batch_size: int) -> list[TrainPass]:
    """The official epoch loop of ``train_FKD.py``: ``for epoch in range(0, E, n)``, and from the first such
    epoch >= E - n on, one single-crop epoch at a time up to E - 1.

    Multi-crop passes load ceil(b / n) images per batch (n rows each); single-crop passes ceil(b / n) * n.
    E = 300, n = 4: passes at epochs 0, 4, ..., 292 (74 of them) and single-crop epochs 296..299."""
    if n_crops < 1:
        raise ReproError(f"method.n_crops must be >= 1, got {n_crops}.")
    images = math.ceil(batch_size / n_crops)
    plan, epoch = [], 0
    while epoch < epochs - n_crops:
        plan.append(TrainPass(epoch, n_crops, images, {"crops": n_crops}))
        epoch += n_crops
    plan += [TrainPass(e, 1, images * n_crops, {"crops": 1}) for e in range(epoch, epochs)]
    return plan


# ---------------------------------------------------------------------------------------------- data
def untransformed(train_ds) -> tuple[Dataset, np.ndarray | None]:
    """The training images as PIL images `(image, label)` (the recipe's transform removed), and the indices
    into them of `train_ds`'s items (None: all, in order)."""
    indices = None
    if isinstance(train_ds, Subset):
        indices = np.asarray(train_ds.indices, dtype=np.int64)
        train_ds = train_ds.dataset
    base = getattr(train_ds, "base", None)
    if base is None:
        raise ReproError(f"FKD rebuilds regions from the raw training images, but {type(train_ds).__name__} does not "
                         "expose them (an image dataset of common.data is needed).")
    return base, indices


def rebuild_region(image, box, flip: bool, size: int, interpolation=InterpolationMode.BILINEAR):
    """One stored region as the official student loader rebuilds it (`RandomResizedCrop_FKD`).

    Args:
        image: PIL image.
        box: (4,) stored fractions (top/H, left/W, height/H, width/W), float32 or float16.
        flip: the stored flip.
        size: output side.

    Returns:
        PIL image (size, size). The fractions times the image size are passed to ``resized_crop`` as floats,
        as officially; Pillow rounds the crop box, which gives back the generation box (spec §5.3).
    """
    width, height = image.size
    top, left, h, w = (float(v) for v in box)
    out = TF.resized_crop(image, top * height, left * width, h * height, w * width, [size, size], interpolation)
    return TF.hflip(out) if flip else out


class RegionDataset(Dataset):
    """FKD's training data: stored regions of each image with their labels (official `ImageFolder_FKD`).

    Args:
        images: dataset of `(PIL image, label)`, indexed like the label set's ``image`` ids.
        labels: the label set (every image it covers).
        crops: regions per load (distinct within a load).
        size: output side (the student's input size).
        mean, std: normalisation.
        indices: item i is image ``indices[i]`` (a validation hold-out); None: every image of the label set.
        generator: draws the regions of each load; None uses torch's global RNG (what a DataLoader worker
            seeds), as the official ``torch.randperm`` in the worker.
    """

    def __init__(self, images, labels: RegionLabels, crops: int, size: int, mean, std, indices=None,
                 generator: torch.Generator | None = None):
        self.images, self.labels, self.crops, self.size = images, labels, int(crops), int(size)
        self.mean, self.std = list(mean), list(std)
        self.generator = generator
        position = np.full(int(labels.image.max()) + 1 if len(labels.image) else 0, -1, dtype=np.int64)
        position[labels.image] = np.arange(len(labels.image))
        wanted = np.arange(len(images)) if indices is None else np.asarray(indices)
        if len(wanted) and (wanted.max() >= len(position) or np.any(position[wanted] < 0)):
            missing = wanted[(wanted >= len(position)) | (position[np.minimum(wanted, len(position) - 1)] < 0)]
            raise ReproError(f"the label set has no regions for {len(missing)} training images (e.g. image "
                             f"{int(missing[0])}); it was built for another dataset or split: rebuild it.")
        self.rows = position[wanted]
        short = labels.counts[self.rows] < self.crops
        if short.any():
            raise ReproError(f"{int(short.sum())} images have fewer than {self.crops} stored regions (FKD draws "
                             f"{self.crops} distinct regions per load): lower method.n_crops or keep more regions.")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        row = int(self.rows[index])
        image_id = int(self.labels.image[row])
        image, label = self.images[image_id]
        start, count = int(self.labels.offsets[row]), int(self.labels.counts[row])
        chosen = start + torch.randperm(count, generator=self.generator)[: self.crops].numpy()
        crops, targets = [], []
        for r in chosen:
            crop = rebuild_region(image, self.labels.boxes[r], bool(self.labels.flips[r]), self.size)
            crops.append(TF.normalize(TF.to_tensor(crop), self.mean, self.std))
            stored = np.asarray(self.labels.labels[r], dtype=np.float32).reshape(-1)
            targets.append(np.concatenate([[label, self.labels.region[r]], stored]).astype(np.float32))
        return torch.stack(crops), torch.from_numpy(np.stack(targets))


# --------------------------------------------------------------------------------------------- mixing
@dataclass
class FKDMixDraws:
    """One step's draws of the official `mixup_cutmix`, in its order: gate, switch, lam, partner, box centre."""

    gate: float
    switch: float
    lam: float
    partner: torch.Tensor
    row: int  # first np.random.randint (the box centre along H: the official rand_bbox calls H "W")
    col: int


def draw_fkd_mix(generator, rows: int, image_hw, mixup_alpha: float, cutmix_alpha: float, prob: float,
                 switch_prob: float) -> FKDMixDraws:
    gate, switch = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
    use_mixup = switch < switch_prob
    lam = float(sample_beta(mixup_alpha if use_mixup else cutmix_alpha, 1, generator)[0])
    partner = torch.randperm(rows, generator=generator)
    row = int(torch.randint(0, image_hw[0], (1,), generator=generator))
    col = int(torch.randint(0, image_hw[1], (1,), generator=generator))
    return FKDMixDraws(gate, switch, lam, partner, row, col)


def fkd_mixup_cutmix(images: torch.Tensor, soft: torch.Tensor, draws: FKDMixDraws, prob: float,
                     switch_prob: float):
    """The official `mixup_cutmix` on given draws: with U < prob, U < switch_prob selects **Mixup** (the help text
    says CutMix; the code mixes), else CutMix with the official box and area-corrected lam.

    Args:
        images: (N, C, H, W); soft: (N, K) recovered labels.

    Returns:
        (images, soft targets, lam) after mixing.
    """
    if not draws.gate < prob:
        return images, soft, 1.0
    if draws.switch < switch_prob:
        return (mixup_images(images, draws.partner, draws.lam), mix_targets(soft, draws.partner, draws.lam),
                draws.lam)
    box, lam = cutmix_box(draws.lam, draws.row, draws.col, tuple(images.shape[-2:]))
    return paste_box(images, draws.partner, box), mix_targets(soft, draws.partner, lam), lam


def selfmix_partners(n_crops: int, images_per_crop: int) -> torch.Tensor:
    """SelfMix partners in the crop-major layout: row (k, i) mixes with crop (k + 1) mod n of the same image i,
    i.e. row ((k + 1) mod n) * B + i: a roll of the batch by B rows."""
    rows = torch.arange(n_crops * images_per_crop)
    return (rows + images_per_crop) % (n_crops * images_per_crop)


# --------------------------------------------------------------------------------------------- method
@register_method("fkd")
class FKD(Method):
    """FKD / FerKD training on a stored label set (module docstring)."""

    @dataclass
    class Params:
        labels: str = ""  # the label set's manifest.json (FKD's, or a FerKD rewrite of it)
        n_crops: int = 4  # official --num_crops
        temperature: float = 1.0  # official --temp: the student's logits are divided by it
        target: str = "teacher"  # teacher (stored soft labels) | ground_truth (CE on the same regions)
        # official --mixup_cutmix (ViT recipe): cross-image Mixup 0.8 / CutMix 1.0, switch 0.5, on every step
        mixup_cutmix: bool = False
        mixup_alpha: float = 0.8
        cutmix_alpha: float = 1.0
        mix_prob: float = 1.0
        switch_prob: float = 0.5  # P(Mixup), as the official code uses it
        # FerKD SelfMix: mix each crop with another crop of the same image (values not published)
        selfmix: bool = False
        selfmix_op: str = "cutmix"  # cutmix | mixup
        selfmix_alpha: float = 1.0
        selfmix_prob: float = 1.0

    def __init__(self, params, num_classes, label_smoothing=0.0, task="classification"):
        super().__init__(params, num_classes, label_smoothing, task)
        p = self.params
        if task != "classification":
            raise ReproError("method 'fkd' trains on class soft labels; it needs a classification dataset.")
        if not p.labels:
            raise ReproError("method 'fkd' needs method.labels: the manifest.json of a region label set.")
        if p.target not in TARGET_SOURCES:
            raise ReproError(f"method.target must be one of {', '.join(TARGET_SOURCES)}, got {p.target!r}.")
        if p.selfmix_op not in ("cutmix", "mixup"):
            raise ReproError(f"method.selfmix_op must be 'cutmix' or 'mixup', got {p.selfmix_op!r}.")
        if p.n_crops < 1 or p.temperature <= 0:
            raise ReproError(f"method.n_crops must be >= 1 and method.temperature > 0, got {p.n_crops}, "
                             f"{p.temperature}.")
        if label_smoothing:
            raise ReproError("method 'fkd' takes its targets from the label set; set train.label_smoothing=0.")
        self.region_labels: RegionLabels | None = None
        self.manifest: dict = {}

    # -- what the trainer and the workflow ask
    def inputs(self) -> list[str]:
        return [self.params.labels]

    def passes(self, epochs: int, batch_size: int) -> list[TrainPass]:
        return fkd_passes(epochs, self.params.n_crops, batch_size)

    def prepare(self, train_ds, info) -> None:
        # memory-mapped: every process and loader worker shares the per-region arrays through the page cache
        labels, manifest = load_label_set(self.params.labels, mmap=True)
        if manifest.get("num_classes") != info.num_classes:
            raise ReproError(f"label set {self.params.labels} has {manifest.get('num_classes')} classes, the "
                             f"dataset {info.name} {info.num_classes}.")
        self.label_type = canonical_label_type(manifest["label_type"])
        images, indices = untransformed(train_ds)
        if len(labels.image) != len(images):
            raise ReproError(f"label set {self.params.labels} covers {len(labels.image)} images, the training split "
                             f"of {info.name} has {len(images)}: it was built for another dataset; rebuild it.")
        targets = np.asarray(images.targets)[labels.image]
        if not np.array_equal(targets, labels.target):
            raise ReproError(f"label set {self.params.labels} does not match the order of {info.name}'s training "
                             "images (their classes differ); rebuild it for this dataset.")
        self.region_labels, self.manifest = labels, manifest
        self._images, self._indices, self._info = images, indices, info

    def train_dataset(self, train_ds, info, train_pass: TrainPass):
        if self.region_labels is None:
            self.prepare(train_ds, info)
        return RegionDataset(self._images, self.region_labels, train_pass.options["crops"], info.image_size,
                             info.mean, info.std, self._indices)

    def epoch_stats(self) -> dict | None:
        stats = self.manifest.get("stats")
        return {"label_set": self.manifest.get("fingerprint"), **(stats or {})} if self.manifest else None

    def state_dict(self) -> dict:
        return {"label_set": self.manifest.get("fingerprint")}

    def load_state_dict(self, state: dict) -> None:
        saved, now = state.get("label_set"), self.manifest.get("fingerprint")
        if saved is not None and now is not None and saved != now:
            raise ReproError(f"this run's checkpoint was trained on another version of {self.params.labels} (label "
                             f"set {saved}, now {now}): delete the run's folder to retrain on the new labels.")

    # -- one step
    def targets_from_batch(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, n, 2 + L) loader targets -> crop-major (n B,) ground truth, (n B,) region ids, (n B, K) soft labels."""
        b, n = targets.shape[:2]
        flat = targets.transpose(0, 1).reshape(n * b, -1)
        gt, region = flat[:, 0].long(), flat[:, 1].long()
        if self.params.target == "ground_truth":
            return gt, region, smooth_one_hot(gt, self.num_classes)
        stored = flat[:, 2:].reshape(n * b, *label_shape(self.label_type))
        return gt, region, recover_soft_labels(stored, self.label_type, self.num_classes)

    def step(self, model, batch, ctx):
        crops, targets = batch  # (B, n, C, H, W), (B, n, 2 + L)
        b, n = crops.shape[:2]
        images = crops.transpose(0, 1).reshape(n * b, *crops.shape[2:])  # crop-major, as torch.cat(images)
        gt, _, soft = self.targets_from_batch(targets)
        p, stats = self.params, {}
        if p.mixup_cutmix:
            draws = draw_fkd_mix(ctx.generator, n * b, images.shape[-2:], p.mixup_alpha, p.cutmix_alpha,
                                 p.mix_prob, p.switch_prob)
            images, soft, lam = fkd_mixup_cutmix(images, soft, draws, p.mix_prob, p.switch_prob)
            stats["lam"] = lam
        if p.selfmix:
            images, soft, lam = self.selfmix(images, soft, n, b, ctx.generator)
            stats["selfmix_lam"] = lam
        logits = model(images)
        loss = soft_target_cross_entropy(logits / p.temperature, soft)
        top1 = (logits.detach().argmax(dim=1) == gt).float().mean()
        return {"loss": loss, "logits": logits, "top1": top1, **stats}

    def selfmix(self, images, soft, n_crops: int, images_per_crop: int, generator):
        """Mix every crop with the next crop of its own image (`selfmix_partners`); one gate, lam and box per step.

        Draw order: gate U(0, 1), lam ~ Beta(alpha, alpha), box centre (row, column)."""
        p = self.params
        gate = float(torch.rand(1, generator=generator, dtype=torch.float64))
        lam = float(sample_beta(p.selfmix_alpha, 1, generator)[0])
        row = int(torch.randint(0, images.shape[-2], (1,), generator=generator))
        col = int(torch.randint(0, images.shape[-1], (1,), generator=generator))
        if n_crops < 2 or not gate < p.selfmix_prob:
            return images, soft, 1.0
        partner = selfmix_partners(n_crops, images_per_crop)
        if p.selfmix_op == "mixup":
            return mixup_images(images, partner, lam), mix_targets(soft, partner, lam), lam
        box, lam = cutmix_box(lam, row, col, tuple(images.shape[-2:]))
        return paste_box(images, partner, box), mix_targets(soft, partner, lam), lam

    def mix(self, images, labels, generator):
        """For the mixed-examples figure: the cross-image mixing on one batch of whole images (stored regions and
        SelfMix need a label set: not shown)."""
        target = smooth_one_hot(labels, self.num_classes)
        if not self.params.mixup_cutmix:
            return images, target
        p = self.params
        draws = draw_fkd_mix(generator, images.shape[0], images.shape[-2:], p.mixup_alpha, p.cutmix_alpha,
                             p.mix_prob, p.switch_prob)
        x, t, _ = fkd_mixup_cutmix(images, target, draws, p.mix_prob, p.switch_prob)
        return x, t
