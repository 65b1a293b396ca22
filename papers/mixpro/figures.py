"""MixPro figure: MaskMix masks with the PAL weights of a trained model, and the progressive factor over training.

``python -m papers.mixpro.figures pal --runs RUN_DIR [RUN_DIR ...] --out STEM --stamp TEXT``

Top: a few MaskMix-mixed test images (cells kept from the original outlined), the class token's last-block
attention of the first run's final checkpoint, and the original image's label weight by area, by attention and by
PAL. Bottom: the epoch mean of the progressive factor cos(area target, softmax(logits)) logged by the method.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.ticker import MaxNLocator

from common.attention import capture_cls_attention
from common.config import load_config
from common.errors import ReproError
from common.plots import load_trained_model, one_per_class_batch, save_figure
from papers.mixpro.method import area_target, mask_geometry, maskmix_images, pal_weights, token_mask


def _factor_curves(run_dirs: list[Path]) -> list[tuple[list[int], list[float]]]:
    curves = []
    for run in run_dirs:
        log = run / "log.jsonl"
        if not log.exists():
            continue
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        points = [(r["epoch"], r["method_stats"]["factor_mean"]) for r in rows
                  if (r.get("method_stats") or {}).get("factor_mean") is not None]
        if points:
            curves.append(([e for e, _ in points], [v for _, v in points]))
    return curves


def pal_figure(run_dirs: list[Path], stem: Path, stamp: str, n_images: int = 4) -> dict:
    from common.data import build_datasets
    from common.methods import build_method

    if not run_dirs:
        raise ReproError("pal figure: no MixPro run folders given.")
    run = run_dirs[0]
    config_path = run / "config.yaml"
    if not config_path.exists():
        raise ReproError(f"{config_path} is missing: train the MixPro run first.")
    cfg = load_config(config_path)
    method = build_method(cfg.method, num_classes=10, label_smoothing=cfg.train.label_smoothing)
    p = method.params
    _, eval_ds, info = build_datasets(cfg.data.name, root=cfg.data.root, recipe=cfg.data.recipe,
                                      allow_download=False, image_size=cfg.data.image_size)
    images, labels = one_per_class_batch(eval_ds, 2 * n_images)
    B, H = images.shape[0], images.shape[-1]
    grid, f, tokens_side = mask_geometry(H, p.mask_size, p.patch_size, p.allow_ragged_mask)
    # fixed draws for the figure: partner b <-> B-1-b, 9 of 16 cells kept (lam_area 0.5625 on the 4 x 4 grid)
    generator = torch.Generator().manual_seed(0)
    count = max(1, round(0.55 * grid * grid))
    order = torch.rand(B, grid * grid, generator=generator).argsort(dim=1)
    cells = torch.zeros(B, grid * grid, dtype=torch.bool).scatter_(1, order[:, :count], True).view(B, grid, grid)
    perm = torch.arange(B - 1, -1, -1)
    x_mix = maskmix_images(images, perm, cells, p.mask_size)
    lam_area = count / (grid * grid)
    target = area_target(labels, perm, lam_area, info.num_classes, cfg.train.label_smoothing)

    ckpt = run / "checkpoint" / "last.pt"
    attn = lam = lam_attn = factor = None
    if ckpt.exists():
        model = load_trained_model(ckpt, cfg, info.num_classes)
        with torch.no_grad(), capture_cls_attention(model, "mixpro figure") as grab:
            logits = model(x_mix)
        attn = grab.attention
        lam, lam_attn, factor = pal_weights(attn, token_mask(cells, f, tokens_side), target, logits, lam_area)

    mean, std = torch.tensor(info.mean).view(3, 1, 1), torch.tensor(info.std).view(3, 1, 1)
    names = info.classes or [str(k) for k in range(info.num_classes)]
    fig = plt.figure(figsize=(2.6 * n_images, 8.2))
    spec = fig.add_gridspec(3, n_images, height_ratios=[1, 1, 1.1])
    for col in range(n_images):
        ax = fig.add_subplot(spec[0, col])
        ax.imshow((x_mix[col] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
        for i in range(grid):
            for j in range(grid):
                if cells[col, i, j]:
                    ax.add_patch(plt.Rectangle((j * p.mask_size - 0.5, i * p.mask_size - 0.5), p.mask_size,
                                               p.mask_size, fill=False, ec="cyan", lw=1.0))
        ax.set_title(f"{names[labels[col]]} (cyan) + {names[labels[perm[col]]]}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax = fig.add_subplot(spec[1, col])
        ax.set_xticks([])
        ax.set_yticks([])
        if attn is None:
            ax.text(0.5, 0.5, "no checkpoint on this\nmachine: attention\nnot drawn", ha="center", va="center",
                    fontsize=8, transform=ax.transAxes)
            ax.set_xlabel(f"area label {lam_area:.2f}", fontsize=8)
            continue
        amap = F.interpolate(attn[col].view(1, 1, tokens_side, tokens_side), size=(H, H), mode="nearest")[0, 0]
        ax.imshow(amap.numpy(), cmap="magma", interpolation="nearest")
        ax.set_xlabel(f"area {lam_area:.2f} · attn {float(lam_attn[col]):.2f}\nfactor {float(factor[col]):.2f} · "
                      f"PAL {float(lam[col]):.2f}", fontsize=8)
    ax = fig.add_subplot(spec[2, :])
    curves = _factor_curves(run_dirs)
    for k, (epochs, values) in enumerate(curves):
        ax.plot(epochs, values, marker="o", ms=3, label=f"run {k}")
    if len(curves) > 1:
        ax.legend(fontsize=8)
    if not curves:
        ax.text(0.5, 0.5, "no PAL statistics logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean progressive factor")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.suptitle("MixPro: MaskMix cells (original image's cells in cyan), class-token attention and PAL label "
                 "weights of the original image", fontsize=10)
    fig.text(0.01, 0.005, f"{stamp} · run {run}", fontsize=7, style="italic")
    fig.tight_layout(rect=(0, 0.02, 1, 0.96))
    save_figure(fig, stem)
    return {"lam_area": lam_area, "pal": None if lam is None else lam.tolist(), "curves": len(curves)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m papers.mixpro.figures")
    sub = parser.add_subparsers(dest="figure", required=True)
    pal = sub.add_parser("pal")
    pal.add_argument("--runs", nargs="+", required=True)
    pal.add_argument("--out", required=True)
    pal.add_argument("--stamp", default="")
    args = parser.parse_args(argv)
    try:
        pal_figure([Path(r) for r in args.runs], Path(args.out), args.stamp)
    except ReproError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
