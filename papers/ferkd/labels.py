"""FKD region soft labels: quantisation, recovery, the label-set files, and the official per-image files.

Official code (szq0214/FKD at afd5294, read to match its behaviour; ours is written anew):

* `quantize_soft_labels` = `label_quantization` of ``FKD_SLG/generate_soft_label.py``;
* `recover_soft_labels` = `Recover_soft_label` of ``FKD/utils_FKD.py``;
* `read_official_file` reads one ``<split>/<class>/<stem>.tar`` of the published label sets (a ``torch.save``
  of ``[boxes (N_c, 4), flips (N_c,), labels (N_c, 2, k)]`` NumPy arrays) without running pickled code.

Our label sets (`RegionLabels`) hold many images per file: a folder with ``shard_<k>.npz`` files (plain NumPy
``.npz``, read with ``allow_pickle=False``) and a ``manifest.json`` written last. Per image ``n``, its regions
are the rows ``offsets[n]:offsets[n+1]`` of ``boxes`` (top, left, height, width as fractions of the image's
height/width, FKD's stored floats), ``flips``, ``labels`` (quantised, shape ``(R, *label_shape)``) and
``region`` (each region's index among the regions drawn for its image: FerKD drops rows, never renumbers).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import ReproError, unknown_name
from common.teacher import NUMPY_ARRAY_GLOBALS, numpy_dtype_globals, safe_load

FORMAT = "mixrepro-fkd-regions-v1"
# label_type -> stored shape of one region's label (official names; `hard` stores the class id alone)
LABEL_TYPES = {
    "hard": (),
    "smoothing": (2,),
    "marginal_smoothing_k5": (2, 5),
    "marginal_renorm_k5": (2, 5),
    "marginal_smoothing_k10": (2, 10),
}
# the official trainer names the renormalised type 'marginal_renorm' while its generator writes
# 'marginal_renorm_k5' (with the generator's name the trainer recovers nothing and fails): both mean one thing
ALIASES = {"marginal_renorm": "marginal_renorm_k5"}
# what a published label file may name when unpickled: arrays of these dtypes, nothing else
LABEL_FILE_GLOBALS = (*NUMPY_ARRAY_GLOBALS, *numpy_dtype_globals(np.float32, np.float16, np.bool_, np.int64))


def canonical_label_type(label_type: str) -> str:
    """The official generator's name of `label_type` (both spellings of the renormalised type accepted)."""
    label_type = ALIASES.get(label_type, label_type)
    if label_type not in LABEL_TYPES:
        raise unknown_name("label_type", label_type, [*LABEL_TYPES, *ALIASES])
    return label_type


def label_shape(label_type: str) -> tuple[int, ...]:
    return LABEL_TYPES[canonical_label_type(label_type)]


def quantize_soft_labels(probs, label_type: str) -> np.ndarray:
    """Quantise teacher probabilities as the official `label_quantization`.

    Args:
        probs: (N, K) probabilities (tensor or array).
        label_type: ``marginal_smoothing_k5`` / ``marginal_renorm_k5`` -> (N, 2, 5); ``marginal_smoothing_k10``
            -> (N, 2, 10): row 0 the top-k class ids (as floats) by descending probability, row 1 the
            probabilities at those ids; ``smoothing`` -> (N, 2): (argmax, max); ``hard`` -> (N,) int64 argmax.

    Returns:
        float32 array (int64 for ``hard``). Ties in the sort keep the lower class id first (a stable sort; the
        official unstable ``argsort`` leaves their order unspecified).
    """
    label_type = canonical_label_type(label_type)
    p = torch.as_tensor(probs).float()
    if p.dim() != 2:
        raise ReproError(f"quantize_soft_labels needs (N, K) probabilities, got shape {tuple(p.shape)}.")
    if label_type == "hard":
        return p.argmax(dim=1).numpy()
    if label_type == "smoothing":
        value, index = p.max(dim=1)
        return torch.stack([index.float(), value], dim=1).numpy()
    k = LABEL_TYPES[label_type][1]
    if p.shape[1] < k:
        raise ReproError(f"label_type {label_type!r} keeps the top {k} classes but there are only {p.shape[1]}; "
                         "use 'smoothing' or a type with a smaller k.")
    order = torch.sort(p, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.stack([order.float(), p.gather(1, order)], dim=1).numpy()


def recover_soft_labels(stored, label_type: str, num_classes: int) -> torch.Tensor:
    """Rebuild the full distribution of quantised labels, as the official `Recover_soft_label`.

    Args:
        stored: (N, *label_shape) quantised labels (float16 values are computed in float32).
        label_type: as `quantize_soft_labels`; ``marginal_renorm`` and ``marginal_renorm_k5`` are one type.
        num_classes: K.

    Returns:
        (N, K) float32: ``marginal_smoothing_k*`` puts the stored probabilities at their ids and spreads the
        remaining mass evenly, ``(1 - sum) / (K - k)``, over the other classes (with K = k every class is
        stored and nothing is spread); ``marginal_renorm_k5`` rescales the stored values to sum 1 (zeros
        elsewhere); ``smoothing`` spreads ``(1 - p) / (K - 1)``; ``hard`` is one-hot.
    """
    label_type = canonical_label_type(label_type)
    s = torch.as_tensor(np.asarray(stored) if not torch.is_tensor(stored) else stored)
    n, device = s.shape[0], s.device  # computed where the labels are: no copy to the host in a training step
    if label_type == "hard":
        return torch.zeros(n, num_classes, device=device).scatter_(1, s.long().view(-1, 1), 1.0)
    s = s.float()
    if label_type == "smoothing":
        index, value = s[:, 0].long().view(-1, 1), s[:, 1].view(-1, 1)
        minor = (1.0 - value) / (num_classes - 1)
        return (minor * torch.ones(n, num_classes, device=device)).scatter_(1, index, value)
    index, value = s[:, 0, :].long(), s[:, 1, :]
    k = index.shape[1]
    if device.type == "cpu" and index.numel() and int(index.max()) >= num_classes:  # (a check, not a sync)
        raise ReproError(f"stored labels name class {int(index.max())} but num_classes is {num_classes}; "
                         "the label set belongs to another dataset.")
    if label_type == "marginal_renorm_k5":
        zeros = torch.zeros(n, num_classes, device=device)
        return F.normalize(zeros.scatter_(1, index, value), p=1.0, dim=1, eps=1e-12)
    if num_classes == k:  # every class is stored (the official division by K - k = 0 is overwritten anyway)
        return torch.zeros(n, num_classes, device=device).scatter_(1, index, value)
    minor = (1.0 - value.sum(dim=1, keepdim=True)) / (num_classes - k)
    return (minor * torch.ones(n, num_classes, device=device)).scatter_(1, index, value)


# ------------------------------------------------------------------------------------------- label sets
@dataclass
class RegionLabels:
    """Regions and their quantised labels for a list of images (a shard, or a whole label set).

    Attributes:
        image: (n,) int64 index of each image in the dataset's training split (all of it, before any
            validation hold-out).
        target: (n,) int64 ground-truth class of each image.
        offsets: (n + 1,) int64; image i owns rows offsets[i]:offsets[i+1] of the arrays below.
        boxes: (R, 4) float32 (float16 with use_fp16): (top / H, left / W, height / H, width / W).
        flips: (R,) bool.
        labels: (R, *label_shape) float32 / float16 (int64 for 'hard').
        region: (R,) int32 index of the region among those drawn for its image.
    """

    image: np.ndarray
    target: np.ndarray
    offsets: np.ndarray
    boxes: np.ndarray
    flips: np.ndarray
    labels: np.ndarray
    region: np.ndarray

    def __post_init__(self):
        n, rows = len(self.image), len(self.boxes)
        if (len(self.target) != n or len(self.offsets) != n + 1 or self.offsets[0] != 0 or self.offsets[-1] != rows
                or np.any(np.diff(self.offsets) < 0)):
            raise ReproError(f"inconsistent region labels: {n} images, offsets {self.offsets[:3]}..{self.offsets[-1:]}"
                             f" for {rows} regions; regenerate the label set.")
        for name in ("flips", "labels", "region"):
            if len(getattr(self, name)) != rows:
                raise ReproError(f"inconsistent region labels: {name} has {len(getattr(self, name))} rows, boxes "
                                 f"{rows}; regenerate the label set.")
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            raise ReproError(f"region boxes must be (R, 4), got {self.boxes.shape}.")

    @property
    def counts(self) -> np.ndarray:
        """(n,) regions per image."""
        return np.diff(self.offsets)

    def image_of_rows(self) -> np.ndarray:
        """(R,) position (0..n-1) of each region's image in this set."""
        return np.repeat(np.arange(len(self.image)), self.counts)

    def select(self, keep: np.ndarray, labels: np.ndarray | None = None) -> RegionLabels:
        """The regions where `keep` (R,) is true (images keep their order), with optional replacement labels."""
        keep = np.asarray(keep, dtype=bool)
        counts = np.bincount(self.image_of_rows()[keep], minlength=len(self.image))
        return RegionLabels(self.image, self.target, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                            self.boxes[keep], self.flips[keep], (self.labels if labels is None else labels)[keep],
                            self.region[keep])

    def save(self, path: str | Path) -> str:
        """Write an uncompressed .npz atomically (a killed job never leaves a truncated shard); returns its sha256."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **{f.name: getattr(self, f.name) for f in fields(self)})
        os.replace(tmp, path)
        return file_sha256(path)

    @classmethod
    def load(cls, path: str | Path, mmap: bool = False) -> RegionLabels:
        """One shard; with `mmap`, its per-region arrays are memory-mapped (read from disk on access, shared
        by every process and DataLoader worker through the page cache) and only the per-image ones are read."""
        path = Path(path)
        if not path.is_file():
            raise ReproError(f"label shard {path} is missing; rerun the workflow to regenerate it.")
        try:
            if mmap:
                arrays = _mmap_npz(path)
                return cls(**{f.name: np.array(arrays[f.name]) if f.name in PER_IMAGE else arrays[f.name]
                              for f in fields(cls)})
            with np.load(path, allow_pickle=False) as data:
                return cls(**{f.name: data[f.name] for f in fields(cls)})
        except (KeyError, ValueError, OSError, zipfile.BadZipFile) as err:
            raise ReproError(f"cannot read label shard {path} ({err}); delete it and rerun the workflow.") from None

    @classmethod
    def concat(cls, parts: Sequence[RegionLabels]) -> RegionLabels:
        offsets, total = [np.zeros(1, np.int64)], 0
        for part in parts:
            offsets.append(part.offsets[1:] + total)
            total += part.offsets[-1]
        return cls(*(np.concatenate([getattr(p, name) for p in parts])
                     for name in ("image", "target")), np.concatenate(offsets),
                   *(np.concatenate([getattr(p, name) for p in parts])
                     for name in ("boxes", "flips", "labels", "region")))


PER_IMAGE = ("image", "target", "offsets")  # small arrays, one row per image; the others have one per region


def _mmap_npz(path: Path) -> dict[str, np.ndarray]:
    """Memory-map every member of an uncompressed .npz (what `RegionLabels.save` writes): each member is a .npy
    stored as is inside the zip, so its data starts at a fixed offset of the file."""
    arrays = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as fh:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"member {info.filename} is compressed and cannot be memory-mapped")
            fh.seek(info.header_offset)
            local = fh.read(30)  # the zip local file header; its name and extra-field lengths end it
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            fh.seek(info.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            if dtype.hasobject:
                raise ValueError(f"member {info.filename} holds Python objects")
            name = info.filename.removesuffix(".npy")
            if int(np.prod(shape)) == 0:
                arrays[name] = np.zeros(shape, dtype)
            else:
                arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=fh.tell(), shape=shape,
                                         order="F" if fortran else "C")
    return arrays


class ConcatRows:
    """The rows of several arrays (memory-mapped shards) read as one array, without copying them.

    Supports ``len``, ``shape``, ``dtype``, and indexing by an integer, a slice, an integer array or a boolean
    mask (a non-integer index gives an in-memory array)."""

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = list(parts)
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64)
        self.dtype = self.parts[0].dtype
        self.shape = (int(self.starts[-1]), *self.parts[0].shape[1:])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate([np.asarray(p) for p in self.parts])
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            index = int(index) + (len(self) if index < 0 else 0)
            k = int(np.searchsorted(self.starts, index, side="right")) - 1
            return self.parts[k][index - self.starts[k]]
        rows = np.arange(len(self))[index]
        part = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        for k in np.unique(part):
            mask = part == k
            out[mask] = self.parts[k][rows[mask] - self.starts[k]]
        return out


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | Path, shard_files: Sequence[str | Path], info: dict) -> dict:
    """Write ``manifest.json`` (last, atomically) naming every shard with its size and sha256.

    `info` holds what the label set is: label_type, num_classes, dataset, num_images, source, ... The
    fingerprint (sha256 over the shards' hashes and `info`) changes whenever the labels do."""
    folder = Path(folder)
    shards = []
    for file in shard_files:
        file = Path(file)
        part = RegionLabels.load(file)
        shards.append({"file": file.name, "images": len(part.image), "regions": int(part.offsets[-1]),
                       "bytes": file.stat().st_size, "sha256": file_sha256(file)})
    body = {"format": FORMAT, **info, "shards": shards}
    body["fingerprint"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, folder / "manifest.json")
    return body


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ReproError(f"label set {path} does not exist; build it with the workflow "
                         "(snakemake reproduce_ferkd), or point method.labels at an existing manifest.json.")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ReproError(f"{path} is not a label-set manifest of this project (format {manifest.get('format')!r}).")
    return manifest


def load_label_set(path: str | Path, verify: bool = True, mmap: bool = False) -> tuple[RegionLabels, dict]:
    """Every shard of a label set (its ``manifest.json`` path) in one `RegionLabels`, and the manifest.

    With `verify`, each shard's sha256 must match the manifest (a shard rewritten after the manifest is an
    error, not a silent mix of two label sets); with `mmap`, only the file sizes are compared (hashing tens of
    GB in every training process would take minutes). With `mmap`, the per-region arrays stay on disk
    (`ConcatRows` of memory-mapped shards): ImageNet's 500 regions per image are ~37 GB, which every training
    process and DataLoader worker then shares instead of holding a copy."""
    path = Path(path)
    manifest = read_manifest(path)
    parts = []
    for shard in manifest["shards"]:
        file = path.parent / shard["file"]
        if verify and file.is_file():
            if mmap:
                wrong = file.stat().st_size != shard.get("bytes", file.stat().st_size)
            else:
                wrong = file_sha256(file) != shard["sha256"]
            if wrong:
                raise ReproError(f"{file} changed after {path} was written; rerun the workflow to rebuild the "
                                 "label set.")
        parts.append(RegionLabels.load(file, mmap=mmap))
    if mmap:
        counts = np.concatenate([p.counts for p in parts])
        labels = RegionLabels(np.concatenate([p.image for p in parts]), np.concatenate([p.target for p in parts]),
                              np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                              *(ConcatRows([getattr(p, name) for p in parts])
                                for name in ("boxes", "flips", "labels", "region")))
    else:
        labels = RegionLabels.concat(parts)
    expected = manifest.get("num_images")
    if expected is not None and len(labels.image) != expected:
        raise ReproError(f"{path} lists {len(labels.image)} images but says num_images={expected}; rebuild it.")
    return labels, manifest


# ------------------------------------------------------------------------------- official per-image files
def official_label_path(softlabel_path: str | Path, image_path: str | Path) -> Path:
    """Where the official trainer looks for an image's labels (`ImageFolder_FKD.__getitem__`).

    The last three components of the image path (``<split>/<class>/<file>``), cut at the first ``.`` (so a
    dot in the class folder's name breaks the lookup, as it does officially), plus ``.tar``."""
    relative = "/".join(str(image_path).split("/")[-3:]).split(".")[0]
    return Path(os.path.join(str(softlabel_path), relative + ".tar"))


def read_official_file(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One published FKD/FerKD label file, read without executing pickled code.

    Returns:
        boxes (N_c, 4), flips (N_c,) bool, labels (N_c, *label_shape), as stored (float32 or float16).

    Raises:
        ReproError: the file names anything but NumPy arrays (it is not unpickled), or has another layout.
    """
    data = safe_load(path, LABEL_FILE_GLOBALS, what="FKD label file")
    if not (isinstance(data, (list, tuple)) and len(data) == 3):
        raise ReproError(f"{path} should hold [boxes, flips, labels] (the official FKD layout), got "
                         f"{type(data).__name__}{f' of length {len(data)}' if isinstance(data, (list, tuple)) else ''}.")
    boxes, flips, labels = (np.asarray(v.numpy() if torch.is_tensor(v) else v) for v in data)
    n = len(boxes)
    if boxes.shape != (n, 4) or flips.shape != (n,) or len(labels) != n:
        raise ReproError(f"{path}: boxes {boxes.shape}, flips {flips.shape}, labels {labels.shape} do not pair up "
                         "as (N, 4), (N,), (N, ...).")
    return boxes, flips.astype(bool), labels


def write_official_file(path: str | Path, boxes: np.ndarray, flips: np.ndarray, labels: np.ndarray) -> None:
    """Write one image's labels in the official layout (to export a label set, and in tests)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save([np.asarray(boxes), np.asarray(flips), np.asarray(labels)], path)
