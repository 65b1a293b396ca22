"""TransMix figures: attention vs box on CutMix images, and the shift of label weights over an epoch.

``python -m papers.transmix.figures attention --run RUN_DIR --out STEM --stamp TEXT``
``python -m papers.transmix.figures weights --runs RUN_DIR [RUN_DIR ...] --out STEM --stamp TEXT``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import itertools

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from common.attention import capture_cls_attention
from common.errors import exit_status
from common.mixing import cutmix_box, flip_partner, paste_box
from common.plots import message_figure, one_per_class_batch, save_figure, trained_run
from papers.transmix.method import transmix_weights


def attention_figure(run_dir: Path, stem: Path, stamp: str, n_images: int = 4, lam: float = 0.55) -> dict | None:
    """For a few CutMix-mixed test images: the image with its box, the class-token attention over it, and
    the area weight vs the TransMix weight of the pasted partner. Uses the run's final checkpoint."""
    title = "TransMix: class-token attention vs pasted box (last block, head mean)"
    run = trained_run(run_dir, stem, title, stamp)
    if run is None:
        return None
    _, model, eval_ds, info = run
    # 2 * n_images test images of different classes: rows b and B-1-b are partners
    images, labels = one_per_class_batch(eval_ds, 2 * n_images)
    H, W = images.shape[-2:]
    box, _ = cutmix_box(lam, H // 2, W // 3, (H, W))
    x_mix = paste_box(images, flip_partner(len(images)), box)
    with torch.no_grad(), capture_cls_attention(model) as grab:
        model(x_mix)
    attn = grab.attention
    w, lam_area, _ = transmix_weights(attn, box, (H, W))
    g = int(attn.shape[1] ** 0.5)
    maps = F.interpolate(attn.view(-1, 1, g, g), size=(H, W), mode="nearest").squeeze(1)
    mean = torch.tensor(info.mean).view(3, 1, 1)
    std = torch.tensor(info.std).view(3, 1, 1)
    names = info.classes or [str(k) for k in range(info.num_classes)]
    fig, axes = plt.subplots(2, n_images, figsize=(2.6 * n_images, 5.6))
    yl, yh, xl, xh = box
    for col in range(n_images):
        shown = (x_mix[col] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        partner = len(images) - 1 - col
        for row, data in enumerate((shown, maps[col].numpy())):
            ax = axes[row, col]
            ax.imshow(data, cmap=None if row == 0 else "magma", interpolation="nearest")
            ax.add_patch(plt.Rectangle((xl - 0.5, yl - 0.5), xh - xl, yh - yl, fill=False, ec="cyan", lw=1.5))
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, col].set_title(f"{names[labels[col]]} + box from {names[labels[partner]]}", fontsize=8)
        axes[1, col].set_xlabel(f"partner weight: area {lam_area:.2f}, TransMix {float(w[col]):.2f}", fontsize=8)
    axes[0, 0].set_ylabel("mixed image (box cyan)")
    axes[1, 0].set_ylabel("class-token attention")
    fig.suptitle(title)
    fig.text(0.01, 0.01, f"{stamp} · run {run_dir}", fontsize=7, style="italic")
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    save_figure(fig, stem)
    return {"box": box, "lam_area": lam_area, "weights": w.tolist()}


def weights_figure(run_dirs: list[Path], stem: Path, stamp: str) -> dict | None:
    """Histogram of (TransMix weight - area weight) over the last epoch's CutMix samples, summed over seeds."""
    title = "TransMix label weight minus CutMix area weight (last epoch, all CutMix samples)"
    total, edges, n = None, None, 0
    for run in run_dirs:
        log = run / "log.jsonl"
        if not log.exists():
            continue
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        stats = [r["method_stats"] for r in rows if r.get("method_stats")]
        if not stats:
            continue
        hist = torch.tensor(stats[-1]["delta_hist"], dtype=torch.float64)
        total = hist if total is None else total + hist
        edges = stats[-1]["delta_edges"]
        n += 1
    if total is None:
        message_figure(stem, title, "no finished TransMix runs with weight statistics yet", stamp)
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    centres = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    ax.bar(centres, (total / total.sum()).tolist(), width=edges[1] - edges[0], color="tab:purple", alpha=0.8)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_xlabel("TransMix partner weight − area partner weight")
    ax.set_ylabel("fraction of CutMix samples")
    ax.set_title(title, fontsize=10)
    fig.text(0.01, 0.01, f"{stamp} · {n} run(s), {int(total.sum())} samples", fontsize=7, style="italic")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save_figure(fig, stem)
    return {"hist": total.tolist(), "edges": edges}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m papers.transmix.figures")
    sub = parser.add_subparsers(dest="figure", required=True)
    a = sub.add_parser("attention")
    a.add_argument("--run", required=True)
    w = sub.add_parser("weights")
    w.add_argument("--runs", nargs="+", required=True)
    for p in (a, w):
        p.add_argument("--out", required=True)
        p.add_argument("--stamp", default="")
    args = parser.parse_args(argv)
    if args.figure == "attention":
        return exit_status(lambda: attention_figure(Path(args.run), Path(args.out), args.stamp))
    return exit_status(lambda: weights_figure([Path(r) for r in args.runs], Path(args.out), args.stamp))


if __name__ == "__main__":
    sys.exit(main())
