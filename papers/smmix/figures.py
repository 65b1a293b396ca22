"""SMMix figure: the windows a trained model's motivating pass picks, and the image they make.

``python -m papers.smmix.figures windows --run RUN_DIR --out STEM --stamp TEXT``

For a few test images (one per class, partners b and B-1-b) and one window side: row 1, each image with its
least-attended window (red, overwritten); row 2, the motivating pass's patch attention received, with the
partner's most-attended window (green, pasted); row 3, the mixed image. Uses the run's final checkpoint, which
is not committed: without it the figure says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from common.errors import exit_status
from common.mixing import flip_partner
from common.plots import one_per_class_batch, save_figure, trained_run
from papers.smmix.method import mix_windows, motivating_pass, select_windows, window_sizes
from papers.smmix.model import grid_side


def windows_figure(run_dir: Path, stem: Path, stamp: str, n_images: int = 4) -> dict | None:
    title = "SMMix: least-attended window (red) overwritten by the partner's most-attended window (green)"
    run = trained_run(run_dir, stem, title, stamp)
    if run is None:
        return None
    cfg, model, eval_ds, info = run
    images, labels = one_per_class_batch(eval_ds, 2 * n_images)
    side = grid_side(model)
    options = {k: v for k, v in cfg.method.items() if k in ("min_side_ratio", "max_side_ratio")}
    sizes = window_sizes(side, **options)
    s = sizes[len(sizes) // 2]  # a middle window side, as one batch's single draw would be
    partner = flip_partner(len(images))
    _, attn = motivating_pass(model, images)
    target_tokens, source_tokens = select_windows(attn, side, s, partner)
    x_mix, _ = mix_windows(images, partner, target_tokens, source_tokens, side)
    cell = images.shape[-1] // side
    mean = torch.tensor(info.mean).view(3, 1, 1)
    std = torch.tensor(info.std).view(3, 1, 1)
    names = info.classes or [str(k) for k in range(info.num_classes)]
    lam = 1 - s * s / side**2

    def box(ax, token, colour):
        r, c = divmod(int(token), side)
        ax.add_patch(plt.Rectangle((c * cell - 0.5, r * cell - 0.5), s * cell, s * cell, fill=False, ec=colour, lw=1.8))

    fig, axes = plt.subplots(3, n_images, figsize=(2.6 * n_images, 8.2), squeeze=False)
    for col in range(n_images):
        other = len(images) - 1 - col
        shown = [(images[col] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy(),
                 attn[other].view(side, side).numpy(),
                 (x_mix[col] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()]
        for row, data in enumerate(shown):
            ax = axes[row, col]
            extent = None if row != 1 else (-0.5, side * cell - 0.5, side * cell - 0.5, -0.5)
            ax.imshow(data, cmap=None if row != 1 else "magma", interpolation="nearest", extent=extent)
            ax.set_xticks([])
            ax.set_yticks([])
        box(axes[0, col], target_tokens[col, 0], "red")
        box(axes[1, col], source_tokens[col, 0], "lime")
        box(axes[2, col], target_tokens[col, 0], "red")
        axes[0, col].set_title(f"{names[labels[col]]} (target)", fontsize=8)
        axes[1, col].set_title(f"partner: {names[labels[other]]}", fontsize=8)
        axes[2, col].set_xlabel(f"label {lam:.2f} {names[labels[col]]} + {1 - lam:.2f} {names[labels[other]]}",
                                fontsize=7)
    axes[0, 0].set_ylabel("image, overwritten window")
    axes[1, 0].set_ylabel("partner's attention received")
    axes[2, 0].set_ylabel("mixed image")
    fig.suptitle(f"{title}\nwindow {s} x {s} tokens of a {side} x {side} grid (last block, eval-mode pass)",
                 fontsize=9)
    fig.text(0.01, 0.01, f"{stamp} · run {run_dir}", fontsize=7, style="italic")
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    save_figure(fig, stem)
    return {"window": s, "target": target_tokens[:, 0].tolist(), "source": source_tokens[:, 0].tolist()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m papers.smmix.figures")
    sub = parser.add_subparsers(dest="figure", required=True)
    w = sub.add_parser("windows")
    w.add_argument("--run", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--stamp", default="")
    args = parser.parse_args(argv)
    return exit_status(lambda: windows_figure(Path(args.run), Path(args.out), args.stamp))


if __name__ == "__main__":
    sys.exit(main())
