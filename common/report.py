"""Tables and the report index, built only from finished runs' ``metrics.json`` and ``paper_results.yaml``.

``python -m common.report table --paper P --scale S --table T``   -> reports/P/S/T.{md,csv,tex}
``python -m common.report curves --paper P --scale S --experiment E`` -> figures/P/S/curves_E.{png,pdf}
``python -m common.report examples --paper P --scale S``           -> figures/P/S/mixed_examples.{png,pdf}
``python -m common.report index``                                   -> reports/index.md

A run that has not finished is shown as missing, never as a number.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common.errors import ReproError, exit_status
from common.workflow import REPO_ROOT, SCALES, load_experiment, papers, runs

SCALE_NOTES = {
    "smoke": "smoke scale: a 1,000-image CIFAR-10 sample, a few CPU epochs; numbers are meaningless, only the "
    "pipeline is tested",
    "proxy": "proxy scale: the paper's comparison on a small dataset and budget; compare gains over the baseline",
    "paper": "paper scale: the paper's own setting",
}
MISSING = "missing"


def paper_results(paper: str, root: Path = REPO_ROOT) -> dict:
    path = root / "papers" / paper / "paper_results.yaml"
    if not path.exists():
        raise ReproError(f"{path} is missing: every paper needs a paper_results.yaml (see papers/mixup/).")
    return yaml.safe_load(path.read_text())


def statistic_value(metrics: dict, statistic: str, metric: str) -> float | None:
    """One run's number for a table: `statistic` in median_last10 | best | final; `metric` may be 'error'."""
    primary = metrics.get("primary_metric", "top1")
    key = primary if metric == "error" else metric
    if statistic == "median_last10":
        value = metrics.get(f"median_last10_{key}")
    elif statistic in ("best", "final"):
        value = metrics.get(statistic, {}).get(key)
    elif statistic == "selected":  # test metrics of the epoch chosen on validation
        value = metrics.get("selected", {}).get("test", {}).get(key)
    else:
        raise ReproError(f"unknown table statistic {statistic!r}; use median_last10, best, final or selected.")
    if value is None:
        return None
    return 100.0 - value if metric == "error" else float(value)


def higher_is_better(metric: str) -> bool:
    """Accuracies and correlations go up; errors, losses and calibration errors go down."""
    return metric.removeprefix("ts_") in ("top1", "top5", "r")


@dataclass
class Cell:
    values: list = field(default_factory=list)
    expected: int = 0
    runs: list = field(default_factory=list)

    @property
    def mean(self):
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self):
        return statistics.stdev(self.values) if len(self.values) > 1 else (0.0 if self.values else None)

    def text(self) -> str:
        if not self.values:
            return MISSING
        return f"{fmt(self.mean, like=self.mean)} ± {fmt(self.std, like=self.mean)}"


def collect(paper: str, scale: str, experiment: str | None, method: str, statistic: str, metric: str,
            results: Path, root: Path = REPO_ROOT) -> Cell:
    """Every finished seed of one (experiment, method) at one scale."""
    cell = Cell()
    if experiment is None:
        return cell
    grid = [r for r in runs(paper, scale, root=root) if r.experiment == experiment and r.method == method] \
        if (root / "papers" / paper / "configs" / scale / f"{experiment}.yaml").exists() else []
    cell.expected = len(grid)
    for metrics_file in sorted((results / paper / scale / experiment / method).glob("seed*/metrics.json")):
        value = statistic_value(json.loads(metrics_file.read_text()), statistic, metric)
        if value is not None:
            cell.values.append(value)
            cell.runs.append(str(metrics_file.parent))
    return cell


def fmt(value, digits=2, signed=False, like=None) -> str:
    """Two decimals for numbers of magnitude >= 1 (accuracies, errors); more for small ones (0.0236)."""
    if value is None:
        return MISSING
    scale = abs(like) if like is not None else 1.0
    if 0 < scale < 1:
        digits = max(digits, 1 - math.floor(math.log10(scale)) + 2)  # three significant digits
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def build_table(paper: str, scale: str, table_id: str, results: Path, root: Path = REPO_ROOT):
    """Rows of one table: paper number, ours (mean ± std, n), difference, and gains over the baseline."""
    spec = paper_results(paper, root)
    tables = spec.get("tables", {})
    if table_id not in tables:
        raise ReproError(f"paper {paper!r} has no table {table_id!r}; tables: {', '.join(tables)}.")
    table = tables[table_id]
    metric, statistic = table["metric"], table["statistic"]
    sign = 1.0 if higher_is_better(metric) else -1.0
    cells, rows = {}, []
    for row in table["rows"]:
        experiment = row.get("experiment", table.get("experiment"))
        cells[(row["setting"], row["method"])] = collect(
            paper, scale, experiment, row["method"], statistic, metric, results, root)
    baseline = table.get("baseline")
    paper_base = {r["setting"]: r["paper"] for r in table["rows"] if r["method"] == baseline}
    for row in table["rows"]:
        cell = cells[(row["setting"], row["method"])]
        base_cell = cells.get((row["setting"], baseline))
        ours_gain = None
        if base_cell is not None and cell.values and base_cell.values and row["method"] != baseline:
            ours_gain = sign * (cell.mean - base_cell.mean)
        paper_gain = None
        if row["setting"] in paper_base and row["method"] != baseline and row.get("paper") is not None:
            paper_gain = sign * (row["paper"] - paper_base[row["setting"]])
        rows.append({
            "setting": row["setting"], "method": row["method"],
            # "—": the paper (or its benchmark) published no number for this row
            "paper": fmt(row.get("paper"), like=row.get("paper")) if row.get("paper") is not None else "—",
            "paper_verified": "yes" if row.get("verified") else "no",
            "ours": cell.text(), "n": f"{len(cell.values)}/{cell.expected}",
            "delta": fmt(cell.mean - row["paper"] if cell.values and row.get("paper") is not None else None,
                         signed=True, like=row.get("paper")),
            "paper_gain": fmt(paper_gain, signed=True, like=row.get("paper")) if row["method"] != baseline
            else "baseline",
            "ours_gain": fmt(ours_gain, signed=True, like=cell.mean) if row["method"] != baseline else "baseline",
        })
    return spec, table, rows


COLUMNS = [("setting", "setting"), ("method", "method"), ("paper", "paper"), ("paper_verified", "checked"),
           ("ours", "ours (mean ± std)"), ("n", "n seeds"), ("delta", "ours − paper"),
           ("paper_gain", "paper gain vs baseline"), ("ours_gain", "our gain vs baseline")]


def describe_runs(paper: str, scale: str, table: dict, root: Path = REPO_ROOT) -> str:
    """Our side of the comparison, read from the configs of the experiments the table uses."""
    names = sorted({r.get("experiment", table.get("experiment")) for r in table["rows"]} - {None})
    parts = []
    for name in names:
        path = root / "papers" / paper / "configs" / scale / f"{name}.yaml"
        if not path.exists():
            parts.append(f"`{name}`: no {scale} config")
            continue
        cfg = load_experiment(paper, scale, name, root)
        data = cfg.get("data", {}).get("name", "?")
        if data == "cifar10":
            data = "CIFAR-10 (JPEG copy)"
        model = cfg.get("model", {}).get("name", "?")
        epochs = cfg.get("train", {}).get("epochs", "?")
        parts.append(f"`{name}`: {data}, {model}, {epochs} epochs")
    return "; ".join(parts)


def table_markdown(paper: str, scale: str, table_id: str, results: Path, root: Path = REPO_ROOT,
                   heading: str = "#") -> str:
    spec, table, rows = build_table(paper, scale, table_id, results, root)
    better = "higher" if higher_is_better(table["metric"]) else "lower"
    out = io.StringIO()
    out.write(f"{heading} {spec['title']} — {table['title']}\n\n")
    out.write(f"* **Paper:** {table.get('paper_setting', '')}\n")
    out.write(f"* **Ours:** {SCALE_NOTES[scale]}. {describe_runs(paper, scale, table, root)}. "
              f"Statistic: `{table['statistic']}` of each run, mean ± std over seeds; {better} is better.\n")
    out.write("* Gains are each method's improvement over the baseline of the same setting "
              "(positive = better); when the settings differ, compare gains, not absolute numbers.\n\n")
    out.write("| " + " | ".join(title for _, title in COLUMNS) + " |\n")
    out.write("|" + "---|" * len(COLUMNS) + "\n")
    for row in rows:
        out.write("| " + " | ".join(str(row[key]) for key, _ in COLUMNS) + " |\n")
    return out.getvalue()


def write_table(paper: str, scale: str, table_id: str, results: Path, out_dir: Path, root: Path = REPO_ROOT):
    spec, table, rows = build_table(paper, scale, table_id, results, root)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{table_id}.md").write_text(table_markdown(paper, scale, table_id, results, root))
    with open(out_dir / f"{table_id}.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["scale", *[key for key, _ in COLUMNS]])
        for row in rows:
            writer.writerow([scale, *[row[key] for key, _ in COLUMNS]])
    tex = io.StringIO()
    tex.write(f"% {spec['title']} -- {table['title']}; ours at {scale} scale. Generated by common.report.\n")
    tex.write("\\begin{tabular}{" + "l" * 2 + "r" * (len(COLUMNS) - 2) + "}\n\\hline\n")
    tex.write(" & ".join(latex(title) for _, title in COLUMNS) + " \\\\\n\\hline\n")
    for row in rows:
        tex.write(" & ".join(latex(str(row[key])) for key, _ in COLUMNS) + " \\\\\n")
    tex.write("\\hline\n\\end{tabular}\n")
    (out_dir / f"{table_id}.tex").write_text(tex.getvalue())


def latex(text: str) -> str:
    return (text.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%")
            .replace("&", "\\&").replace("#", "\\#").replace("±", "$\\pm$").replace("−", "$-$"))


# ----------------------------------------------------------------------------------------------- index
def finished_runs(results: Path) -> list[dict]:
    """Every finished run under `results/`, with its metrics and provenance."""
    found = []
    for metrics_file in sorted(results.glob("*/*/*/*/seed*/metrics.json")):
        paper, scale, experiment, method, seed = metrics_file.parent.relative_to(results).parts
        prov_file = metrics_file.parent / "provenance.json"
        prov = json.loads(prov_file.read_text()) if prov_file.exists() else {}
        found.append({"paper": paper, "scale": scale, "experiment": experiment, "method": method,
                      "seed": seed, "metrics": json.loads(metrics_file.read_text()), "provenance": prov})
    return found


def cross_paper(found: list[dict]) -> str:
    """All methods run on the same (scale, dataset, backbone, epochs), side by side, with gain over ERM."""
    groups = defaultdict(lambda: defaultdict(list))
    for run in found:
        m = run["metrics"]
        if m.get("task") != "classification":
            continue
        key = (run["scale"], m.get("dataset"), m.get("model"), m.get("epochs"))
        groups[key][(run["paper"], run["method"])].append(m["final"]["top1"])
    if not groups:
        return "No finished classification runs yet.\n"
    out = io.StringIO()
    for (scale, dataset, model, epochs), methods in sorted(groups.items(), key=str):
        erm = [v for (paper, method), vals in methods.items() if method == "erm" for v in vals]
        erm_mean = statistics.fmean(erm) if erm else None
        out.write(f"\n**{scale} · {dataset} · {model} · {epochs} epochs** (final top-1 %, mean ± std over seeds; "
                  "ERM pooled over papers)\n\n| paper | method | top-1 | n | gain over ERM |\n|---|---|---|---|---|\n")
        for (paper, method), vals in sorted(methods.items()):
            mean = statistics.fmean(vals)
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            gain = fmt(mean - erm_mean, signed=True) if erm_mean is not None and method != "erm" else "—"
            out.write(f"| {paper} | {method} | {mean:.2f} ± {std:.2f} | {len(vals)} | {gain} |\n")
    return out.getvalue()


def write_index(results: Path, reports: Path, figures: Path, root: Path = REPO_ROOT) -> None:
    found = finished_runs(results)
    out = io.StringIO()
    out.write("# Reproduction status\n\nBuilt by `snakemake report` from the finished runs under `results/` "
              "(their `metrics.json` and `provenance.json`); nothing here is typed in by hand.\n\n")
    out.write("| paper | scale | finished runs | expected | GPU hours | CPU hours |\n|---|---|---|---|---|---|\n")
    for paper in papers(root):
        for scale in SCALES:
            mine = [r for r in found if r["paper"] == paper and r["scale"] == scale]
            expected = len(runs(paper, scale, root=root))
            gpu = sum(r["provenance"].get("wall_time_s", 0) * r["provenance"].get("device_count", 1)
                      for r in mine if r["provenance"].get("device_type") == "cuda") / 3600
            cpu = sum(r["provenance"].get("wall_time_s", 0) for r in mine
                      if r["provenance"].get("device_type") != "cuda") / 3600
            out.write(f"| {paper} | {scale} | {len(mine)} | {expected} | {gpu:.2f} | {cpu:.2f} |\n")
    for paper in papers(root):
        spec = paper_results(paper, root)
        out.write(f"\n## {paper}: {spec['title']}\n\n")
        if not any(r["paper"] == paper for r in found):
            out.write(f"No finished runs yet: `snakemake reproduce_{paper} --config scale=<scale>` makes them.\n")
        for scale in SCALES:
            if not any(r["paper"] == paper and r["scale"] == scale for r in found):
                continue
            out.write(f"\n### {scale} scale\n\n")
            for table_id in spec.get("tables", {}):
                out.write(table_markdown(paper, scale, table_id, results, root, heading="####") + "\n")
            pngs = sorted((figures / paper / scale).glob("*.png"))
            if pngs:
                out.write("Figures: " + ", ".join(
                    f"[{p.stem}]({Path('..') / p.relative_to(figures.parent)})" for p in pngs) + "\n")
    out.write("\n## Cross-paper comparison\n" + cross_paper(found))
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "index.md").write_text(out.getvalue())


# ------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.report", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("table", "curves", "examples", "index"):
        p = sub.add_parser(name)
        p.add_argument("--results", default="results")
        p.add_argument("--reports", default="reports")
        p.add_argument("--figures", default="figures")
        if name != "index":
            p.add_argument("--paper", required=True)
            p.add_argument("--scale", required=True)
        if name == "table":
            p.add_argument("--table", required=True)
        if name == "curves":
            p.add_argument("--experiment", required=True)
    args = parser.parse_args(argv)
    results, reports, figures = Path(args.results), Path(args.reports), Path(args.figures)

    def command():
        if args.command == "table":
            write_table(args.paper, args.scale, args.table, results, reports / args.paper / args.scale)
        elif args.command == "curves":
            from common.plots import plot_curves

            cfg = load_experiment(args.paper, args.scale, args.experiment)
            groups = {m: sorted(p.parent for p in (results / args.paper / args.scale / args.experiment / m)
                                .glob("seed*/metrics.json")) for m in cfg.get("methods", {})}
            plot_curves(groups, figures / args.paper / args.scale / f"curves_{args.experiment}",
                        title=f"{args.paper}: {args.experiment} — test accuracy per epoch",
                        stamp=SCALE_NOTES[args.scale])
        elif args.command == "examples":
            from common.plots import plot_mixed_examples

            methods = {}
            for run in runs(args.paper, args.scale):
                cfg = load_experiment(args.paper, args.scale, run.experiment)
                options = dict(cfg["methods"][run.method] or {})
                options.setdefault("name", run.method)
                methods.setdefault(run.method, options)
            plot_mixed_examples(methods, figures / args.paper / args.scale / "mixed_examples",
                                title=f"{args.paper}: mixed training images (one batch, seed 0)",
                                stamp=SCALE_NOTES[args.scale])
        else:
            write_index(results, reports, figures)

    return exit_status(command)


if __name__ == "__main__":
    sys.exit(main())
