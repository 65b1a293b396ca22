"""ICM figures: the complementary-label noise of each arm's pairs beside the cluster purity, and what a cluster
looks like.

``python -m papers.icm.figures noise --runs LABEL=RUN_DIR [...] --out STEM --stamp TEXT``
``python -m papers.icm.figures clusters --config EXPERIMENT.yaml --out STEM --stamp TEXT``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from common.config import read_yaml
from common.errors import ReproError, exit_status
from common.plots import _band, _seed_curve, _stamp, labelled_run, load_history, message_figure, save_figure
from papers.icm.method import expected_mixup_noise

COLORS = {"mixup": "tab:red", "icm_official": "tab:blue", "icm_mix": "tab:green", "none": "0.4"}


def _stat_histories(folders: list[Path], key: str) -> list[list[dict]]:
    """Per-seed rows `{epoch, key}` from the `method_stats` of each run's log.jsonl (runs without it skipped)."""
    out = []
    for folder in folders:
        if not (folder / "log.jsonl").is_file():
            continue
        rows = [{"epoch": r["epoch"], key: r["method_stats"][key]} for r in load_history(folder)
                if key in (r.get("method_stats") or {})]
        if rows:
            out.append(rows)
    return out


def noise_figure(runs: list[tuple[str, Path]], stem: Path, stamp: str, batch_size: int = 512,
                 analytic_applies: bool = True) -> dict:
    """Left: the measured CL-noise rate of the pairs each arm drew, per epoch (mean, min-max band over seeds), with
    the analytic rate of uniform partners; right: the purity of the clusters the ICM runs paired within."""
    by_label: dict[str, list[Path]] = {}
    for label, folder in runs:
        by_label.setdefault(label, []).append(Path(folder))
    fig, (ax_noise, ax_purity) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    drawn, purities = {}, {}
    for label, folders in by_label.items():
        curve = _seed_curve(_stat_histories(folders, "noise_rate"), "noise_rate")
        if curve is not None:
            epochs, values = curve
            drawn[label] = _band(ax_noise, epochs, 100 * values, f"{label} (n={values.shape[0]})",
                                 COLORS.get(label))
        purity = [h[0]["cluster_purity"] for h in _stat_histories(folders, "cluster_purity")]
        if purity and label.startswith("icm"):
            purities[label] = purity
    if not drawn:
        plt.close(fig)
        message_figure(stem, "ICM: complementary-label noise of the pairs drawn",
                       "no finished run logged a noise rate yet: train the runs first", stamp)
        return {}
    if analytic_applies:  # the formula assumes uniform CLs over balanced classes
        analytic = 100 * expected_mixup_noise(10, batch_size)
        ax_noise.axhline(analytic, color="k", linestyle=":", linewidth=1,
                         label=f"analytic, uniform partners: {analytic:.2f}%")
    ax_noise.set(xlabel="epoch", ylabel="pairs with CL noise (%)", ylim=(0, None),
                 title="CL noise of the pairs drawn (cl_i = y_j or cl_j = y_i)\nmean, band = min-max over seeds")
    ax_noise.legend(fontsize=8)
    if purities:
        labels = list(purities)
        for x, label in enumerate(labels):
            vals = 100 * np.asarray(purities[label])
            ax_purity.scatter(np.full(len(vals), x), vals, color=COLORS.get(label), zorder=3)
            ax_purity.bar(x, vals.mean(), color=COLORS.get(label), alpha=0.3)
        ax_purity.set_xticks(range(len(labels)), labels)
        ax_purity.set(ylim=(0, 100), ylabel="cluster purity (%)",
                      title="purity of the clusters\nICM paired in")
    else:
        ax_purity.set_axis_off()
    _stamp(fig, stamp)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, stem)
    return {label: float(d[1][-1]) for label, d in drawn.items()}


def noise_table(runs: list[tuple[str, Path]], out: Path, batch_size: int = 512, stamp: str = "",
                analytic_applies: bool = True) -> dict:
    """Spec §6's exact check as a markdown table: per arm, the share of all pairs drawn over every epoch and seed
    that carried CL noise, its 95% binomial interval, and the analytic rate of uniform partners beside it."""
    import math

    rows, analytic = {}, expected_mixup_noise(10, batch_size)
    for label, folder in runs:
        folder = Path(folder)
        if not (folder / "log.jsonl").is_file():
            continue
        for r in load_history(folder):
            stats = r.get("method_stats") or {}
            if "noise_rate" in stats and stats.get("pairs"):
                acc = rows.setdefault(label, {"noisy": 0.0, "pairs": 0.0, "seeds": set(), "purity": set()})
                acc["noisy"] += stats["noise_rate"] * stats["pairs"]
                acc["pairs"] += stats["pairs"]
                acc["seeds"].add(str(folder))
                acc["purity"].add(round(stats.get("cluster_purity", float("nan")), 4))
    lines = ["# ICM: complementary-label noise of the pairs drawn (spec §6)", "",
             f"{stamp}", "",
             ("A pair (i, j) is noisy when cl_i = y_j or cl_j = y_i (the official `count_error` test). Rates pool every "
              "epoch of every finished seed; the interval is the normal approximation to the binomial over all pairs "
              "(pairs within a batch share lam and are treated as independent)."),
             f"Analytic rate for uniform partners with replacement, uniform CLs, 10 balanced classes, batch "
             f"{batch_size}: (2/K - 1/(K(K-1))) (1 - 1/B) = **{100 * analytic:.2f}%**" + (
                 "." if analytic_applies else " — it does not apply to this experiment (imbalanced classes or "
                 "biased CLs), so the last column is n/a."), "",
             "| arm | seeds | pairs | noisy pairs (%) | 95% CI | cluster purity (%) | analytic in CI |",
             "|---|---|---|---|---|---|---|"]
    summary = {}
    for label, acc in rows.items():
        rate = acc["noisy"] / acc["pairs"]
        half = 1.96 * math.sqrt(rate * (1 - rate) / acc["pairs"])
        purity = ", ".join(f"{100 * v:.1f}" for v in sorted(acc["purity"]))
        inside = "yes" if rate - half <= analytic <= rate + half else "no"
        lines.append(f"| {label} | {len(acc['seeds'])} | {int(acc['pairs'])} | {100 * rate:.2f} | "
                     f"[{100 * (rate - half):.2f}, {100 * (rate + half):.2f}] | {purity} | "
                     f"{(inside if analytic_applies else 'n/a') if label == 'mixup' else '—'} |")
        summary[label] = rate
    if not rows:
        lines.append("| (no finished run logged a noise rate yet) | | | | | | |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return summary


def clusters_figure(config: Path, stem: Path, stamp: str, n_clusters: int = 6, per_cluster: int = 12,
                    seed: int = 0) -> dict:
    """A grid: `n_clusters` clusters of the config's training set (one row each: the largest, the purest, the
    least pure, ...), `per_cluster` random members each, with the cluster's size, majority class and purity."""
    from common.data import build_splits

    raw = read_yaml(config)
    data = raw.get("data") or {}
    train, _, _, info = build_splits(data["name"], root=data.get("root"), allow_download=False, split_seed=seed,
                                     options=data.get("options") or {})
    targets = train.targets.numpy()
    labels, ids = targets[:, 1], targets[:, 2]
    k = int(ids.max()) + 1
    table = np.zeros((k, info.num_classes), dtype=np.int64)
    np.add.at(table, (ids, labels), 1)
    sizes, purity = table.sum(1), table.max(1) / np.maximum(1, table.sum(1))
    order = np.argsort(-purity)
    chosen = list(dict.fromkeys([*order[: n_clusters // 2], *order[::-1][: n_clusters - n_clusters // 2]]))
    chosen = [c for c in chosen if sizes[c] > 0][:n_clusters]
    if not chosen:
        raise ReproError(f"{config}: the training set has no clusters to show.")
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(chosen), per_cluster, figsize=(per_cluster * 0.9, len(chosen) * 1.15 + 0.8),
                             squeeze=False)
    images = train.images.view(-1, 28, 28).numpy()
    names = info.classes or tuple(str(c) for c in range(info.num_classes))
    for row, c in enumerate(chosen):
        members = np.flatnonzero(ids == c)
        picks = rng.choice(members, size=min(per_cluster, len(members)), replace=False)
        for col in range(per_cluster):
            ax = axes[row, col]
            ax.set_axis_off()
            if col < len(picks):
                ax.imshow(images[picks[col]], cmap="gray")
                ax.set_title(names[labels[picks[col]]][:9], fontsize=6)
        axes[row, 0].text(-0.15, 0.5, f"cluster {c}\nn={sizes[c]}\n{names[table[c].argmax()][:10]}\n"
                          f"purity {100 * purity[c]:.0f}%", transform=axes[row, 0].transAxes, ha="right",
                          va="center", fontsize=7)
    overall = float(table.max(1).sum() / max(1, table.sum()))
    source = (data.get("options") or {}).get("clusters", "pca")
    fig.suptitle(f"{info.name}: {k} clusters from '{source}', overall purity {100 * overall:.1f}% "
                 f"(rows: the purest and the least pure clusters; titles: true class, never seen in training)",
                 fontsize=9)
    _stamp(fig, stamp)
    fig.tight_layout(rect=(0.08, 0.03, 1, 0.95))
    save_figure(fig, stem)
    return {"purity": overall, "clusters": k}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m papers.icm.figures")
    sub = parser.add_subparsers(dest="figure", required=True)
    n = sub.add_parser("noise")
    n.add_argument("--runs", nargs="+", type=labelled_run, required=True)
    n.add_argument("--batch-size", type=int, default=512)
    n.add_argument("--table", help="also write the noise table (markdown) here")
    n.add_argument("--no-analytic", action="store_true",
                   help="the experiment's classes are imbalanced or its CLs biased: no analytic rate")
    c = sub.add_parser("clusters")
    c.add_argument("--config", required=True)
    for p in (n, c):
        p.add_argument("--out", required=True)
        p.add_argument("--stamp", default="")
    args = parser.parse_args(argv)
    if args.figure == "noise":
        def both():
            if args.table:
                noise_table(args.runs, Path(args.table), args.batch_size, args.stamp, not args.no_analytic)
            return noise_figure(args.runs, Path(args.out), args.stamp, args.batch_size, not args.no_analytic)

        return exit_status(both)
    return exit_status(lambda: clusters_figure(Path(args.config), Path(args.out), args.stamp))


if __name__ == "__main__":
    sys.exit(main())
