"""C-Mixup figures: test RMSE per method with its seeds, and the partner-label law of the kernel.

``python -m papers.cmixup.figures rmse --runs LABEL=RUN_DIR [...] --out STEM --stamp TEXT``
``python -m papers.cmixup.figures kernel --config EXPERIMENT.yaml --out STEM --stamp TEXT``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from common.config import read_yaml
from common.errors import ReproError, exit_status
from common.plots import labelled_run, plot_seed_bars, save_figure
from papers.cmixup.method import pair_probability_rows

KERNEL_METHODS = ("cmixup", "cmixup_batch")


def rmse_figure(runs: list[tuple[str, Path]], stem: Path, stamp: str, statistic: str = "selected") -> dict:
    """Bars of the test RMSE (`statistic` of metrics.json) per method label, one dot per finished seed."""
    values: dict[str, list[float]] = {}
    for label, folder in runs:
        values.setdefault(label, [])
        metrics_file = Path(folder) / "metrics.json"
        if metrics_file.exists():
            metrics = json.loads(metrics_file.read_text())
            summary = metrics[statistic]["test"] if statistic == "selected" else metrics[statistic]
            values[label].append(summary["rmse"])
    experiment = Path(runs[0][1]).parts[-3] if runs else "?"
    title = f"C-Mixup, {experiment}: test RMSE\nof the best-validation epoch (lower is better)"
    return plot_seed_bars(values, stem, title=title, ylabel="test RMSE (label units)", stamp=stamp)


def kernel_figure(config: Path, stem: Path, stamp: str, quantiles=(0.1, 0.5, 0.9), bins: int = 40) -> dict:
    """Law of the partner's label for a few anchors: uniform partners vs the C-Mixup kernel of the config.

    Scalar labels: histogram of the partner's label. Label vectors (time series): histogram of the partner's
    distance to the anchor's label vector, the quantity the kernel acts on."""
    from common.data import build_splits

    raw = read_yaml(config)
    kernel = [m for m in (raw.get("methods") or {}).values() if (m or {}).get("name") in KERNEL_METHODS]
    if not kernel:
        raise ReproError(f"{config} has no C-Mixup method ({', '.join(KERNEL_METHODS)}) whose bandwidth to draw.")
    bandwidth = float(kernel[0].get("bandwidth", 1.75))
    data = raw.get("data", {})
    train_ds, *_ = build_splits(data["name"], root=data.get("root"), allow_download=False,
                                split_seed=data.get("split_seed") or 0)  # null (one split per seed): seed 0's
    labels = train_ds.targets.double().reshape(len(train_ds), -1)
    scalar = labels.shape[1] == 1
    # scalar labels: the partner's label itself; label vectors (time series): its distance to the anchor's
    spread = labels[:, 0] if scalar else (labels - labels.mean(dim=0)).norm(dim=1)
    anchors = [int(np.argmin(np.abs(spread.numpy() - np.quantile(spread.numpy(), q)))) for q in quantiles]
    rows = pair_probability_rows(labels[anchors], labels, bandwidth).numpy()
    fig, axes = plt.subplots(1, len(anchors), figsize=(4.2 * len(anchors), 3.8), sharey=True)
    drawn = {}
    for ax, anchor, row in zip(np.atleast_1d(axes), anchors, rows, strict=True):
        distance = (labels - labels[anchor]).norm(dim=1).numpy()
        x = labels[:, 0].numpy() if scalar else distance
        edges = np.linspace(x.min(), x.max(), bins + 1)
        uniform = np.full(len(x), 1.0 / len(x))
        for weights, name, color in ((uniform, "mixup: uniform", "tab:gray"),
                                     (row, f"C-Mixup: σ = {bandwidth:g}", "tab:red")):
            mass, _ = np.histogram(x, bins=edges, weights=weights)
            gap = float((weights * distance).sum())
            ax.stairs(mass, edges, fill=True, alpha=0.45, color=color, label=f"{name}, E|Δy| = {gap:.2f}")
            drawn[(anchor, name.split(":")[0])] = mass
        if scalar:
            ax.axvline(x[anchor], color="black", lw=1.2, ls="--", label=f"anchor y = {x[anchor]:.2f}")
        ax.set(xlabel="partner label y (label units)" if scalar else "|y_partner - y_anchor| (label units)",
               title=f"anchor at the {quantiles[anchors.index(anchor)]:.0%} "
                     f"{'label' if scalar else '|y - mean y|'} quantile\nP(partner = itself) = {row[anchor]:.3f}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("probability of the partner's label bin")
    dims = "" if scalar else f" of dimension {labels.shape[1]}"
    fig.suptitle(f"C-Mixup partner law on {data['name']} ({len(labels)} training labels{dims}): uniform vs label kernel")
    fig.text(0.01, 0.01, stamp, fontsize=7, style="italic")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save_figure(fig, stem)
    return drawn


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m papers.cmixup.figures")
    sub = parser.add_subparsers(dest="figure", required=True)
    r = sub.add_parser("rmse")
    r.add_argument("--runs", nargs="+", type=labelled_run, required=True)
    k = sub.add_parser("kernel")
    k.add_argument("--config", required=True)
    for p in (r, k):
        p.add_argument("--out", required=True)
        p.add_argument("--stamp", default="")
    args = parser.parse_args(argv)
    if args.figure == "rmse":
        return exit_status(lambda: rmse_figure(args.runs, Path(args.out), args.stamp))
    return exit_status(lambda: kernel_figure(Path(args.config), Path(args.out), args.stamp))


if __name__ == "__main__":
    sys.exit(main())
