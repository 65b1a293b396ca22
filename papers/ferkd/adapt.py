"""FerKD's label adaptation: an offline rewrite of an FKD label set (spec ferkd.md §2.3).

FerKD's README says it "follows FKD training code and procedure while using different preprocessed soft
labels", and its label files were never released; so the adaptation is a rewrite of a label set and the FKD
trainer runs unchanged. The rule (the paper's equation as reprinted by a secondary reading note; the values
of T_L, T_M, T_H and eps are published nowhere we could read, hence every config using them is named
``*_placeholder``), per region with score ``q``:

* ``q < T_L``            -> ``hard_negative`` (default: drop the region);
* ``T_L <= q < T_M``     -> ``context`` (default: the softened ground truth, ``1 - eps`` on the label);
* ``T_M <= q <= T_H``    -> ``hard_positive`` (default: keep the teacher's label);
* ``q > T_H``            -> ``easy_positive`` (default: drop).

Each group's action is configurable (``teacher``, ``softened_gt``, ``drop``): all-``teacher`` is FKD exactly.
Inferred, not read in the paper (flagged so in the README): the score is the recovered probability of the
ground-truth class (``gt_prob``; ``max_prob`` is the alternative), thresholds are absolute probabilities or
per-image quantiles, and the softened label puts ``eps / (K - 1)`` on every other class (``uniform_others``;
``label_smoothing`` is the classic ``(1 - eps) e_gt + eps / K``). A dropped region leaves the file, so the
loader never draws it; every image keeps at least ``min_regions`` (FKD draws ``n_crops`` distinct regions per
load): an error, or (``on_too_few='restore'``) its dropped regions closest to the kept score range come back
with their teacher label.
"""

from __future__ import annotations

import numpy as np
import torch

from common.errors import ReproError
from papers.ferkd.labels import LABEL_TYPES, canonical_label_type, recover_soft_labels

GROUPS = ("hard_negative", "context", "hard_positive", "easy_positive")
ACTIONS = ("teacher", "softened_gt", "drop")
DEFAULT_ACTIONS = {"hard_negative": "drop", "context": "softened_gt", "hard_positive": "teacher",
                   "easy_positive": "drop"}
SCORES = ("gt_prob", "max_prob")
THRESHOLD_MODES = ("absolute", "per_image_quantile")
SOFT_FORMS = ("uniform_others", "label_smoothing")


def region_scores(stored, gt, num_classes: int, label_type: str, score: str = "gt_prob") -> np.ndarray:
    """The score FerKD compares with its thresholds, from the recovered soft label of each region.

    Args:
        stored: (N, *label_shape) quantised labels.
        gt: (N,) ground-truth class of each region's image.
        score: ``gt_prob``: t[gt] (the stored probability if gt is in the stored top-k, else the spread
            marginal value); ``max_prob``: max_c t[c].

    Returns:
        (N,) float64.
    """
    if score not in SCORES:
        raise ReproError(f"FerKD score must be one of {', '.join(SCORES)}, got {score!r}.")
    t = recover_soft_labels(stored, label_type, num_classes).double()
    if score == "max_prob":
        return t.max(dim=1).values.numpy()
    return t.gather(1, torch.as_tensor(np.asarray(gt), dtype=torch.long).view(-1, 1))[:, 0].numpy()


def _check_thresholds(t_low: float, t_mid: float, t_high: float, mode: str) -> None:
    if mode not in THRESHOLD_MODES:
        raise ReproError(f"FerKD threshold_mode must be one of {', '.join(THRESHOLD_MODES)}, got {mode!r}.")
    if not t_low <= t_mid <= t_high:
        raise ReproError(f"FerKD thresholds need t_low <= t_mid <= t_high, got {t_low}, {t_mid}, {t_high}.")
    if mode == "per_image_quantile" and not (0.0 <= t_low and t_high <= 1.0):
        raise ReproError(f"per-image quantile thresholds are quantile levels in [0, 1], got {t_low}..{t_high}.")


def image_thresholds(scores: np.ndarray, image: np.ndarray | None, t_low: float, t_mid: float, t_high: float,
                     mode: str) -> np.ndarray:
    """(N, 3) thresholds (T_L, T_M, T_H) each region is compared with.

    ``absolute``: the values themselves. ``per_image_quantile``: the quantiles (linear interpolation, as
    ``numpy.quantile``) at levels t_low, t_mid, t_high of the scores of the region's own image."""
    _check_thresholds(t_low, t_mid, t_high, mode)
    levels = np.array([t_low, t_mid, t_high], dtype=np.float64)
    if mode == "absolute":
        return np.broadcast_to(levels, (len(scores), 3)).copy()
    if image is None:
        raise ReproError("threshold_mode='per_image_quantile' needs the image of every region (image=...).")
    image = np.asarray(image)
    out = np.empty((len(scores), 3), dtype=np.float64)
    order = np.argsort(image, kind="stable")
    starts = np.flatnonzero(np.r_[True, image[order][1:] != image[order][:-1]])
    for lo, hi in zip(starts, np.r_[starts[1:], len(order)], strict=True):
        rows = order[lo:hi]
        out[rows] = np.quantile(scores[rows], levels)
    return out


def region_groups(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(N,) index into GROUPS of each region, from its score and its (T_L, T_M, T_H)."""
    t_low, t_mid, t_high = thresholds[:, 0], thresholds[:, 1], thresholds[:, 2]
    groups = np.full(len(scores), 2, dtype=np.int64)  # hard_positive: T_M <= q <= T_H
    groups[(scores >= t_low) & (scores < t_mid)] = 1
    groups[scores < t_low] = 0
    groups[scores > t_high] = 3
    return groups


def softened_ground_truth(gt, num_classes: int, eps: float, label_type: str = "marginal_smoothing_k5",
                          form: str = "uniform_others") -> np.ndarray:
    """The softened one-hot label of each region, in the stored (quantised) format of `label_type`.

    ``uniform_others``: t[gt] = 1 - eps, every other class eps / (K - 1). In the top-k format the ids are
    [gt, the k-1 lowest other ids] with values [1 - eps, eps / (K - 1), ...]; recovery spreads the rest,
    eps (K - k) / (K - 1), over the K - k others: eps / (K - 1) each again, so the stored row recovers to the
    intended distribution exactly (up to float32). ``label_smoothing``: t[gt] = 1 - eps + eps / K, others
    eps / K, stored alike.

    Returns:
        (N, *label_shape) float32.
    """
    label_type = canonical_label_type(label_type)
    if form not in SOFT_FORMS:
        raise ReproError(f"FerKD soft_form must be one of {', '.join(SOFT_FORMS)}, got {form!r}.")
    if label_type in ("hard", "marginal_renorm_k5"):
        raise ReproError(f"a softened ground truth cannot be stored exactly as {label_type!r} labels (hard keeps "
                         "one class, renorm rescales the stored values): use marginal_smoothing_k5/k10 or smoothing.")
    if not 0.0 <= eps < 1.0:
        raise ReproError(f"FerKD eps must lie in [0, 1), got {eps}.")
    gt = torch.as_tensor(np.asarray(gt), dtype=torch.long)
    n = gt.shape[0]
    if form == "uniform_others":
        top, other = 1.0 - eps, eps / (num_classes - 1)
    else:
        top, other = 1.0 - eps + eps / num_classes, eps / num_classes
    if label_type == "smoothing":
        return torch.stack([gt.float(), torch.full((n,), top)], dim=1).numpy()
    k = LABEL_TYPES[label_type][1]
    # the k-1 lowest class ids other than gt: ids 0..k-1 with gt removed (or the first k-1 when gt >= k-1)
    base = torch.arange(k).expand(n, k)
    others = torch.where(base[:, : k - 1] >= gt.view(-1, 1), base[:, 1:], base[:, : k - 1])
    ids = torch.cat([gt.view(-1, 1), others], dim=1).float()
    values = torch.full((n, k), other)
    values[:, 0] = top
    return torch.stack([ids, values], dim=1).numpy().astype(np.float32)


def adapt_region_labels(stored, gt, num_classes: int, t_low: float, t_mid: float, t_high: float, eps: float,
                        score: str = "gt_prob", threshold_mode: str = "absolute", *,
                        label_type: str = "marginal_smoothing_k5", actions: dict | None = None,
                        image=None, soft_form: str = "uniform_others", min_regions: int = 0,
                        on_too_few: str = "error", return_groups: bool = False):
    """FerKD's rewrite of region labels (module docstring).

    Args:
        stored: (N, *label_shape) the teacher's quantised labels (FKD's).
        gt: (N,) ground-truth class of each region's image.
        num_classes: K.
        t_low, t_mid, t_high: thresholds (absolute probabilities, or per-image quantile levels).
        eps: smoothing value of the softened ground truth.
        score: ``gt_prob`` or ``max_prob``.
        threshold_mode: ``absolute`` or ``per_image_quantile``.
        label_type: format of `stored` (and of the output).
        actions: group -> ``teacher`` | ``softened_gt`` | ``drop``, overriding DEFAULT_ACTIONS.
        image: (N,) image id of each region; needed by ``per_image_quantile`` and by `min_regions`.
        soft_form: ``uniform_others`` or ``label_smoothing`` (see `softened_ground_truth`).
        min_regions: each image keeps at least this many regions (FKD's n_crops); 0 checks nothing.
        on_too_few: ``error`` or ``restore`` (bring back the dropped regions nearest the kept score range).
        return_groups: also return the (N,) group index of every region and the number restored.

    Returns:
        ``(keep, adapted)``: (N,) bool, and (N, *label_shape) labels in the format of `stored` (teacher rows
        bit-for-bit the stored ones; dropped rows keep their stored label). With `return_groups`,
        ``(keep, adapted, groups, restored)``.
    """
    label_type = canonical_label_type(label_type)
    stored = np.asarray(stored)
    gt = np.asarray(gt)
    chosen = dict(DEFAULT_ACTIONS)
    for group, action in (actions or {}).items():
        if group not in GROUPS:
            raise ReproError(f"unknown FerKD group {group!r}; groups: {', '.join(GROUPS)}.")
        if action not in ACTIONS:
            raise ReproError(f"unknown FerKD action {action!r} for group {group!r}; actions: {', '.join(ACTIONS)}.")
        chosen[group] = action
    if on_too_few not in ("error", "restore"):
        raise ReproError(f"FerKD on_too_few must be 'error' or 'restore', got {on_too_few!r}.")
    scores = region_scores(stored, gt, num_classes, label_type, score)
    thresholds = image_thresholds(scores, image, t_low, t_mid, t_high, threshold_mode)
    groups = region_groups(scores, thresholds)
    action_of = np.array([ACTIONS.index(chosen[g]) for g in GROUPS])[groups]
    keep = action_of != ACTIONS.index("drop")
    adapted = stored.copy()
    soften = action_of == ACTIONS.index("softened_gt")
    if soften.any():
        adapted[soften] = softened_ground_truth(gt[soften], num_classes, eps, label_type, soft_form).astype(
            stored.dtype)
    restored = 0
    if min_regions:
        if image is None:
            raise ReproError("min_regions needs the image of every region (image=...).")
        keep, restored = _enforce_min_regions(keep, scores, thresholds, np.asarray(image), min_regions, on_too_few)
    if return_groups:
        return keep, adapted, groups, restored
    return keep, adapted


def _enforce_min_regions(keep, scores, thresholds, image, min_regions: int, on_too_few: str):
    kept = np.bincount(image, weights=keep, minlength=image.max() + 1).astype(np.int64)
    present = np.bincount(image, minlength=image.max() + 1)
    short = np.flatnonzero((kept < min_regions) & (present > 0))
    if not len(short):
        return keep, 0
    if on_too_few == "error" or np.any(present[short] < min_regions):
        worst = short[np.argmin(kept[short])]
        raise ReproError(
            f"FerKD's rule leaves {len(short)} images with fewer than {min_regions} regions (image {worst} keeps "
            f"{kept[worst]} of {present[worst]}), but FKD draws {min_regions} distinct regions per load. Widen the "
            "thresholds, change the drop actions, or set on_too_few: restore (dropped regions nearest the kept "
            "score range come back with their teacher label).")
    keep = keep.copy()
    # distance of a dropped region's score to the kept interval [T_L, T_H] of its image
    distance = np.maximum.reduce([thresholds[:, 0] - scores, scores - thresholds[:, 2], np.zeros_like(scores)])
    restored = 0
    for img in short:
        rows = np.flatnonzero((image == img) & ~keep)
        need = min_regions - kept[img]
        back = rows[np.argsort(distance[rows], kind="stable")[:need]]
        keep[back] = True
        restored += len(back)
    return keep, restored


def group_fractions(groups: np.ndarray, keep: np.ndarray) -> dict:
    """Share of regions in each group, and kept, for the logs and the per-group figure."""
    n = max(1, len(groups))
    out = {g: float(np.mean(groups == i)) if len(groups) else 0.0 for i, g in enumerate(GROUPS)}
    out["kept"] = float(np.sum(keep) / n)
    return out
