"""FerKD figures: one image's regions ordered by teacher score with their FerKD group, the per-group fractions of
every rewrite, and accuracy per epoch of FKD vs FerKD.

``python -m papers.ferkd.figures regions --scale SCALE (or --config FILE) --out STEM --stamp TEXT``
``python -m papers.ferkd.figures groups --scale SCALE --out STEM --stamp TEXT``
``python -m papers.ferkd.figures convergence --runs METHOD=RUN_DIR ... --out STEM --stamp TEXT``

A figure whose label set is not on this machine (label sets are not committed) says so instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from common.errors import ReproError, exit_status
from common.plots import _stamp, message_figure, plot_curves, save_figure
from papers.ferkd.regions import add_config_arguments, config_file

GROUP_COLOURS = {"hard_negative": "#7f7f7f", "context": "#ff7f0e", "hard_positive": "#2ca02c",
                 "easy_positive": "#1f77b4"}


def plot_regions(config: str, out_stem: str, stamp: str, image_position: int = 0, max_regions: int = 16) -> None:
    """The stored regions of one training image, hard -> easy by the FerKD score (the official figure's order),
    each titled with its score and the group the main rewrite puts it in."""
    from papers.ferkd.adapt import GROUPS, image_thresholds, region_groups, region_scores
    from papers.ferkd.labels import load_label_set
    from papers.ferkd.method import rebuild_region
    from papers.ferkd.regions import adapt_spec, load_labelset_config, teacher_dir, training_images

    cfg = load_labelset_config(config)
    title = "FerKD: regions of one image by teacher score (hard -> easy) and their group"
    manifest = teacher_dir(cfg) / "manifest.json"
    if not manifest.exists():
        message_figure(out_stem, title, f"No label set at {manifest} on this machine (label sets are not "
                       "committed); run the workflow here to build it.", stamp)
        return
    labels, info = load_label_set(manifest, verify=False, mmap=True)  # one image is read
    row = image_position
    rows = slice(int(labels.offsets[row]), int(labels.offsets[row + 1]))
    stored, gt = labels.labels[rows], np.full(rows.stop - rows.start, labels.target[row])
    images, data_info = training_images(cfg.data)
    image, _ = images[int(labels.image[row])]
    name = cfg.main_adapted
    spec = adapt_spec(cfg, name) if name else None
    scores = region_scores(stored, gt, info["num_classes"], info["label_type"], spec.score if spec else "gt_prob")
    if spec is not None:
        thresholds = image_thresholds(scores, np.zeros(len(scores), np.int64), spec.t_low, spec.t_mid, spec.t_high,
                                      spec.threshold_mode)
        groups = [GROUPS[g] for g in region_groups(scores, thresholds)]
    else:
        groups = [""] * len(scores)
    order = np.argsort(scores, kind="stable")
    shown = order[np.linspace(0, len(order) - 1, min(max_regions, len(order))).round().astype(int)]
    cols = min(8, len(shown))
    nrows = int(np.ceil(len(shown) / cols)) + 1
    fig = plt.figure(figsize=(1.6 * cols, 1.9 * nrows))
    ax = fig.add_subplot(nrows, cols, 1)
    ax.imshow(image)
    ax.set_title(f"image (class {data_info.classes[labels.target[row]] if data_info.classes else labels.target[row]})",
                 fontsize=7)
    ax.axis("off")
    for k, r in enumerate(shown):
        ax = fig.add_subplot(nrows, cols, cols + k + 1)
        ax.imshow(rebuild_region(image, labels.boxes[rows][r], bool(labels.flips[rows][r]), 64))
        ax.set_title(f"q={scores[r]:.2f}\n{groups[r]}", fontsize=7, color=GROUP_COLOURS.get(groups[r], "black"))
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(GROUP_COLOURS.get(groups[r], "black"))
            spine.set_linewidth(2.5)
    rule = f"rewrite {name}: " + ", ".join(f"{k}={getattr(spec, k)}" for k in ("t_low", "t_mid", "t_high", "eps",
                                                                           "score", "threshold_mode")) if spec else ""
    fig.suptitle(f"{title}\n{len(scores)} regions, {len(shown)} shown; {rule}", fontsize=8)
    _stamp(fig, stamp)
    save_figure(fig, out_stem)


def plot_groups(config: str, out_stem: str, stamp: str) -> None:
    """Stacked shares of the four FerKD groups in every rewrite of the label config, and the share kept."""
    from papers.ferkd.adapt import GROUPS
    from papers.ferkd.regions import load_labelset_config

    cfg = load_labelset_config(config)
    title = "FerKD: share of regions per group in each label rewrite"
    stats = {}
    for name in sorted(cfg.adapted):
        manifest = Path(cfg.out_dir) / "adapted" / name / "manifest.json"
        if manifest.exists():
            stats[name] = json.loads(manifest.read_text()).get("stats", {})
    if not stats:
        message_figure(out_stem, title, f"No adapted label set under {cfg.out_dir}/adapted on this machine (label "
                       "sets are not committed); run the workflow here to build them.", stamp)
        return
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(stats), 4))
    names = list(stats)
    bottom = np.zeros(len(names))
    for group in GROUPS:
        values = np.array([stats[n].get(group, 0.0) for n in names])
        ax.bar(names, values, bottom=bottom, color=GROUP_COLOURS[group], label=group)
        bottom += values
    ax.scatter(names, [stats[n].get("kept", np.nan) for n in names], color="black", marker="_", s=400, zorder=3,
               label="kept (after restoring)")
    ax.set_ylabel("fraction of regions")
    ax.set_ylim(0, 1.05)
    ax.tick_params(axis="x", rotation=30, labelsize=7)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _stamp(fig, stamp)
    save_figure(fig, out_stem)


def plot_convergence(runs: list[str], out_stem: str, stamp: str) -> None:
    """Test accuracy per epoch of the FKD and FerKD arms (x: epochs as FKD counts them, a point per pass)."""
    groups = defaultdict(list)
    for item in runs:
        method, _, folder = item.partition("=")
        if not folder:
            raise ReproError(f"--runs takes METHOD=RUN_DIR, got {item!r}.")
        groups[method].append(Path(folder))
    title = "FKD vs FerKD: test accuracy per epoch (one point per pass)"
    if not groups:
        message_figure(out_stem, title, "No finished FKD / FerKD runs yet.", stamp)
        return
    plot_curves(dict(groups), out_stem, title=title, stamp=stamp)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m papers.ferkd.figures", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("regions", "groups", "convergence"):
        p = sub.add_parser(name)
        if name == "convergence":
            p.add_argument("--runs", nargs="*", default=[])
        else:
            add_config_arguments(p)
        p.add_argument("--out", required=True)
        p.add_argument("--stamp", default="")
    args = parser.parse_args(argv)

    def command():
        if args.command == "regions":
            plot_regions(config_file(args), args.out, args.stamp)
        elif args.command == "groups":
            plot_groups(config_file(args), args.out, args.stamp)
        else:
            plot_convergence(args.runs, args.out, args.stamp)

    return exit_status(command)


if __name__ == "__main__":
    sys.exit(main())
