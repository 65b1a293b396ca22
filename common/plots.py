"""Figures shared by every paper: learning curves, mixed-image grids and per-seed bar charts.

Every figure is meant to be read without the text around it: a title, axis labels with units, a
legend, and a small scale stamp in a corner (e.g. ``"scale: smoke (CIFAR-10 mini sample; numbers
meaningless)"``) given by the caller. Each function writes ``<stem>.png`` (150 dpi) and
``<stem>.pdf``, creating parent folders, closes its figure, and returns the numbers it drew so tests
can check the plotted values rather than only that a file exists.

Nothing is ever invented: a method without runs is left out, and a figure with no runs at all says
"no finished runs yet".
"""

from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are built on cluster nodes and in tests

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from common.errors import ReproError

SPLITS = ("test", "val")  # eval-split prefixes the trainer writes in log.jsonl
PNG_DPI = 150

# Axis labels, with units, for the eval metrics `common.metrics` logs (all percentages are times 100).
_METRIC_LABELS = {
    "top1": "top-1 accuracy (%)",
    "top5": "top-5 accuracy (%)",
    "nll": "NLL (nats per example)",
    "ece": "ECE (%)",
}
_ERROR_LABELS = {"top1": "error (%)", "top5": "top-5 error (%)"}


def load_history(run_dir: str | Path) -> list[dict]:
    """The per-epoch rows of a run, in order, from ``<run_dir>/log.jsonl``.

    Raises:
        ReproError: when the file is missing or a line is not JSON.
    """
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise ReproError(f"no log.jsonl in {run_dir}; train the run first (python -m common.train ...).")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ReproError(
                f"{path}:{number} is not valid JSON ({exc}); delete the run and retrain it."
            ) from exc
    return rows


def plot_curves(
    runs: dict[str, list[Path]],
    out_stem: str | Path,
    title: str,
    stamp: str,
    metric: str = "top1",
    error: bool = False,
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Eval metric and train loss over epochs, mean over seeds with a min-max band.

    The eval split (``test_`` or ``val_``) is detected from the logs; mixing both in one figure is an
    error. Per method, only epochs present in every seed's log are drawn, so the band never silently
    narrows to fewer seeds. Run folders without a ``log.jsonl`` are skipped with a warning.

    Args:
        runs: method label -> run folders (one per seed). Labels with no usable run are left out.
        out_stem: output path without suffix; ``.png`` and ``.pdf`` are written.
        title: figure title.
        stamp: scale note printed small in the bottom-left corner.
        metric: eval metric key without the split prefix (``top1``, ``top5``, ``nll``, ``ece``, ...).
        error: plot ``100 - metric`` (only for accuracies) as an error rate.

    Returns:
        ``{label: (epochs, mean, lo, hi)}`` of the eval panel, each a 1-D array over epochs.
    """
    if error and metric not in _ERROR_LABELS:
        raise ReproError(f"error=True needs an accuracy metric ({', '.join(_ERROR_LABELS)}), got {metric!r}.")
    histories = {label: _histories(paths) for label, paths in runs.items()}
    histories = {label: hs for label, hs in histories.items() if hs}
    split = _detect_split(histories, metric)

    fig, (ax_eval, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    drawn: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    if split is None:
        for ax in (ax_eval, ax_loss):
            ax.text(
                0.5,
                0.5,
                "no finished runs yet",
                ha="center",
                va="center",
                fontsize=14,
                color="0.4",
                transform=ax.transAxes,
            )
        ax_eval.set(xlabel="epoch", ylabel=_metric_label("eval", metric, error), title="evaluation")
        ax_loss.set(xlabel="epoch", ylabel="train loss (nats per example)", title="training loss")
    else:
        key = f"{split}_{metric}"
        for index, (label, hs) in enumerate(histories.items()):
            color = f"C{index % 10}"
            curve = _seed_curve(hs, key)
            if curve is None:
                continue
            epochs, values = curve
            if error:
                values = 100.0 - values
            drawn[label] = _band(ax_eval, epochs, values, f"{label} ({_seeds(values.shape[0])})", color)
            loss = _seed_curve(hs, "train_loss")
            if loss is not None:
                _band(ax_loss, loss[0], loss[1], f"{label} ({_seeds(loss[1].shape[0])})", color)
        ax_eval.set(
            xlabel="epoch",
            ylabel=_metric_label(split, metric, error),
            title=f"{split} {metric}" + (" error" if error else "") + ": mean, band = min-max over seeds",
        )
        ax_loss.set(
            xlabel="epoch",
            ylabel="train loss (nats per example)",
            title="training loss: mean, band = min-max over seeds",
        )
        for ax in (ax_eval, ax_loss):
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(title)
    _stamp(fig, stamp)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save_figure(fig, out_stem)
    return drawn


def plot_mixed_examples(
    methods: dict[str, dict],
    out_stem: str | Path,
    title: str,
    stamp: str,
    n_images: int = 6,
    seed: int = 0,
    dataset: str = "cifar10-mini",
    num_classes: int = 10,
    label_smoothing: float = 0.0,
    recipe: str = "default",
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A grid of one batch as each method mixes it: one row per method, first row the originals.

    The batch is the first test image of each class in turn (class 0, 1, ..., wrapping), with the
    eval transform; taking simply the first test images would give one class only, as the
    cifar10-mini test split is sorted by class. The batch size is even and at least 8, because some
    methods pair image b with B-1-b; the first `n_images` are shown. Each method gets a fresh
    ``torch.Generator().manual_seed(seed)``. Under each image: the two largest soft-target entries.

    Args:
        methods: row label -> method options (as in an experiment config, with ``name``).
        out_stem: output path without suffix.
        title, stamp: figure title and scale note.
        n_images: columns shown.
        seed: generator seed for every method's draws.
        dataset, recipe: dataset registry name and recipe giving the eval transform and mean/std.
        num_classes, label_smoothing: passed to `build_method`.

    Returns:
        ``{label: (images (n_images, C, H, W) normalised, targets (n_images, K))}``, with the
        ``"original"`` row first.
    """
    from common.data import build_datasets  # late imports: data/methods pull in the paper registry
    from common.methods import build_method
    from common.mixing import smooth_one_hot

    if n_images < 1:
        raise ReproError(f"n_images must be >= 1, got {n_images}.")
    _, eval_ds, info = build_datasets(dataset, recipe=recipe, allow_download=False)
    if info.task != "classification" or info.mean is None:
        raise ReproError(f"plot_mixed_examples needs an image classification dataset, got {dataset!r}.")
    batch_size = max(8, n_images + n_images % 2)
    indices = _one_per_class(np.asarray(eval_ds.targets), batch_size)
    samples = [eval_ds[i] for i in indices]
    images = torch.stack([image for image, _ in samples])
    labels = torch.tensor([label for _, label in samples], dtype=torch.long)

    rows = {"original": (images, smooth_one_hot(labels, num_classes, label_smoothing))}
    if "original" in methods:
        raise ReproError("'original' is the reserved first row; give the method another label.")
    for label, options in methods.items():
        method = build_method(options, num_classes, label_smoothing)
        mixed, targets = method.mix(images.clone(), labels.clone(), torch.Generator().manual_seed(seed))
        rows[label] = (mixed, targets)
    rows = {
        label: (x[:n_images].detach().cpu(), t[:n_images].detach().cpu().float())
        for label, (x, t) in rows.items()
    }

    mean = torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1)
    class_names = info.classes or tuple(str(k) for k in range(num_classes))
    fig, axes = plt.subplots(
        len(rows), n_images, figsize=(1.75 * n_images + 1.2, 2.0 * len(rows) + 0.8), squeeze=False
    )
    for r, (label, (mixed, targets)) in enumerate(rows.items()):
        pixels = (mixed.float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        for c in range(n_images):
            ax = axes[r, c]
            ax.imshow(pixels[c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(_target_text(targets[c], class_names), fontsize=7)
        axes[r, 0].set_ylabel(label, fontsize=10, rotation=90)
    fig.suptitle(
        f"{title}\n(under each image: the two largest soft-target weights; seed {seed})", fontsize=10
    )
    _stamp(fig, stamp)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, out_stem)
    return rows


def plot_seed_bars(
    values: dict[str, list[float]],
    out_stem: str | Path,
    title: str,
    ylabel: str,
    stamp: str,
) -> dict[str, float]:
    """One bar per method at the mean over seeds, each seed drawn as a dot on it.

    Args:
        values: method label -> one value per seed. Labels with no values are left out.
        out_stem: output path without suffix.
        title, stamp: figure title and scale note.
        ylabel: y-axis label, with its unit (e.g. ``"test top-1 error (%)"``).

    Returns:
        ``{label: mean}`` of the bars drawn.
    """
    kept = {label: np.asarray(v, dtype=float) for label, v in values.items() if len(v)}
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(kept) + 2), 4.2))
    means = {label: float(v.mean()) for label, v in kept.items()}
    if not kept:
        ax.text(
            0.5,
            0.5,
            "no finished runs yet",
            ha="center",
            va="center",
            fontsize=14,
            color="0.4",
            transform=ax.transAxes,
        )
    for index, (label, v) in enumerate(kept.items()):
        ax.bar(
            index,
            means[label],
            width=0.6,
            color=f"C{index % 10}",
            alpha=0.6,
            label=f"{label}: {_mean_text(means[label])} ({_seeds(v.size)})",
        )
        # Spread the dots a little sideways (deterministically) so equal seeds stay visible.
        offsets = np.linspace(-0.15, 0.15, v.size) if v.size > 1 else np.zeros(1)
        ax.scatter(index + offsets, v, color="black", s=14, zorder=3)
    ax.set_xticks(range(len(kept)), list(kept), rotation=20 if len(kept) > 4 else 0)
    ax.set(xlabel="method", ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    if kept:
        ax.legend(fontsize=8, title="bar = mean, dot = one seed", title_fontsize=8)
    _stamp(fig, stamp)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save_figure(fig, out_stem)
    return means


# Colours of the verdicts in forest plots (common/claims.py defines the verdicts).
VERDICT_COLORS = {
    "reproduced": "tab:green",
    "not reproduced": "tab:red",
    "inconclusive": "tab:orange",
    "too few runs": "0.45",
    "no paper gain": "tab:blue",
    "no verdict": "0.45",
}


def plot_forest(
    panels: dict[str, list[dict]],
    out_stem: str | Path,
    title: str,
    stamp: str,
    xlabel: str,
    reference: float | None = None,
) -> dict[str, list[tuple]]:
    """A forest plot: one row per claim, our gain as a dot with its 95% interval, the paper's gain as a diamond.

    Long (~95 lines) on purpose: it is one figure's layout (panels, rows, markers, legend, shared axis limits),
    read top to bottom like the figure; split into helpers it would pass a dozen matplotlib objects around.

    Args:
        panels: panel title -> entries, each a dict with `label`, `gain`, `low`/`high` (None: no interval),
            `paper_gain` (None: no paper number) and `verdict` (colours the dot). Empty panels are left out.
        out_stem: output path without suffix.
        title, stamp: figure title and scale note.
        xlabel: x-axis label, with the unit.
        reference: x of a dashed line drawn in every panel (e.g. 1 = the paper's gain on a relative axis);
            a solid line always marks 0, "no effect".

    Returns:
        ``{panel: [(label, gain, low, high, paper_gain), ...]}``, top row first, as drawn.
    """
    kept = {name: entries for name, entries in panels.items() if entries}
    heights = [max(1, len(entries)) for entries in kept.values()] or [1]
    fig, axes = plt.subplots(
        len(heights),
        1,
        figsize=(11, 1.3 + 0.32 * sum(heights) + 0.55 * len(heights)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    drawn: dict[str, list[tuple]] = {}
    if not kept:
        axes[0, 0].text(
            0.5,
            0.5,
            "no claim has runs here yet",
            ha="center",
            va="center",
            fontsize=14,
            color="0.4",
            transform=axes[0, 0].transAxes,
        )
        axes[0, 0].set(xlabel=xlabel, yticks=[])
    for ax, (name, entries) in zip(axes[:, 0], kept.items()):
        rows = []
        for y, entry in enumerate(reversed(entries)):  # first entry on top
            color = VERDICT_COLORS.get(entry["verdict"], "0.45")
            low, high = entry.get("low"), entry.get("high")
            if low is not None:
                ax.errorbar(
                    entry["gain"],
                    y,
                    xerr=[[entry["gain"] - low], [high - entry["gain"]]],
                    fmt="o",
                    color=color,
                    capsize=3,
                    markersize=5,
                )
            else:
                ax.plot(entry["gain"], y, "o", mfc="none", color=color, markersize=6)
            if entry.get("paper_gain") is not None:
                ax.plot(entry["paper_gain"], y, "D", mfc="none", mec="black", markersize=6)
            rows.append((entry["label"], entry["gain"], low, high, entry.get("paper_gain")))
        drawn[name] = rows[::-1]
        # long labels wrap onto a second line instead of running off the figure's left edge
        ax.set_yticks(range(len(entries)), [textwrap.fill(entry["label"], 72) for entry in reversed(entries)],
                      fontsize=7)
        ax.set_ylim(-0.7, len(entries) - 0.3)
        ax.axvline(0.0, color="0.2", linewidth=0.8)
        if reference is not None:
            ax.axvline(reference, color="0.2", linewidth=0.8, linestyle="--")
        ax.set_title(name, fontsize=9, loc="left")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    handles = [
        plt.Line2D([], [], marker="o", color=color, linestyle="none", label=verdict)
        for verdict, color in VERDICT_COLORS.items()
        if any(e["verdict"] == verdict for entries in kept.values() for e in entries)
    ]
    handles.append(
        plt.Line2D([], [], marker="D", mfc="none", mec="black", linestyle="none", label="paper's gain")
    )
    if kept:
        axes[0, 0].legend(
            handles=handles,
            fontsize=7,
            loc="lower right",
            bbox_to_anchor=(1.0, 1.02),
            ncol=len(handles),
            frameon=False,
        )
    fig.suptitle(title, fontsize=10)
    _stamp(fig, stamp)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, out_stem)
    return drawn


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _histories(paths: list[Path]) -> list[list[dict]]:
    out = []
    for path in paths:
        if not (Path(path) / "log.jsonl").is_file():
            warnings.warn(f"skipping {path}: no log.jsonl", stacklevel=3)
            continue
        rows = load_history(path)
        if rows:
            out.append(rows)
    return out


def _detect_split(histories: dict[str, list[list[dict]]], metric: str) -> str | None:
    """The eval split to plot: test when the logs have it (runs with a validation split log both), else
    the one split whose ``<split>_<metric>`` appears, or None when there is none."""
    found = {
        s
        for hs in histories.values()
        for rows in hs
        for row in rows
        for s in SPLITS
        if f"{s}_{metric}" in row
    }
    if "test" in found and all(
        f"test_{metric}" in row for hs in histories.values() for rows in hs for row in rows if any(
            f"{s}_{metric}" in row for s in SPLITS)):
        return "test"
    if len(found) > 1:
        raise ReproError(
            f"runs mix test_{metric} and val_{metric}; plot test and validation runs separately."
        )
    return found.pop() if found else None


def _seed_curve(histories: list[list[dict]], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """`(epochs (E,), values (S, E))` over the epochs where every seed logged `key`."""
    per_seed = [{row["epoch"]: float(row[key]) for row in rows if key in row} for rows in histories]
    per_seed = [s for s in per_seed if s]
    if not per_seed:
        return None
    common = sorted(set.intersection(*(set(s) for s in per_seed)))
    if not common:
        return None
    return np.asarray(common), np.asarray([[s[e] for e in common] for s in per_seed])


def _band(ax, epochs, values, label, color):
    mean, lo, hi = values.mean(axis=0), values.min(axis=0), values.max(axis=0)
    ax.plot(epochs, mean, color=color, label=label, marker="o" if len(epochs) < 15 else None, markersize=3)
    ax.fill_between(epochs, lo, hi, color=color, alpha=0.2, linewidth=0)
    return epochs, mean, lo, hi


def _mean_text(value: float) -> str:
    """Two decimals for errors in %, RMSEs of a few units; three significant digits below 1 (0.0205, not 0.02)."""
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def _seeds(count: int) -> str:
    return f"n={count} seed" + ("" if count == 1 else "s")


def _metric_label(split: str, metric: str, error: bool) -> str:
    if error:
        return f"{split} {_ERROR_LABELS[metric]}"
    return f"{split} {_METRIC_LABELS.get(metric, metric)}"


def _one_per_class(targets: np.ndarray, count: int) -> list[int]:
    """Indices of the first example of class 0, 1, ..., cycling, then the second of each, ..."""
    by_class = [np.flatnonzero(targets == k) for k in np.unique(targets)]
    picked = []
    for rank in range(max(len(idx) for idx in by_class)):
        for idx in by_class:
            if rank < len(idx):
                picked.append(int(idx[rank]))
                if len(picked) == count:
                    return picked
    raise ReproError(f"the eval split has only {len(picked)} examples, fewer than the {count} needed.")


def _target_text(target: torch.Tensor, class_names) -> str:
    weights, classes = target.topk(min(2, target.numel()))
    parts = [f"{class_names[int(k)]} {float(w):.2f}" for w, k in zip(weights, classes) if float(w) >= 0.005]
    return " / ".join(parts)


def _stamp(fig, stamp: str) -> None:
    fig.text(0.005, 0.005, stamp, ha="left", va="bottom", fontsize=7, color="0.35", style="italic")


def labelled_run(text: str) -> tuple[str, Path]:
    """argparse type of a figure CLI's `--runs LABEL=RUN_DIR` entries."""
    import argparse

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--runs entries look like LABEL=RUN_DIR, got {text!r}")
    label, folder = text.split("=", 1)
    return label, Path(folder)


def save_figure(fig, out_stem: str | Path) -> None:
    """Write `<stem>.png` (150 dpi) and `<stem>.pdf`, creating folders, and close the figure.
    Every figure of the project, shared or paper-specific, is saved through this one function."""
    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(stem.with_name(stem.name + ".png"), dpi=PNG_DPI)
        fig.savefig(stem.with_name(stem.name + ".pdf"))
    finally:
        plt.close(fig)


def message_figure(out_stem: str | Path, title: str, message: str, stamp: str) -> None:
    """A figure that only says why the real one cannot be drawn here (e.g. no checkpoint on this machine), so
    the workflow's outputs exist and say what to do."""
    fig = plt.figure(figsize=(8, 3))
    fig.suptitle(title)
    fig.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    _stamp(fig, stamp)
    save_figure(fig, out_stem)


def one_per_class_batch(dataset, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` examples of `dataset` taking the first of class 0, 1, ... in turn (then the second of each):
    neighbouring and flip-partnered rows differ in class. Returns (images (count, ...), labels (count,))."""
    picked = [dataset[i] for i in _one_per_class(np.asarray(dataset.targets), count)]
    return torch.stack([image for image, _ in picked]), torch.tensor([int(label) for _, label in picked])


def trained_run(run_dir: str | Path, out_stem: str | Path, title: str, stamp: str):
    """`(config, model in eval mode, eval split, DataInfo)` of a finished run, from its `checkpoint/last.pt`;
    None, after drawing a message figure at `out_stem` instead, when the checkpoint is not on this machine."""
    from common.config import load_config
    from common.data import build_datasets

    run_dir = Path(run_dir)
    checkpoint = run_dir / "checkpoint" / "last.pt"
    if not checkpoint.exists():
        message_figure(out_stem, title, f"No checkpoint at {checkpoint} on this machine (checkpoints are not "
                       "committed); run the training job here to draw this figure.", stamp)
        return None
    cfg = load_config(run_dir / "config.yaml")
    _, eval_ds, info = build_datasets(cfg.data.name, root=cfg.data.root, recipe=cfg.data.recipe,
                                      allow_download=False, image_size=cfg.data.image_size)
    return cfg, load_trained_model(checkpoint, cfg, info.num_classes), eval_ds, info


def load_trained_model(checkpoint: str | Path, cfg, num_classes: int) -> torch.nn.Module:
    """The model of a run's config with the weights of its checkpoint (`checkpoint/last.pt`), in eval mode."""
    from common.models import build_model

    model = build_model(cfg.model.name, num_classes=num_classes, **cfg.model.kwargs)
    from common.safeload import TRAINER_CHECKPOINT_GLOBALS, safe_load

    # weights_only: a run folder copied in from another machine cannot run code when its figure is drawn
    model.load_state_dict(safe_load(checkpoint, TRAINER_CHECKPOINT_GLOBALS, what="checkpoint")["model"])
    return model.eval()
