"""RankMixup figures: reliability diagrams per method, before and after temperature scaling.

``python -m papers.rankmixup.figures reliability --runs RUN_DIR [RUN_DIR ...] --out STEM --stamp TEXT``

Each run's ``metrics.json`` holds the reliability data of its test set at the epoch selected on validation
(``selected.reliability.test`` and ``.test_ts``, 15 equal-width bins, written by the trainer); runs without a
validation split fall back to the final epoch (``final_reliability``), and the panel says so. Seeds of one
method are pooled bin by bin (counts summed, confidences and accuracies count-weighted).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from common.errors import exit_status
from common.plots import save_figure

VIEWS = (("test", "raw"), ("test_ts", "after TS"))
LABELS = {"erm": "CE", "mixup": "Mixup", "mrl": "RankMixup (MRL)", "mndcg": "RankMixup (M-NDCG)"}


def _run_reliability(run_dir: Path) -> tuple[dict, str, float | None] | None:
    """(reliability data by view, which epoch it is from, the temperature) of one finished run, or None."""
    path = run_dir / "metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    selected = metrics.get("selected", {})
    if selected.get("reliability"):
        return (
            selected["reliability"],
            f"epoch {selected['epoch']} (best val)",
            selected.get("val", {}).get("temperature"),
        )
    if metrics.get("final_reliability"):
        return metrics["final_reliability"], "final epoch", None
    return None


def pool_bins(diagrams: list[dict]) -> dict:
    """Pool reliability data of several runs: counts add, confidence and accuracy are count-weighted means.

    Returns:
        {'lower', 'upper', 'confidence', 'accuracy', 'count'} (NaN for empty bins) and 'ece' in percent,
        ``sum_b count_b * |confidence_b - accuracy_b| / N * 100`` (a run's own ECE when there is one run).
    """
    first = diagrams[0]
    n_bins = len(first["count"])
    count = [0.0] * n_bins
    conf = [0.0] * n_bins
    acc = [0.0] * n_bins
    for data in diagrams:
        for b in range(n_bins):
            c = data["count"][b]
            if c:
                count[b] += c
                conf[b] += c * data["confidence"][b]
                acc[b] += c * data["accuracy"][b]
    total = sum(count)
    confidence = [conf[b] / count[b] if count[b] else math.nan for b in range(n_bins)]
    accuracy = [acc[b] / count[b] if count[b] else math.nan for b in range(n_bins)]
    gap = sum(count[b] * abs(confidence[b] - accuracy[b]) for b in range(n_bins) if count[b])
    return {
        "lower": first["lower"],
        "upper": first["upper"],
        "confidence": confidence,
        "accuracy": accuracy,
        "count": count,
        "ece": 100.0 * gap / total if total else math.nan,
    }


def _panel(ax, data: dict, title: str) -> None:
    width = data["upper"][0] - data["lower"][0]
    centres = [(lo + hi) / 2 for lo, hi in zip(data["lower"], data["upper"], strict=True)]
    acc = [0.0 if math.isnan(a) else a for a in data["accuracy"]]
    conf = [0.0 if math.isnan(c) else c for c in data["confidence"]]
    ax.bar(centres, acc, width=width, color="tab:blue", edgecolor="black", lw=0.5, label="accuracy")
    gap_bottom = [min(a, c) for a, c in zip(acc, conf, strict=True)]
    gap_height = [abs(c - a) if n else 0.0 for a, c, n in zip(acc, conf, data["count"], strict=True)]
    ax.bar(
        centres,
        gap_height,
        bottom=gap_bottom,
        width=width,
        facecolor="none",
        edgecolor="tab:red",
        hatch="///",
        lw=0.8,
        label="gap to mean confidence",
    )
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=8)


def reliability_figure(run_dirs: list[Path], stem: Path, stamp: str) -> dict | None:
    """One column per method (runs grouped by their method folder), rows before / after temperature scaling."""
    by_method: dict[str, list] = {}
    for run in run_dirs:
        found = _run_reliability(run)
        if found is not None:
            by_method.setdefault(run.parent.name, []).append(found)
    title = (
        "Reliability diagrams on the test set (15 equal-width bins, seeds pooled): raw softmax (top) and\n"
        "after temperature scaling with T fitted on the validation split (bottom)"
    )
    if not by_method:
        fig = plt.figure(figsize=(8, 3))
        fig.suptitle(title)
        fig.text(0.5, 0.5, "no finished runs yet", ha="center", va="center")
        fig.text(0.01, 0.01, stamp, fontsize=7, style="italic")
        save_figure(fig, stem)
        return None
    methods = list(by_method)
    fig, axes = plt.subplots(2, len(methods), figsize=(3.2 * len(methods), 7.8), squeeze=False)
    drawn = {}
    for col, method in enumerate(methods):
        found = by_method[method]
        whence = sorted({w for _, w, _ in found})
        temps = [t for _, _, t in found if t is not None]
        drawn[method] = {}
        for row, (view, view_label) in enumerate(VIEWS):
            ax = axes[row, col]
            diagrams = [rel[view] for rel, _, _ in found if rel.get(view)]
            if not diagrams:
                ax.text(
                    0.5,
                    0.5,
                    "no validation split:\nno temperature scaling",
                    ha="center",
                    va="center",
                    fontsize=8,
                    transform=ax.transAxes,
                )
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            pooled = pool_bins(diagrams)
            drawn[method][view] = pooled
            extra = f", T={sum(temps) / len(temps):.1f}" if view == "test_ts" and temps else ""
            _panel(
                ax,
                pooled,
                f"{LABELS.get(method, method)}, {view_label}: ECE {pooled['ece']:.2f}%{extra}\n"
                f"{len(diagrams)} run(s), {', '.join(whence)}",
            )
            if row == len(VIEWS) - 1:
                ax.set_xlabel("confidence (max softmax)")
            if col == 0:
                ax.set_ylabel("accuracy")
    axes[0, 0].legend(loc="upper left", fontsize=7)
    fig.suptitle(title)
    fig.text(0.01, 0.01, stamp, fontsize=7, style="italic")
    fig.tight_layout(rect=(0, 0.03, 1, 0.94))
    save_figure(fig, stem)
    return drawn


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m papers.rankmixup.figures")
    sub = parser.add_subparsers(dest="figure", required=True)
    r = sub.add_parser("reliability")
    r.add_argument("--runs", nargs="*", default=[])
    r.add_argument("--out", required=True)
    r.add_argument("--stamp", default="")
    args = parser.parse_args(argv)
    return exit_status(lambda: reliability_figure([Path(p) for p in args.runs], Path(args.out), args.stamp))


if __name__ == "__main__":
    sys.exit(main())
