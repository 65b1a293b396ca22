"""ResizeMix figures, drawn from an experiment's method grid (no training run needed).

``python -m papers.resizemix.figures pairs --scale SCALE --experiment E --out STEM --stamp TEXT``
    the same (target, partner) pairs mixed by every mixing method of the experiment;
``python -m papers.resizemix.figures weights --scale SCALE --experiment E --out STEM --stamp TEXT``
    the distribution of the partner's label weight each method trains with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from common.errors import ReproError, exit_status
from common.methods import build_method
from common.mixing import randperm_partner
from common.plots import save_figure
from common.workflow import load_experiment


def mixing_methods(scale: str, experiment: str) -> dict[str, dict]:
    """label -> options of every method of the experiment except plain training."""
    grid = load_experiment("resizemix", scale, experiment).get("methods") or {}
    out = {label: {"name": label, **(options or {})} for label, options in grid.items()}
    return {label: options for label, options in out.items() if options["name"] != "erm"}


def pairs_figure(methods: dict[str, dict], stem: Path, stamp: str, n_images: int = 8, seed: int = 1) -> dict:
    """Rows: target, partner, then each method's mixed image. Every method draws its partners first from a
    fresh generator with the same seed (ResizeMix, Mixup and CutMix all do), so the pairs are the same."""
    from common.data import build_datasets
    from common.plots import _one_per_class, _target_text

    _, eval_ds, info = build_datasets("cifar10-mini", recipe="mixup_official", allow_download=False)
    samples = [eval_ds[i] for i in _one_per_class(np.asarray(eval_ds.targets), n_images)]
    images = torch.stack([image for image, _ in samples])
    labels = torch.tensor([label for _, label in samples])
    perm = randperm_partner(n_images, torch.Generator().manual_seed(seed))
    rows = {"target": (images, None), "partner": (images[perm], None)}
    for label, options in methods.items():
        method = build_method(options, num_classes=10)
        rows[label] = method.mix(images.clone(), labels.clone(), torch.Generator().manual_seed(seed))
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    fig, axes = plt.subplots(len(rows), n_images, figsize=(1.6 * n_images + 1, 1.9 * len(rows) + 0.8), squeeze=False)
    for r, (label, (x, target)) in enumerate(rows.items()):
        pixels = (x * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        for c in range(n_images):
            ax = axes[r, c]
            ax.imshow(pixels[c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if target is not None:
                ax.set_xlabel(_target_text(target[c], info.classes), fontsize=6)
        axes[r, 0].set_ylabel(label, fontsize=9)
    fig.suptitle("ResizeMix vs CutMix on the same (target, partner) pairs (cifar10-mini test images, one batch)\n"
                 "resizemix: authors' geometry (whole partner shrunk, pasted inside the image at a per-image spot); "
                 "resizemix_openmixup: one clipped box per batch", fontsize=9)
    fig.text(0.005, 0.005, stamp, fontsize=7, style="italic", color="0.35")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, stem)
    return {label: x for label, (x, _) in rows.items()}


def partner_weights(options: dict, batches: int = 1500, batch_size: int = 16, seed: int = 0) -> np.ndarray:
    """Partner label weights (1 - own weight) a method draws: labels 0..B-1 over B classes, so row b's own
    weight is target[b, b]. A fixed point of the permutation counts as weight 0, as it trains."""
    method = build_method(options, num_classes=batch_size)
    images, labels = torch.zeros(batch_size, 3, 32, 32), torch.arange(batch_size)
    generator = torch.Generator().manual_seed(seed)
    out = [1.0 - method.mix(images, labels, generator)[1].diagonal() for _ in range(batches)]
    return torch.cat(out).double().numpy()


def weights_figure(methods: dict[str, dict], stem: Path, stamp: str) -> dict[str, np.ndarray]:
    drawn = {label: partner_weights(options) for label, options in methods.items()}
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (label, w) in enumerate(drawn.items()):  # a CDF: the patch-size laws are discrete (integer sides)
        ax.ecdf(w, color=f"C{i}", linewidth=1.6, label=f"{label} (mean {w.mean():.3f})")
    ax.axvline(0.64, color="0.5", linestyle=":", linewidth=1)
    ax.text(0.65, 0.05, "0.8² = 0.64: largest\nResizeMix share", fontsize=7, color="0.4")
    ax.set(xlabel="partner's label weight 1 − λ (= pasted area share for CutMix and ResizeMix)",
           ylabel="fraction of samples ≤ x", title="Label weight of the pasted partner, as each method draws it",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.005, 0.005, stamp + f"; {len(next(iter(drawn.values()), []))} samples per method",
             fontsize=7, style="italic", color="0.35")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, stem)
    return drawn


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m papers.resizemix.figures", description=__doc__.splitlines()[0])
    parser.add_argument("figure", choices=("pairs", "weights"))
    parser.add_argument("--scale", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stamp", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: extra threads only oversubscribe the cores beside other jobs

    def draw():
        methods = mixing_methods(args.scale, args.experiment)
        if not methods:
            raise ReproError(f"experiment {args.experiment!r} at scale {args.scale} has no mixing method.")
        figure = pairs_figure if args.figure == "pairs" else weights_figure
        figure(methods, Path(args.out), args.stamp)

    return exit_status(draw)


if __name__ == "__main__":
    sys.exit(main())
