"""Tables and the report index, built only from finished runs' ``metrics.json`` and ``paper_results.yaml``.

``python -m common.report table --paper P --scale S --table T``   -> reports/P/S/T.{md,csv,tex}
``python -m common.report curves --paper P --scale S --experiment E`` -> figures/P/S/curves_E.{png,pdf}
``python -m common.report examples --paper P --scale S``           -> figures/P/S/mixed_examples.{png,pdf}
``python -m common.report index``      -> reports/index.md, reports/claims.{md,csv}, figures/claims_forest.{png,pdf}
``python -m common.report forest --paper P --scale S``             -> figures/P/S/claims_forest.{png,pdf}
``python -m common.report counts``     -> prints the verdict counts of reports/claims.csv (the README's lines)

A run that has not finished is shown as missing, never as a number. The claims, intervals and verdicts are
defined in `common.claims`; this module reads the runs and writes them out.
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

from common import claims as claim_rules
from common.claims import higher_is_better  # noqa: F401  (kept importable from here)
from common.errors import ReproError, exit_status
from common.workflow import REPO_ROOT, SCALES, load_experiment, papers, runs

SCALE_NOTES = {
    "smoke": "smoke scale: a 1,000-image CIFAR-10 sample, a few CPU epochs; numbers are meaningless, only the "
    "pipeline is tested",
    "proxy": "proxy scale: the paper's comparison on a small dataset and budget; compare gains over the baseline",
    "paper": "paper scale: the paper's own setting",
}
MISSING = "missing"
VERDICT_SCALES = ("proxy", "paper")  # smoke numbers mean nothing: no verdicts, not in claims.md/csv


def paper_results(paper: str, root: Path = REPO_ROOT) -> dict:
    path = root / "papers" / paper / "paper_results.yaml"
    if not path.exists():
        raise ReproError(f"{path} is missing: every paper needs a paper_results.yaml (see papers/mixup/).")
    return yaml.safe_load(path.read_text())


def statistic_value(metrics: dict, statistic: str, metric: str) -> float | None:
    """One run's number for a table: `statistic` in median_last10 | best | final | selected | selected_val;
    `metric` may be 'error'."""
    primary = metrics.get("primary_metric", "top1")
    key = primary if metric == "error" else metric
    if statistic == "median_last10":
        value = metrics.get(f"median_last10_{key}")
    elif statistic in ("best", "final"):
        value = metrics.get(statistic, {}).get(key)
    elif statistic == "selected":  # test metrics of the epoch chosen on validation
        value = metrics.get("selected", {}).get("test", {}).get(key)
    elif statistic == "selected_val":  # the validation metric of that epoch (ICM: the official best test score)
        value = metrics.get("selected", {}).get("val", {}).get(key)
    else:
        raise ReproError(f"unknown table statistic {statistic!r}; use median_last10, best, final, selected or "
                         "selected_val.")
    if value is None:
        return None
    return 100.0 - value if metric == "error" else float(value)


def read_json(path: Path) -> dict:
    """A run's metrics.json or provenance.json as a dict; a corrupt file is one error line naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReproError(f"{path} is not valid JSON ({exc}); restore it (git checkout) or delete the run "
                         "folder and train the run again.") from exc
    if not isinstance(data, dict):
        raise ReproError(f"{path} holds a JSON {type(data).__name__}, not an object; restore it or retrain.")
    return data


def read_run_config(run_dir: Path) -> dict | None:
    """A run's resolved config.yaml (None when absent: such a run cannot be paired by seed)."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ReproError(f"{path} is not valid YAML ({exc}); restore it or retrain the run.") from exc
    return config if isinstance(config, dict) else None


@dataclass
class Cell:
    values: list = field(default_factory=list)
    expected: int = 0
    runs: list = field(default_factory=list)
    samples: list = field(default_factory=list)  # claim_rules.RunValue per run: seed, value, resolved config

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
        value = statistic_value(read_json(metrics_file), statistic, metric)
        seed = metrics_file.parent.name.removeprefix("seed")
        if value is not None and seed.isdigit():
            cell.values.append(value)
            cell.runs.append(str(metrics_file.parent))
            cell.samples.append(claim_rules.RunValue(int(seed), value, read_run_config(metrics_file.parent)))
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
    """Rows of one table: paper number, ours (mean ± std, n), difference, gains over the baseline, the 95%
    interval of our gain and the verdict on the paper's claim (`common.claims`)."""
    spec = paper_results(paper, root)
    tables = spec.get("tables", {})
    if table_id not in tables:
        raise ReproError(f"paper {paper!r} has no table {table_id!r}; tables: {', '.join(tables)}.")
    table = tables[table_id]
    metric, statistic = table["metric"], table["statistic"]
    sign = 1.0 if claim_rules.table_direction(table) else -1.0
    cells, rows = {}, []
    for row in table["rows"]:
        cells[(row["setting"], row["method"])] = collect(
            paper, scale, claim_rules.row_experiment(table, row), row["method"], statistic, metric, results, root)
    baseline = table.get("baseline")
    comparands = {(c.setting, c.method): c for c in claim_rules.table_comparands(
        table_id, table, f"papers/{paper}/paper_results.yaml table {table_id!r}")}
    for row in table["rows"]:
        cell = cells[(row["setting"], row["method"])]
        base_cell = cells.get((row["setting"], baseline))
        comparand = comparands.get((row["setting"], row["method"]))
        ours_gain = None
        if base_cell is not None and cell.values and base_cell.values and row["method"] != baseline:
            ours_gain = sign * (cell.mean - base_cell.mean)
        paper_gain = comparand.paper_gain if comparand is not None else None
        if row["method"] == baseline:
            interval = paired = verdict = "—"
        elif comparand is None:
            interval, paired, verdict = "—", "—", "no baseline in this setting"
        else:
            comparison = claim_rules.compare(cell.samples, base_cell.samples, comparand.higher_is_better)
            interval = interval_text(comparison, like=cell.mean)
            paired = PAIRED_TEXT[comparison.paired]
            verdict = verdict_text(claim_rules.judge(paper_gain, comparison, **comparand.expectation), comparand,
                                   scale)
        no_data = row.get("data_path") if not cell.values else None  # not staged here: paper_results data_path
        rows.append({
            "setting": row["setting"], "method": row["method"],
            # "—": the paper (or its benchmark) published no number for this row
            "paper": fmt(row.get("paper"), like=row.get("paper")) if row.get("paper") is not None else "—",
            "paper_verified": "yes" if row.get("verified") else "no",
            "ours": f"data not available ({no_data})" if no_data else cell.text(),
            "n": f"{len(cell.values)}/{cell.expected}",
            "delta": fmt(cell.mean - row["paper"] if cell.values and row.get("paper") is not None else None,
                         signed=True, like=row.get("paper")),
            "paper_gain": "baseline" if row["method"] == baseline else (
                comparand.words if comparand is not None and comparand.words and paper_gain is None
                else fmt(paper_gain, signed=True, like=row.get("paper"))),
            "ours_gain": fmt(ours_gain, signed=True, like=cell.mean) if row["method"] != baseline else "baseline",
            "interval": interval, "paired": paired,
            "verdict": "data not available" if no_data and verdict == "not run" else verdict,
        })
    return spec, table, rows


PAIRED_TEXT = {True: "by seed", False: "Welch", None: "—"}


def interval_text(comparison: claim_rules.Comparison, like=None) -> str:
    """`[low, high]` of our gain, or "—" without an interval (fewer than 2 runs in an arm)."""
    if comparison.low is None:
        return "—"
    return f"[{fmt(comparison.low, signed=True, like=like)}, {fmt(comparison.high, signed=True, like=like)}]"


def verdict_text(verdict: claim_rules.Verdict, comparand: claim_rules.Comparand, scale: str) -> str:
    if not comparand.is_claim:
        return "not a claim"
    if scale not in VERDICT_SCALES:
        return f"— ({scale}: no verdict)"
    if verdict.verdict == "inconclusive" and verdict.seeds_text:
        return f"inconclusive (needs {verdict.seeds_text} seeds)"
    return verdict.verdict


COLUMNS = [("setting", "setting"), ("method", "method"), ("paper", "paper"), ("paper_verified", "checked"),
           ("ours", "ours (mean ± std)"), ("n", "n seeds"), ("delta", "ours − paper"),
           ("paper_gain", "paper gain vs baseline"), ("ours_gain", "our gain vs baseline"),
           ("interval", "our gain, 95% CI"), ("paired", "paired"), ("verdict", "verdict")]


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
    better = "higher" if claim_rules.table_direction(table) else "lower"
    out = io.StringIO()
    out.write(f"{heading} {spec['title']} — {table['title']}\n\n")
    out.write(f"* **Paper:** {table.get('paper_setting', '')}\n")
    out.write(f"* **Ours:** {SCALE_NOTES[scale]}. {describe_runs(paper, scale, table, root)}. "
              f"Statistic: `{table['statistic']}` of each run, mean ± std over seeds; {better} is better.\n")
    out.write("* Gains are each method's improvement over the baseline of the same setting "
              "(positive = better); when the settings differ, compare gains, not absolute numbers.\n")
    out.write("* 95% CI of our gain: paired by seed when both arms ran the same seeds with configs that differ "
              "only in the method, else Welch. Verdicts (reproduced / not reproduced / inconclusive / too few "
              "runs / not run) follow the rules in `reports/claims.md` (`common/claims.py`).\n\n")
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


# ---------------------------------------------------------------------------------------------- claims
@dataclass(frozen=True)
class ClaimResult:
    """One claim of one paper judged at one scale."""

    paper: str
    scale: str
    claim: claim_rules.Comparand
    comparison: claim_rules.Comparison
    verdict: claim_rules.Verdict

    def csv_row(self) -> list[str]:
        c, comp = self.claim, self.comparison
        return [self.paper, self.scale, c.setting, c.method, c.baseline, c.metric,
                "true" if c.higher_is_better else "false", c.statistic,
                {True: "yes", False: "no", None: ""}[comp.paired], str(comp.n_method), str(comp.n_baseline),
                number(c.paper_gain), number(comp.gain), number(comp.low), number(comp.high),
                self.verdict.verdict, self.verdict.seeds_text]


def number(value: float | None) -> str:
    """A CSV number: 6 significant digits, empty when absent."""
    return "" if value is None else f"{value:.6g}"


def scales_with_runs(paper: str, results: Path) -> list[str]:
    """The verdict scales (proxy, paper; never smoke) at which `paper` has at least one finished run."""
    return [s for s in VERDICT_SCALES if next((results / paper / s).glob("*/*/seed*/metrics.json"), None)]


def judge_paper(paper: str, scale: str, results: Path, root: Path = REPO_ROOT) -> list[ClaimResult]:
    """Every claim of one paper judged from its runs at one scale (each arm's runs read once)."""
    cells = {}

    def cell(experiment, method, claim):
        key = (experiment, method, claim.statistic, claim.metric)
        if key not in cells:
            cells[key] = collect(paper, scale, experiment, method, claim.statistic, claim.metric, results, root)
        return cells[key]

    judged = []
    for claim in claim_rules.paper_claims(paper_results(paper, root), f"papers/{paper}/paper_results.yaml"):
        comparison = claim_rules.compare(cell(claim.method_experiment, claim.method, claim).samples,
                                         cell(claim.baseline_experiment, claim.baseline, claim).samples,
                                         claim.higher_is_better)
        verdict = claim_rules.judge(claim.paper_gain, comparison, **claim.expectation)
        if verdict.verdict == "not run" and None in (claim.method_experiment, claim.baseline_experiment):
            verdict = claim_rules.Verdict("not run", note="no experiment of ours (`experiment: null`)")
        judged.append(ClaimResult(paper, scale, claim, comparison, verdict))
    return judged


def evaluate_claims(results: Path, root: Path = REPO_ROOT) -> tuple[list[ClaimResult], dict[str, int]]:
    """Every claim of every paper at each verdict scale where that paper has finished runs, and, per paper
    without any such run, how many claims it has (all `not run`, not listed one by one)."""
    judged, unlisted = [], {}
    for paper in papers(root):
        scales = scales_with_runs(paper, results)
        if not scales:
            unlisted[paper] = len(claim_rules.paper_claims(paper_results(paper, root)))
        for scale in scales:
            judged += judge_paper(paper, scale, results, root)
    return judged, unlisted


def verdict_counts(judged: list[ClaimResult]) -> dict[str, dict[str, int]]:
    """scale -> verdict -> number of claims, every verdict present (zeros included)."""
    counts = {}
    for result in judged:
        counts.setdefault(result.scale, dict.fromkeys(claim_rules.VERDICTS, 0))[result.verdict.verdict] += 1
    return {scale: counts[scale] for scale in VERDICT_SCALES if scale in counts}


def counts_lines(counts: dict[str, dict[str, int]]) -> list[str]:
    """One markdown line per scale, e.g. '**proxy**: 2 reproduced · 1 not reproduced · ... (29 claims)'; the
    README's "What is reproduced" section carries these lines (a test checks them against claims.csv)."""
    return [f"**{scale}** scale: " + " · ".join(f"{n} {verdict}" for verdict, n in by_verdict.items())
            + f" ({sum(by_verdict.values())} claims)" for scale, by_verdict in counts.items()]


def counts_from_csv(path: Path) -> dict[str, dict[str, int]]:
    """`verdict_counts` of a written claims.csv (what the README's lines are checked against)."""
    if not path.exists():
        raise ReproError(f"{path} is missing; build it with `snakemake -c1 report`.")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    counts = {}
    for row in rows:
        counts.setdefault(row["scale"], dict.fromkeys(claim_rules.VERDICTS, 0))[row["verdict"]] += 1
    return {scale: counts[scale] for scale in VERDICT_SCALES if scale in counts}


def claims_summary(judged: list[ClaimResult], unlisted: dict[str, int], link_prefix: str = "") -> str:
    """The verdict counts per scale, the claims of papers without runs, and links (index and claims.md)."""
    out = io.StringIO()
    lines = counts_lines(verdict_counts(judged))
    if lines:
        out.write("Verdicts on the papers' claims, at the scales where a paper has runs:\n\n")
        out.write("".join(f"* {line}\n" for line in lines))
    else:
        out.write("No paper has finished runs at proxy or paper scale yet: no claim is judged.\n")
    if unlisted:
        out.write(f"* not run at any scale: {sum(unlisted.values())} claims of "
                  + ", ".join(f"{paper} ({n})" for paper, n in unlisted.items()) + "\n")
    out.write(f"\nEvery claim with its interval and verdict: [{link_prefix}claims.md]({link_prefix}claims.md) "
              f"([csv]({link_prefix}claims.csv)); the rules are in its first section.\n")
    return out.getvalue()


CLAIMS_RULES = """## How to read it

* **A claim** is a row of a table in `papers/<paper>/paper_results.yaml` that is not the table's baseline and
  shares its setting with a baseline row: "in this setting, the method beats (or trails) the baseline by the
  paper's gain". The paper's gain is the difference of the two printed numbers; every gain is signed so that
  positive = better than the baseline. Rows marked `claim: false` (our own variants, reference benchmarks) are
  not claims.
* **Our gain and its 95% interval** use the table's per-run statistic (`selected`, `final`, `best` or
  `median_last10`). *Paired by seed* when both arms ran the same seeds and each seed's two resolved configs
  differ only in the method (same split, initialisation and data order): a t interval of the per-seed
  differences. Otherwise *Welch*: the difference of the means with Welch-Satterthwaite degrees of freedom.
* **Verdicts** (closed intervals: a bound exactly at 0 contains 0):
  * `reproduced`: the interval excludes 0 on the side of the paper's gain;
  * `inconclusive`: the interval contains both 0 and the paper's gain;
  * `not reproduced`: otherwise: the interval excludes the paper's gain and shows no significant effect in the
    paper's direction (the note says when it is significantly the other way);
  * `too few runs`: fewer than 3 seeds in an arm; `not run`: no finished run of an arm;
  * `no paper gain`: the paper prints no number for the method or its baseline; our gain is shown, no verdict.
  * A paper gain of exactly 0 (a tie) has no side: `not reproduced` when we find a significant difference,
    `inconclusive` otherwise.
* **Seeds needed** (inconclusive claims): the smallest number of seeds per arm at which the interval, at the
  observed per-seed spread and the same pairing, would be narrower than |paper gain|, so that it could no
  longer contain both 0 and the paper's gain. A planning figure at the observed spread, not a power analysis.
* Smoke-scale runs are never judged (their numbers mean nothing). A paper is listed at the scales where it has
  finished runs; a paper without any is counted as not run.
"""

CLAIM_COLUMNS = ("table", "setting", "method vs baseline", "metric", "statistic", "n", "paper gain",
                 "our gain", "95% CI", "paired", "verdict", "seeds needed", "note")


def claim_markdown_row(result: ClaimResult) -> str:
    c, comp, v = result.claim, result.comparison, result.verdict
    like = c.paper_baseline if c.paper_baseline is not None else comp.gain
    cells = [f"`{c.table}`", c.setting, f"{c.method} vs {c.baseline}",
             f"{c.metric} ({'higher' if c.higher_is_better else 'lower'} is better)", c.statistic,
             f"{comp.n_method}/{comp.n_baseline}", fmt(c.paper_gain, signed=True, like=like) if c.paper_gain
             is not None else (c.words or "—"), fmt(comp.gain, signed=True, like=like) if comp.gain is not None else "—",
             interval_text(comp, like=like), PAIRED_TEXT[comp.paired], f"**{v.verdict}**", v.seeds_text, v.note]
    return "| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |\n"


def claims_markdown(judged: list[ClaimResult], unlisted: dict[str, int], root: Path = REPO_ROOT,
                    forest: str | None = None) -> str:
    out = io.StringIO()
    out.write("# Claims and verdicts\n\nBuilt by `snakemake report` from the finished runs under `results/` and "
              "the tables of `papers/*/paper_results.yaml` (`common/claims.py`); nothing here is typed by hand.\n\n")
    out.write(claims_summary(judged, unlisted).replace("[claims.md](claims.md) ", "this file "))
    if forest:
        out.write(f"\n![every judged claim: our gain relative to the paper's]({forest})\n")
    out.write("\n" + CLAIMS_RULES)
    header = "| " + " | ".join(CLAIM_COLUMNS) + " |\n|" + "---|" * len(CLAIM_COLUMNS) + "\n"
    for paper in dict.fromkeys(r.paper for r in judged):
        title = paper_results(paper, root)["title"]
        for scale in VERDICT_SCALES:
            mine = [r for r in judged if r.paper == paper and r.scale == scale]
            if not mine:
                continue
            out.write(f"\n## {paper} ({title}), {scale} scale\n\n")
            ran = [r for r in mine if r.verdict.verdict != "not run"]
            if ran:
                out.write(header + "".join(claim_markdown_row(r) for r in ran))
            not_run = [r for r in mine if r.verdict.verdict == "not run"]
            if not_run:
                out.write(f"\n<details><summary>{len(not_run)} claim{'s' * (len(not_run) != 1)} not run at this "
                          "scale</summary>\n\n"
                          + header + "".join(claim_markdown_row(r) for r in not_run) + "\n</details>\n")
    if unlisted:
        out.write("\n## Papers without runs at proxy or paper scale\n\nEvery claim of these papers is `not run`: "
                  "`snakemake reproduce_<paper> --config scale=proxy` makes the runs.\n\n| paper | claims |\n"
                  "|---|---|\n" + "".join(f"| {p} | {n} |\n" for p, n in unlisted.items()))
    return out.getvalue()


def write_claims(judged: list[ClaimResult], unlisted: dict[str, int], reports: Path, root: Path = REPO_ROOT,
                 forest: str | None = None) -> None:
    """reports/claims.csv (one row per judged claim, columns `claim_rules.CSV_COLUMNS`) and claims.md."""
    reports.mkdir(parents=True, exist_ok=True)
    with open(reports / "claims.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(claim_rules.CSV_COLUMNS)
        writer.writerows(result.csv_row() for result in judged)
    (reports / "claims.md").write_text(claims_markdown(judged, unlisted, root, forest))


def forest_entries(judged: list[ClaimResult], relative: bool) -> dict[str, list[dict]]:
    """Panels of a forest plot. Per paper (`relative=False`): one panel per table, gains in the metric's
    units. Across papers (`relative=True`): one panel, each gain divided by the paper's gain, so the paper's
    claim sits at 1 and "no effect" at 0 whatever the metric (claims without a paper gain are left out)."""
    panels = {}
    for r in judged:
        c, comp = r.claim, r.comparison
        if comp.gain is None or (relative and not c.paper_gain):
            continue
        scale = 1.0 / c.paper_gain if relative else 1.0
        low, high = (None, None) if comp.low is None else sorted((comp.low * scale, comp.high * scale))
        verdict = r.verdict.verdict + (f", needs {r.verdict.seeds_text} seeds" if r.verdict.seeds_text else "")
        if r.scale not in VERDICT_SCALES:
            verdict = f"{r.scale}: no verdict"
        label = f"{c.setting}: {c.method} vs {c.baseline}"
        if relative:
            label = f"{r.paper} {r.scale} · {c.table} · {label}"
        panel = "gain relative to the paper's gain" if relative else \
            f"{c.table}: {c.metric} ({'higher' if c.higher_is_better else 'lower'} is better)"
        panels.setdefault(panel, []).append({
            "label": f"{label} ({verdict}; n={comp.n_method}/{comp.n_baseline})", "gain": comp.gain * scale,
            "low": low, "high": high, "paper_gain": 1.0 if relative else c.paper_gain,
            "verdict": r.verdict.verdict if r.scale in VERDICT_SCALES else "no verdict"})
    return panels


# ----------------------------------------------------------------------------------------------- index
def finished_runs(results: Path) -> list[dict]:
    """Every finished run under `results/`, with its metrics and provenance."""
    found = []
    for metrics_file in sorted(results.glob("*/*/*/*/seed*/metrics.json")):
        paper, scale, experiment, method, seed = metrics_file.parent.relative_to(results).parts
        prov_file = metrics_file.parent / "provenance.json"
        prov = read_json(prov_file) if prov_file.exists() else {}
        found.append({"paper": paper, "scale": scale, "experiment": experiment, "method": method,
                      "seed": seed, "metrics": read_json(metrics_file), "provenance": prov})
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


def write_index(results: Path, reports: Path, figures: Path, root: Path = REPO_ROOT,
                claims: tuple[list[ClaimResult], dict[str, int]] | None = None) -> None:
    """reports/index.md: the verdict counts (and the cross-paper forest plot when drawn) first, then every
    paper's status, tables and figures, then the cross-paper comparison. `claims`: `evaluate_claims`'s
    result when the caller already has it."""
    found = finished_runs(results)
    judged, unlisted = claims if claims is not None else evaluate_claims(results, root)
    out = io.StringIO()
    out.write("# Reproduction status\n\nBuilt by `snakemake report` from the finished runs under `results/` "
              "(their `metrics.json` and `provenance.json`); nothing here is typed in by hand.\n\n")
    out.write("## Do the papers' claims hold?\n\n" + claims_summary(judged, unlisted))
    forest = figures / "claims_forest.png"
    if forest.exists():
        out.write(f"\n![every judged claim: our gain relative to the paper's gain, 95% interval]"
                  f"({Path('..') / forest.relative_to(figures.parent)})\n")
    out.write("\n## Runs\n\n")
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


def write_cross_forest(judged: list[ClaimResult], figures: Path) -> None:
    """figures/claims_forest.{png,pdf}: every judged claim of every paper, gains relative to the paper's."""
    from common.plots import plot_forest

    plot_forest(forest_entries(judged, relative=True), figures / "claims_forest",
                title="Every claim with runs: our gain / the paper's gain (1 = the paper's claim, 0 = no effect)",
                stamp="proxy and paper scales; bars: 95% intervals (paired by seed or Welch); common/claims.py",
                xlabel="our gain divided by the paper's gain", reference=1.0)


def write_paper_forest(paper: str, scale: str, results: Path, figures: Path, root: Path = REPO_ROOT) -> None:
    """figures/<paper>/<scale>/claims_forest.{png,pdf}: the paper's claims at one scale, in the metrics' units."""
    from common.plots import plot_forest

    judged = judge_paper(paper, scale, results, root)
    not_run = sum(r.verdict.verdict == "not run" for r in judged)
    stamp = SCALE_NOTES[scale] + ("; no verdicts at smoke scale" if scale not in VERDICT_SCALES else "")
    plot_forest(forest_entries(judged, relative=False), figures / paper / scale / "claims_forest",
                title=f"{paper}, {scale} scale: our gain over the baseline (dot, 95% interval) vs the paper's (diamond); "
                f"{not_run} of {len(judged)} claims not run",
                stamp=stamp, xlabel="gain over the baseline (positive = better)")


# ------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.report", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("table", "curves", "examples", "index", "forest", "counts"):
        p = sub.add_parser(name)
        p.add_argument("--results", default="results")
        p.add_argument("--reports", default="reports")
        p.add_argument("--figures", default="figures")
        if name not in ("index", "counts"):
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
        elif args.command == "counts":  # the README's "What is reproduced" lines, from reports/claims.csv
            print("".join(f"* {line}\n" for line in counts_lines(counts_from_csv(reports / "claims.csv"))), end="")
        elif args.command == "forest":
            write_paper_forest(args.paper, args.scale, results, figures)
        else:
            judged, unlisted = evaluate_claims(results)
            write_cross_forest(judged, figures)
            write_claims(judged, unlisted, reports, forest=f"../{figures.name}/claims_forest.png")
            write_index(results, reports, figures, claims=(judged, unlisted))

    return exit_status(command)


if __name__ == "__main__":
    sys.exit(main())
