"""FKD's offline soft-label generation, the import of the published label files, and FerKD's rewrite, as jobs.

``python -m papers.ferkd.regions generate --scale SCALE --shard K``  (or --config FILE instead of --scale)
    the teacher labels the regions of shard K of the training images -> ``<out_dir>/teacher/shard_K.npz`` (the config: ``papers/ferkd/labelsets/<scale>.yaml``)
``python -m papers.ferkd.regions import --scale SCALE --shard K``
    the same shard read from the published per-image ``.tar`` files (``source: published``)
``python -m papers.ferkd.regions gather --scale SCALE``
    -> ``<out_dir>/teacher/manifest.json`` once every shard exists
``python -m papers.ferkd.regions adapt --scale SCALE --name NAME``
    FerKD's rewrite (`papers.ferkd.adapt`) of the teacher set -> ``<out_dir>/adapted/NAME/``

A shard whose file exists is skipped (the job is restartable and shards run in parallel; the workflow reruns a
shard when the label-set config changes). Regions follow the official generator (``FKD_SLG``): per region,
torchvision's ``RandomResizedCrop.get_params`` then the flip draw ``U < 0.5``, stored as float32 fractions
(i / H, j / W, h / H, w / W); the teacher sees the crop resized to its input size (bicubic), flipped,
normalised, in eval mode; ``softmax(logits / T)`` is quantised (`quantize_soft_labels`). Our draws come from a
generator seeded per (seed, image index) instead of the global RNG, so a shard's labels do not depend on which
shards ran before it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from common.config import build_dataclass, read_yaml
from common.errors import ReproError, exit_status
from papers.ferkd.adapt import GROUPS, adapt_region_labels
from papers.ferkd.labels import (
    RegionLabels,
    canonical_label_type,
    label_shape,
    load_label_set,
    official_label_path,
    quantize_soft_labels,
    read_official_file,
    write_manifest,
)

INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


# ------------------------------------------------------------------------------------------------ config
@dataclass
class RegionSpec:
    count: int = 500  # regions per image (official --num_crops of the generator)
    scale: list = field(default_factory=lambda: [0.08, 0.936])  # official --min/max_scale_crops
    ratio: list = field(default_factory=lambda: [3 / 4, 4 / 3])
    seed: int = 0


@dataclass
class TeacherSpec:
    run: str | None = None  # a finished run of the shared trainer (the pipeline's own teacher)
    model: str | None = None  # or any timm model ...
    checkpoint: str | None = None  # ... with a local checkpoint ($VARS expanded; nothing is downloaded)
    kwargs: dict = field(default_factory=dict)
    image_size: int | None = None  # the teacher's input side (a run: its own image size)
    mean: list | None = None  # a checkpoint teacher's input normalisation (ImageNet's by default)
    std: list | None = None
    interpolation: str = "bicubic"  # official generate_soft_label.py
    temperature: float = 1.0  # official --temp
    use_ema: bool = False


@dataclass
class AdaptSpec:
    t_low: float = 0.0
    t_mid: float = 0.0
    t_high: float = 1.0
    eps: float = 0.0
    score: str = "gt_prob"
    threshold_mode: str = "absolute"
    actions: dict = field(default_factory=dict)
    soft_form: str = "uniform_others"
    min_regions: int = 4  # FKD's n_crops
    on_too_few: str = "error"


@dataclass
class LabelSetConfig:
    paper: str = "ferkd"
    scale: str = "smoke"
    out_dir: str = ""  # results/ferkd/<scale>/labels
    data: dict = field(default_factory=lambda: {"name": "cifar10-mini"})  # name, root, allow_download
    source: str = "teacher"  # teacher (label here) | published (import the official per-image files)
    published: str | None = None  # the published set's folder, e.g. .../FKD_soft_label_500_crops_.../imagenet
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    regions: RegionSpec = field(default_factory=RegionSpec)
    label_type: str = "marginal_smoothing_k5"
    use_fp16: bool = False  # official --use_fp16: boxes and labels stored as float16
    shards: int = 1
    batch_images: int = 64  # images per teacher batch
    batch_regions: int = 1024  # crops per teacher forward (official --num_seg 50)
    num_workers: int = 0
    resources: dict = field(default_factory=dict)  # gpus, cpus, mem_mb, runtime_min of one shard job
    adapted: dict = field(default_factory=dict)  # name -> AdaptSpec options (FerKD rewrites)
    main_adapted: str = ""  # the rewrite whose groups the regions figure shows


LABELSETS = Path(__file__).resolve().parent / "labelsets"


def add_config_arguments(parser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--scale", help="use papers/ferkd/labelsets/<scale>.yaml")
    group.add_argument("--config", help="a label-set config file")


def config_file(args) -> Path:
    return Path(args.config) if args.config else LABELSETS / f"{args.scale}.yaml"


def load_labelset_config(path: str | Path) -> LabelSetConfig:
    cfg = build_dataclass(LabelSetConfig, read_yaml(path))
    canonical_label_type(cfg.label_type)
    if cfg.source not in ("teacher", "published"):
        raise ReproError(f"label set source must be 'teacher' or 'published', got {cfg.source!r}.")
    if not cfg.out_dir or cfg.shards < 1:
        raise ReproError(f"{path}: set out_dir and shards >= 1.")
    if cfg.teacher.interpolation not in INTERPOLATIONS:
        raise ReproError(f"teacher.interpolation must be one of {', '.join(INTERPOLATIONS)}.")
    for name, options in cfg.adapted.items():
        build_dataclass(AdaptSpec, options or {}, prefix=f"adapted.{name}.")
    return cfg


def adapt_spec(cfg: LabelSetConfig, name: str) -> AdaptSpec:
    if name not in cfg.adapted:
        raise ReproError(f"no adapted label set {name!r} in the label config; defined: {', '.join(cfg.adapted)}.")
    return build_dataclass(AdaptSpec, cfg.adapted[name] or {}, prefix=f"adapted.{name}.")


def teacher_dir(cfg: LabelSetConfig) -> Path:
    return Path(cfg.out_dir) / "teacher"


def shard_path(cfg: LabelSetConfig, shard: int) -> Path:
    return teacher_dir(cfg) / f"shard_{shard:05d}.npz"


def shard_range(num_images: int, shards: int, shard: int) -> range:
    if not 0 <= shard < shards:
        raise ReproError(f"shard {shard} is not in [0, {shards}).")
    return range(shard * num_images // shards, (shard + 1) * num_images // shards)


# ----------------------------------------------------------------------------------------------- regions
def random_resized_crop_params(height: int, width: int, scale, ratio, generator: torch.Generator):
    """torchvision's `RandomResizedCrop.get_params` with the draws taken from `generator` (same order and laws:
    10 tries of area ~ U(scale) * H W and log-ratio ~ U(log ratio), then the centre-crop fallback).

    Returns:
        (i, j, h, w) integers: top, left, height, width."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_regions(height: int, width: int, count: int, scale, ratio, generator: torch.Generator):
    """`count` regions of one image, as the official generator draws them (crop params, then the flip).

    Returns:
        boxes (count, 4) int64 (i, j, h, w), fractions (count, 4) float32 (i / H, j / W, h / H, w / W), and
        flips (count,) bool."""
    boxes, flips = [], []
    for _ in range(count):
        boxes.append(random_resized_crop_params(height, width, scale, ratio, generator))
        flips.append(bool(torch.rand(1, generator=generator).item() < 0.5))
    boxes = np.asarray(boxes, dtype=np.int64).reshape(count, 4)
    size = np.array([height, width, height, width], dtype=np.float64)
    return boxes, (boxes / size).astype(np.float32), np.asarray(flips, dtype=bool)


def region_seed(seed: int, image: int) -> int:
    return (int(seed) * 1_000_003 + int(image) * 7_919 + 17) % (2**63 - 1)


class TeacherCrops(Dataset):
    """Item i: the drawn regions of image ``images[i]`` as teacher inputs, and what is stored about them."""

    def __init__(self, images, ids, region: RegionSpec, size: int, mean, std, interpolation: str):
        self.images, self.ids, self.region, self.size = images, list(ids), region, size
        self.mean, self.std, self.interpolation = list(mean), list(std), INTERPOLATIONS[interpolation]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        image, label = self.images[image_id]
        width, height = image.size
        generator = torch.Generator().manual_seed(region_seed(self.region.seed, image_id))
        boxes, fractions, flips = draw_regions(height, width, self.region.count, self.region.scale,
                                               self.region.ratio, generator)
        crops = []
        for (i, j, h, w), flip in zip(boxes.tolist(), flips, strict=True):
            crop = TF.resized_crop(image, i, j, h, w, [self.size, self.size], self.interpolation)
            crop = TF.hflip(crop) if flip else crop
            crops.append(TF.normalize(TF.to_tensor(crop), self.mean, self.std))
        return torch.stack(crops), torch.from_numpy(fractions), torch.from_numpy(flips), image_id, label


# ---------------------------------------------------------------------------------------------- the jobs
def training_images(data: dict):
    """The dataset's whole training split as `(PIL image, label)` items, and its `DataInfo`."""
    from common.data import build_splits

    train_ds, _, _, info = build_splits(data["name"], root=data.get("root"),
                                        allow_download=bool(data.get("allow_download", True)))
    return train_ds.base, info


def resolve_teacher(cfg: LabelSetConfig, num_classes: int):
    from common.teacher import load_teacher_checkpoint, load_teacher_run

    t = cfg.teacher
    if t.run:
        teacher, _ = load_teacher_run(t.run, use_ema=t.use_ema)
        if t.image_size:
            teacher.image_size = t.image_size
        return teacher
    if t.model and t.checkpoint:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        return load_teacher_checkpoint(t.model, os.path.expandvars(t.checkpoint), num_classes, t.image_size,
                                       t.mean or IMAGENET_DEFAULT_MEAN, t.std or IMAGENET_DEFAULT_STD, t.kwargs)
    raise ReproError("the label config's teacher needs run: <run folder>, or model: and checkpoint:.")


@torch.no_grad()
def generate_shard(cfg: LabelSetConfig, shard: int, force: bool = False, device: str | None = None) -> Path:
    """Label one shard of images with the teacher (see the module docstring); skipped if its file exists."""
    out = shard_path(cfg, shard)
    if out.exists() and not force:
        print(f"[ferkd] {out} exists: shard {shard} is done, skipped.")
        return out
    images, info = training_images(cfg.data)
    teacher = resolve_teacher(cfg, info.num_classes)
    size = teacher.image_size or info.image_size
    if not size:
        raise ReproError("the teacher's input size is unknown: set teacher.image_size in the label config.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = teacher.model.to(device)
    ids = shard_range(len(images), cfg.shards, shard)
    crops_ds = TeacherCrops(images, ids, cfg.regions, size, teacher.mean, teacher.std, cfg.teacher.interpolation)
    loader = DataLoader(crops_ds, batch_size=cfg.batch_images, shuffle=False, num_workers=cfg.num_workers)
    parts = {name: [] for name in ("image", "target", "boxes", "flips", "labels")}
    for crops, fractions, flips, image_id, label in loader:
        flat = crops.flatten(0, 1)
        probs = torch.cat([torch.softmax(model(chunk.to(device)).float() / cfg.teacher.temperature, dim=1).cpu()
                           for chunk in flat.split(cfg.batch_regions)])
        parts["labels"].append(quantize_soft_labels(probs, cfg.label_type))
        parts["boxes"].append(fractions.flatten(0, 1).numpy())
        parts["flips"].append(flips.flatten(0, 1).numpy())
        parts["image"].append(image_id.numpy())
        parts["target"].append(label.numpy())
        print(f"[ferkd] shard {shard}: {sum(len(x) for x in parts['image'])}/{len(ids)} images", flush=True)
    count = cfg.regions.count
    n = len(ids)
    store = np.float16 if cfg.use_fp16 else np.float32
    labels = np.concatenate(parts["labels"]) if n else np.zeros((0, *label_shape(cfg.label_type)), np.float32)
    if labels.dtype != np.int64:
        labels = labels.astype(store)  # official --use_fp16: class ids <= 2048 stay exact in float16
    shard_labels = RegionLabels(
        image=np.concatenate(parts["image"]).astype(np.int64) if n else np.zeros(0, np.int64),
        target=np.concatenate(parts["target"]).astype(np.int64) if n else np.zeros(0, np.int64),
        offsets=np.arange(n + 1, dtype=np.int64) * count,
        boxes=(np.concatenate(parts["boxes"]) if n else np.zeros((0, 4), np.float32)).astype(store),
        flips=np.concatenate(parts["flips"]) if n else np.zeros(0, bool),
        labels=labels, region=np.tile(np.arange(count, dtype=np.int32), n))
    shard_labels.save(out)
    print(f"[ferkd] wrote {out}: {n} images x {count} regions ({teacher.description})")
    return out


def import_shard(cfg: LabelSetConfig, shard: int, force: bool = False) -> Path:
    """One shard of a published label set (official per-image ``.tar`` files), read without running pickled
    code (`read_official_file`); the images must be an image-folder copy (the files are keyed by path)."""
    out = shard_path(cfg, shard)
    if out.exists() and not force:
        print(f"[ferkd] {out} exists: shard {shard} is done, skipped.")
        return out
    if not cfg.published:
        raise ReproError("source: published needs published: <folder of the label set, ending with the dataset dir>.")
    images, _ = training_images(cfg.data)
    samples = getattr(images, "samples", None)
    if samples is None:
        raise ReproError("published label files are keyed by image path: use an image-folder copy of the dataset "
                         "(train/<class>/<file>), not a parquet one.")
    root = os.path.expandvars(cfg.published)
    shape = label_shape(cfg.label_type)
    parts = {name: [] for name in ("image", "target", "boxes", "flips", "labels", "region", "count")}
    for image_id in shard_range(len(samples), cfg.shards, shard):
        path, target = samples[image_id]
        file = official_label_path(root, path)
        if not file.is_file():
            raise ReproError(f"no published label file for {path}: expected {file} (softlabel_path must end with the "
                             "dataset folder, e.g. .../imagenet, as the official README says).")
        boxes, flips, labels = read_official_file(file)
        if labels.shape[1:] != shape:
            raise ReproError(f"{file} holds labels of shape {labels.shape[1:]}, label_type {cfg.label_type} "
                             f"stores {shape}; set label_type to the published set's type.")
        for name, value in (("image", image_id), ("target", target), ("count", len(boxes))):
            parts[name].append(value)
        parts["boxes"].append(boxes)
        parts["flips"].append(flips)
        parts["labels"].append(labels)
        parts["region"].append(np.arange(len(boxes), dtype=np.int32))
    counts = np.asarray(parts["count"], dtype=np.int64)
    RegionLabels(np.asarray(parts["image"], np.int64), np.asarray(parts["target"], np.int64),
                 np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), np.concatenate(parts["boxes"]),
                 np.concatenate(parts["flips"]), np.concatenate(parts["labels"]),
                 np.concatenate(parts["region"])).save(out)
    print(f"[ferkd] imported {len(counts)} images into {out}")
    return out


def gather(cfg: LabelSetConfig) -> dict:
    """The teacher label set's manifest, once every shard exists."""
    files = [shard_path(cfg, k) for k in range(cfg.shards)]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise ReproError(f"{len(missing)} shards are missing (e.g. {missing[0]}); run their jobs first.")
    _, info = training_images(cfg.data)
    source = ({"published": cfg.published} if cfg.source == "published" else
              {"teacher": {k: v for k, v in vars(cfg.teacher).items() if v not in (None, {}, [])}})
    return write_manifest(teacher_dir(cfg), files, {
        "label_type": canonical_label_type(cfg.label_type), "num_classes": info.num_classes,
        "dataset": info.name, "num_images": sum(len(RegionLabels.load(f).image) for f in files),
        "regions": vars(cfg.regions), "use_fp16": cfg.use_fp16, "source": source})


def adapt(cfg: LabelSetConfig, name: str) -> dict:
    """FerKD's rewrite of the teacher label set, shard by shard, with its per-group fractions in the manifest."""
    spec = adapt_spec(cfg, name)
    source = teacher_dir(cfg) / "manifest.json"
    _, manifest = load_label_set(source)
    folder = Path(cfg.out_dir) / "adapted" / name
    folder.mkdir(parents=True, exist_ok=True)
    counts, kept, restored, files = np.zeros(len(GROUPS)), 0, 0, []
    for shard in manifest["shards"]:
        part = RegionLabels.load(source.parent / shard["file"])
        rows = part.image_of_rows()
        keep, adapted, groups, back = adapt_region_labels(
            part.labels, part.target[rows], manifest["num_classes"], spec.t_low, spec.t_mid, spec.t_high, spec.eps,
            spec.score, spec.threshold_mode, label_type=manifest["label_type"], actions=spec.actions,
            image=rows, soft_form=spec.soft_form, min_regions=spec.min_regions, on_too_few=spec.on_too_few,
            return_groups=True)
        counts += np.bincount(groups, minlength=len(GROUPS))
        kept, restored = kept + int(keep.sum()), restored + back
        files.append(folder / shard["file"])
        part.select(keep, adapted).save(files[-1])
    total = max(1, int(counts.sum()))
    stats = {**{g: float(c / total) for g, c in zip(GROUPS, counts, strict=True)}, "kept": kept / total,
             "restored": restored / total}
    print(f"[ferkd] {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
    return write_manifest(folder, files, {
        **{k: manifest[k] for k in ("label_type", "num_classes", "dataset", "num_images", "regions", "use_fp16")},
        "source": {"adapted_from": str(source), "teacher_set": manifest["fingerprint"], "ferkd": vars(spec)},
        "stats": stats})


def group_fractions_of(manifest_path: str | Path) -> dict:
    """The per-group fractions an adapted label set recorded (for the figure)."""
    return json.loads(Path(manifest_path).read_text()).get("stats", {})


# --------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m papers.ferkd.regions", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("generate", "import", "gather", "adapt"):
        p = sub.add_parser(name)
        add_config_arguments(p)
        if name in ("generate", "import"):
            p.add_argument("--shard", type=int, required=True)
            p.add_argument("--force", action="store_true", help="relabel a shard whose file exists")
        if name == "adapt":
            p.add_argument("--name", required=True, help="an entry of the config's adapted: section")
    args = parser.parse_args(argv)

    def command():
        cfg = load_labelset_config(config_file(args))
        if args.command == "generate":
            if cfg.source != "teacher":
                raise ReproError("this label config imports the published files (source: published): use `import`.")
            generate_shard(cfg, args.shard, args.force)
        elif args.command == "import":
            import_shard(cfg, args.shard, args.force)
        elif args.command == "gather":
            gather(cfg)
        else:
            adapt(cfg, args.name)

    return exit_status(command)


if __name__ == "__main__":
    sys.exit(main())
