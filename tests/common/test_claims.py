"""Claims and verdicts: the t quantile against printed tables, paired vs Welch intervals by hand, every verdict
on synthetic run folders (ties, zero variance, a single seed), claims derived from every paper's yaml, the
claims.csv/md writers, the forest plot, a corrupt metrics.json, and the README's counts."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from common import claims as rules
from common import plots, report
from common.errors import ReproError
from common.workflow import papers

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------- Student t
@pytest.mark.parametrize("p, df, printed", [
    (0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 4, 2.776), (0.975, 9, 2.262), (0.975, 19, 2.093),
    (0.975, 30, 2.042), (0.95, 10, 1.812), (0.995, 4, 4.604), (0.995, 60, 2.660), (0.975, math.inf, 1.960),
])
def test_t_quantile_matches_printed_tables(p, df, printed):
    assert rules.t_quantile(p, df) == pytest.approx(printed, abs=6e-4)
    assert rules.t_quantile(1 - p, df) == pytest.approx(-printed, abs=6e-4)  # symmetric


@pytest.mark.parametrize("df", [1.7, 3.99, 7.5, 23.2])
def test_t_cdf_of_real_df_matches_integrated_density(df):
    # Welch's df is not an integer: check the CDF against a direct numerical integration of the t density
    x = np.linspace(0.0, 2.5, 200_001)
    density = np.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) \
        * (1 + x**2 / df) ** (-(df + 1) / 2)
    integral = float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(x)))
    assert rules.t_cdf(2.5, df) == pytest.approx(0.5 + integral, abs=1e-8)
    assert rules.t_cdf(rules.t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-12)


def test_t_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError):
        rules.t_quantile(1.0, 4)
    with pytest.raises(ValueError):
        rules.t_quantile(0.975, 0)


# ----------------------------------------------------------------------------------------- intervals
CONFIG = {"paper": "toy", "experiment": "exp", "seed": 0, "data": {"name": "airfoil", "split_seed": None},
          "method": {"name": "erm"}}


def arm(values, method="erm", config=True, **changes):
    """RunValues for seeds 0, 1, ... whose configs differ only in the method (plus `changes`)."""
    out = []
    for seed, value in enumerate(values):
        cfg = None
        if config:
            cfg = {**CONFIG, "seed": seed, "method": {"name": method}, **changes}
        out.append(rules.RunValue(seed, value, cfg))
    return out


def test_paired_and_welch_intervals_by_hand():
    # baseline 10, 12, 14 and method 15, 11, 13 by seed: same means and SDs (2), different pairing
    base, method = arm([10.0, 12.0, 14.0]), arm([15.0, 11.0, 13.0], "mixup")
    paired = rules.compare(method, base, higher_better=True)
    # differences 5, -1, -1: mean 1, sd sqrt(12), se 2, t(0.975, 2) = 4.303 -> 1 ± 8.606
    assert paired.paired is True and paired.gain == pytest.approx(1.0)
    assert paired.low == pytest.approx(1 - 4.303 * 2, abs=2e-3)
    assert paired.high == pytest.approx(1 + 4.303 * 2, abs=2e-3)
    # unpaired (one run lacks its config): se = sqrt(4/3 + 4/3) = 1.633, Welch df = 4, t = 2.776 -> 1 ± 4.533
    welch = rules.compare(method, arm([10.0, 12.0, 14.0], config=False), higher_better=True)
    assert welch.paired is False and welch.gain == pytest.approx(1.0)
    assert welch.low == pytest.approx(1 - 2.776 * math.sqrt(8 / 3), abs=2e-3)
    assert welch.high == pytest.approx(1 + 2.776 * math.sqrt(8 / 3), abs=2e-3)


def test_welch_degrees_of_freedom_for_unequal_spreads():
    # a: 11, 14, 15 (var 13/3), b: 10, 12, 14 (var 4); se^2 = 25/9, df = (25/9)^2 / ((13/9)^2/2 + (4/3)^2/2)
    comparison = rules.compare(arm([11.0, 14.0, 15.0], config=False), arm([10.0, 12.0, 14.0], config=False), True)
    df = (25 / 9) ** 2 / ((13 / 9) ** 2 / 2 + (4 / 3) ** 2 / 2)
    assert df == pytest.approx(3.9936, abs=1e-4)
    half = rules.t_quantile(0.975, df) * 5 / 3
    assert comparison.low == pytest.approx(4 / 3 - half) and comparison.high == pytest.approx(4 / 3 + half)


def test_lower_is_better_flips_the_sign_of_the_gain():
    comparison = rules.compare(arm([2.5, 2.6, 2.7], "cmixup"), arm([3.0, 3.0, 3.3]), higher_better=False)
    assert comparison.gain == pytest.approx(np.mean([3.0, 3.0, 3.3]) - np.mean([2.5, 2.6, 2.7]))
    assert comparison.low > 0  # lower RMSE = positive gain


def test_pairing_needs_same_seeds_and_configs_that_differ_only_in_the_method():
    base = arm([1.0, 2.0, 3.0])
    assert rules.pairable(arm([1.0, 2.0, 3.0], "mixup"), base)
    assert not rules.pairable(arm([1.0, 2.0, 3.0], "mixup", data={"name": "airfoil", "split_seed": 7}), base)
    assert not rules.pairable(arm([1.0, 2.0, 3.0], "mixup", experiment="other"), base)
    assert not rules.pairable(arm([1.0, 2.0], "mixup"), base)  # seed 2 has no partner
    assert not rules.pairable(arm([1.0, 2.0, 3.0], "mixup", config=False), base)
    shifted = [rules.RunValue(r.seed + 1, r.value, {**r.config, "seed": r.seed + 1}) for r in arm([1.0] * 3)]
    assert not rules.pairable(shifted, base)


def test_seeds_needed_is_the_first_n_whose_interval_is_narrower_than_the_paper_gain():
    comparison = rules.compare(arm([1.0, -1.0, 0.5], "m"), arm([0.0, 0.0, 0.0]), True)  # paired, sd of diffs
    (sd,) = comparison.spread
    assert sd == pytest.approx(np.std([1.0, -1.0, 0.5], ddof=1))
    needed = rules.seeds_needed(comparison, 0.5)
    width = [2 * rules.t_quantile(0.975, n - 1) * sd / math.sqrt(n) for n in range(2, 200)]
    assert needed == next(n for n, w in zip(range(2, 200), width) if w < 0.5)
    assert width[needed - 3] >= 0.5  # one seed fewer is not enough
    welch = rules.compare(arm([1.0, -1.0, 0.5], "m", config=False), arm([0.2, 0.0, -0.3]), True)
    sd_m, sd_b = welch.spread
    needed = rules.seeds_needed(welch, 0.5)
    assert 2 * rules.welch_half_width(sd_m, needed, sd_b, needed) < 0.5
    assert 2 * rules.welch_half_width(sd_m, needed - 1, sd_b, needed - 1) >= 0.5
    assert rules.seeds_needed(comparison, 1e-6) == rules.SEEDS_CAP + 1
    assert rules.Verdict("inconclusive", rules.SEEDS_CAP + 1).seeds_text == f">{rules.SEEDS_CAP}"
    assert rules.seeds_needed(comparison, 0.0) is None  # a tie can never be separated from 0


@pytest.mark.parametrize("low, high, paper_gain, verdict", [
    (0.0, 2.0, 1.0, "inconclusive"),  # a bound exactly at 0 contains 0 (closed interval): not reproduced yet
    (1e-12, 2.0, 1.0, "reproduced"),
    (-2.0, 0.0, -1.0, "inconclusive"),
    (-2.0, -1e-12, -1.0, "reproduced"),
    (-1.0, 0.999, 1.0, "not reproduced"),  # the paper's gain just outside
    (-1.0, 1.0, 1.0, "inconclusive"),  # ... and exactly on the bound
    (0.5, 0.5, 1.0, "reproduced"),  # zero width on the paper's side
    (0.0, 0.0, 1.0, "not reproduced"),  # zero width at 0
    (-0.5, 0.5, 0.0, "inconclusive"),  # a tie in the paper
    (0.1, 0.5, 0.0, "not reproduced"),
])
def test_verdict_boundaries(low, high, paper_gain, verdict):
    comparison = rules.Comparison(5, 5, True, (low + high) / 2, low, high, (0.1,))
    assert rules.judge(paper_gain, comparison).verdict == verdict


# ------------------------------------------------------------------------------- synthetic run folders
TOY_TABLES = {
    "acc": {
        "title": "toy accuracy", "metric": "top1", "statistic": "final", "experiment": "exp", "baseline": "erm",
        "rows": [],
    },
    "rmse": {
        "title": "toy rmse", "metric": "rmse", "statistic": "selected", "experiment": "exp", "baseline": "erm",
        "rows": [{"setting": "reg", "method": "erm", "paper": 3.0}, {"setting": "reg", "method": "cm", "paper": 2.8}],
    },
}
# setting -> (paper erm, paper method, our erm per seed, our method per seed, expected verdict)
CASES = {
    "reproduced": (90.0, 91.0, [90.0, 91.0, 92.0], [91.5, 93.0, 93.6], "reproduced"),
    "other way": (90.0, 91.0, [90.0, 91.0, 92.0], [88.0, 88.5, 90.5], "not reproduced"),
    "no effect": (90.0, 91.0, [90.0, 91.0, 92.0], [90.1, 90.9, 92.0], "not reproduced"),
    "inconclusive": (90.0, 90.5, [90.0, 91.0, 92.0], [91.0, 90.0, 92.5], "inconclusive"),
    "two seeds": (90.0, 91.0, [90.0, 91.0], [92.0, 93.0], "too few runs"),
    "one seed": (90.0, 91.0, [90.0], [92.0], "too few runs"),
    "no paper number": (90.0, None, [90.0, 91.0, 92.0], [91.5, 93.0, 93.6], "no paper gain"),
    "paper tie, ours tie": (90.0, 90.0, [90.0, 91.0, 92.0], [90.1, 90.9, 92.0], "inconclusive"),
    "paper tie, ours differ": (90.0, 90.0, [90.0, 91.0, 92.0], [92.0, 93.0, 94.1], "not reproduced"),
    "zero variance, equal": (90.0, 91.0, [90.0, 91.0, 92.0], [90.0, 91.0, 92.0], "not reproduced"),
    "zero variance, gain": (90.0, 91.0, [90.0, 91.0, 92.0], [92.0, 93.0, 94.0], "reproduced"),
}


def write_toy_run(results, experiment, method, seed, value, metric="top1", **config_changes):
    folder = results / "toy" / "proxy" / experiment / method / f"seed{seed}"
    folder.mkdir(parents=True)
    metrics = {"task": "regression" if metric == "rmse" else "classification", "primary_metric": metric,
               "final": {metric: value}, "selected": {"test": {metric: value}}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    config = {**CONFIG, "experiment": experiment, "seed": seed, "method": {"name": method}, **config_changes}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture
def toy_repo(tmp_path):
    """A repository root with one paper `toy` whose table has one setting per verdict case, and its runs."""
    tables = json.loads(json.dumps(TOY_TABLES))
    results = tmp_path / "results"
    for case, (paper_erm, paper_m, ours_erm, ours_m, _) in CASES.items():
        # each case its own experiment (own runs), both arms in it
        experiment = "exp_" + case.replace(" ", "_").replace(",", "")
        tables["acc"]["rows"] += [{"setting": case, "method": "erm", "paper": paper_erm, "experiment": experiment},
                                  {"setting": case, "method": "m", "paper": paper_m, "experiment": experiment}]
        for seed, value in enumerate(ours_erm):
            write_toy_run(results, experiment, "erm", seed, value)
        for seed, value in enumerate(ours_m):
            write_toy_run(results, experiment, "m", seed, value)
    tables["acc"]["rows"] += [
        {"setting": "not run", "method": "erm", "paper": 90.0, "experiment": None},
        {"setting": "not run", "method": "m", "paper": 91.0, "experiment": None},
        {"setting": "welch", "method": "erm", "paper": 90.0, "experiment": "exp_welch"},
        {"setting": "welch", "method": "m", "paper": 91.0, "experiment": "exp_welch"},
        {"setting": "welch", "method": "variant", "paper": None, "experiment": "exp_welch", "claim": False},
        {"setting": "no baseline here", "method": "m", "paper": 95.0, "experiment": None},
    ]
    for seed, (b, m) in enumerate([(90.0, 94.0), (91.0, 95.0), (92.0, 96.2)]):
        write_toy_run(results, "exp_welch", "erm", seed, b)
        write_toy_run(results, "exp_welch", "m", seed, m, data={"name": "airfoil", "split_seed": 3})
    for seed, (b, m) in enumerate([(3.0, 2.75), (3.1, 2.85), (3.2, 2.9)]):
        write_toy_run(results, "exp", "erm", seed, b, metric="rmse")
        write_toy_run(results, "exp", "cm", seed, m, metric="rmse")
    paper_dir = tmp_path / "papers" / "toy"
    (paper_dir / "configs" / "proxy").mkdir(parents=True)
    (paper_dir / "workflow.smk").write_text("")
    (paper_dir / "paper_results.yaml").write_text(yaml.safe_dump(
        {"paper": "toy", "title": "Toy paper", "tables": tables}, sort_keys=False))
    return tmp_path


def test_every_verdict_on_synthetic_run_folders(toy_repo):
    judged = report.judge_paper("toy", "proxy", toy_repo / "results", root=toy_repo)
    by_setting = {(r.claim.table, r.claim.setting): r for r in judged}
    for case, (*_, expected) in CASES.items():
        assert by_setting[("acc", case)].verdict.verdict == expected, case
    assert {r.verdict.verdict for r in judged} == set(rules.VERDICTS)
    assert by_setting[("acc", "not run")].verdict.verdict == "not run"
    assert "experiment: null" in by_setting[("acc", "not run")].verdict.note
    other_way = by_setting[("acc", "other way")]
    assert "other way" in other_way.verdict.note and other_way.comparison.high < 0
    one = by_setting[("acc", "one seed")].comparison
    assert one.gain == pytest.approx(2.0) and one.low is None and one.high is None  # gain shown, no interval
    zero = by_setting[("acc", "zero variance, gain")].comparison
    assert zero.paired and zero.low == zero.high == pytest.approx(2.0)
    inconclusive = by_setting[("acc", "inconclusive")]
    assert inconclusive.verdict.seeds_needed == rules.seeds_needed(inconclusive.comparison, 0.5) > 3
    assert by_setting[("acc", "paper tie, ours tie")].verdict.seeds_needed is None
    welch = by_setting[("acc", "welch")].comparison
    assert welch.paired is False and by_setting[("acc", "welch")].verdict.verdict == "reproduced"
    assert by_setting[("acc", "reproduced")].comparison.paired is True
    rmse = by_setting[("rmse", "reg")]  # lower is better: 0.2 lower RMSE is a gain of +0.2
    assert rmse.claim.paper_gain == pytest.approx(0.2) and rmse.comparison.gain == pytest.approx(0.2666667)
    assert rmse.verdict.verdict == "reproduced"
    assert ("acc", "no baseline here") not in by_setting
    assert not any(r.claim.method == "variant" for r in judged)  # claim: false


def test_table_gains_interval_paired_and_verdict_columns(toy_repo):
    _, _, rows = report.build_table("toy", "proxy", "acc", toy_repo / "results", root=toy_repo)
    row = {(r["setting"], r["method"]): r for r in rows}
    assert row[("reproduced", "m")]["verdict"] == "reproduced" and row[("reproduced", "m")]["paired"] == "by seed"
    assert row[("welch", "m")]["paired"] == "Welch"
    assert row[("inconclusive", "m")]["verdict"].startswith("inconclusive (needs ")
    assert row[("zero variance, gain", "m")]["interval"] == "[+2.00, +2.00]"
    assert row[("one seed", "m")]["interval"] == "—" and row[("one seed", "m")]["verdict"] == "too few runs"
    assert row[("welch", "variant")]["verdict"] == "not a claim"
    assert row[("no baseline here", "m")]["verdict"] == "no baseline in this setting"
    assert row[("reproduced", "erm")]["verdict"] == "—"


def test_claims_csv_and_md_from_run_folders(toy_repo):
    judged, unlisted = report.evaluate_claims(toy_repo / "results", root=toy_repo)
    assert unlisted == {} and all(r.paper == "toy" and r.scale == "proxy" for r in judged)
    out = toy_repo / "reports"
    report.write_claims(judged, unlisted, out, root=toy_repo)
    with open(out / "claims.csv", newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0] == list(rules.CSV_COLUMNS) == [
        "paper", "scale", "setting", "method", "baseline", "metric", "higher_is_better", "statistic", "paired",
        "n_method", "n_baseline", "paper_gain", "our_gain", "ci_low", "ci_high", "verdict", "seeds_needed"]
    rows = {row[2]: dict(zip(table[0], row)) for row in table[1:]}
    assert len(table) - 1 == len(judged)
    rep = rows["reproduced"]
    assert rep["paired"] == "yes" and rep["paper_gain"] == "1" and rep["verdict"] == "reproduced"
    assert float(rep["our_gain"]) == pytest.approx(np.mean([1.5, 2.0, 1.6]))
    assert float(rep["ci_low"]) > 0 and rep["higher_is_better"] == "true"
    assert rows["reg"]["higher_is_better"] == "false" and float(rows["reg"]["our_gain"]) > 0
    assert rows["one seed"]["ci_low"] == "" and rows["one seed"]["verdict"] == "too few runs"
    assert rows["not run"]["our_gain"] == "" and rows["not run"]["paired"] == ""
    assert int(rows["inconclusive"]["seeds_needed"]) > 3
    md = (out / "claims.md").read_text()
    assert "**proxy** scale: 4 reproduced · 4 not reproduced · 2 inconclusive · 2 too few runs · 1 not run · " \
           "1 no paper gain (14 claims)" in md
    assert "## How to read it" in md and "significantly the other way" in md
    assert "1 claim not run at this scale" in md


def test_papers_without_runs_are_counted_not_listed(toy_repo):
    judged, unlisted = report.evaluate_claims(toy_repo / "elsewhere", root=toy_repo)
    assert judged == [] and unlisted == {"toy": 14}
    text = report.claims_summary(judged, unlisted)
    assert "No paper has finished runs" in text and "toy (14)" in text


def test_smoke_runs_are_never_judged(toy_repo):
    smoke = toy_repo / "results" / "toy" / "smoke"
    (toy_repo / "results" / "toy" / "proxy").rename(smoke)
    judged, unlisted = report.evaluate_claims(toy_repo / "results", root=toy_repo)
    assert judged == [] and unlisted == {"toy": 14}
    _, _, rows = report.build_table("toy", "smoke", "acc", toy_repo / "results", root=toy_repo)
    assert {r["verdict"] for r in rows if r["method"] == "m" and r["setting"] == "reproduced"} == {
        "— (smoke: no verdict)"}


# ------------------------------------------------------------------------------------ claims derivation
def test_claims_come_from_the_tables_with_signed_paper_gains():
    table = {"metric": "error", "statistic": "best", "baseline": "erm", "rows": [
        {"setting": "a", "method": "erm", "paper": 5.0}, {"setting": "a", "method": "mixup", "paper": 4.0},
        {"setting": "a", "method": "ours", "paper": None, "claim": False},
        {"setting": "b", "method": "mixup", "paper": 3.0}]}
    comparands = rules.table_comparands("t", table)
    assert [(c.setting, c.method, c.is_claim) for c in comparands] == [("a", "mixup", True), ("a", "ours", False)]
    assert comparands[0].paper_gain == pytest.approx(1.0) and comparands[0].higher_is_better is False
    assert rules.paper_claims({"tables": {"t": table}}) == comparands[:1]
    assert rules.paper_claims({"tables": {"t": {**table, "claims": False}}}) == []
    assert rules.table_comparands("t", {**table, "higher_is_better": True})[0].paper_gain == pytest.approx(-1.0)


def test_bad_claim_declarations_are_errors_naming_the_table():
    rows = [{"setting": "a", "method": "erm", "paper": 1.0}, {"setting": "a", "method": "erm", "paper": 2.0}]
    with pytest.raises(ReproError, match="twice in setting 'a'"):
        rules.table_comparands("t", {"metric": "top1", "statistic": "final", "baseline": "erm", "rows": rows})
    with pytest.raises(ReproError, match="true or false"):
        rules.table_comparands("t", {"metric": "top1", "statistic": "final", "baseline": "erm",
                                     "rows": [{"setting": "a", "method": "m", "claim": "no"}]})
    with pytest.raises(ReproError, match="no known direction"):
        rules.higher_is_better("bleu")
    assert rules.higher_is_better("ts_aece") is False and rules.higher_is_better("rmse_worst_domain") is False
    assert rules.higher_is_better("r") is True and rules.higher_is_better("top5") is True


def test_every_papers_yaml_yields_claims_with_directions():
    total = 0
    for paper in papers():
        spec = report.paper_results(paper)
        claims = rules.paper_claims(spec, paper)
        total += len(claims)
        for claim in claims:
            assert claim.method != claim.baseline and isinstance(claim.higher_is_better, bool)
    assert total > 100


# ----------------------------------------------------------------------------------------- bad input
def test_corrupt_metrics_json_is_one_error_line_naming_the_file(toy_repo, tmp_path, capsys):
    bad = toy_repo / "results" / "toy" / "proxy" / "exp" / "erm" / "seed0" / "metrics.json"
    bad.write_text('{"final": {"top1": 9')
    with pytest.raises(ReproError, match=str(bad)):
        report.judge_paper("toy", "proxy", toy_repo / "results", root=toy_repo)
    bad.write_text("[1, 2]")
    with pytest.raises(ReproError, match="not an object"):
        report.read_json(bad)
    # the CLI on a real paper's run folder: exit 2, one `error:` line naming the file, no traceback
    run = tmp_path / "cli" / "results" / "cmixup" / "proxy" / "airfoil" / "erm" / "seed0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text("{not json")
    status = report.main(["index", "--results", str(tmp_path / "cli" / "results"), "--reports",
                          str(tmp_path / "cli" / "reports"), "--figures", str(tmp_path / "cli" / "figures")])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and str(run / "metrics.json") in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------- figures
def test_forest_plot_draws_the_gains_and_intervals_it_is_given(tmp_path):
    entries = {"panel": [
        {"label": "a", "gain": 1.0, "low": 0.5, "high": 1.5, "paper_gain": 2.0, "verdict": "reproduced"},
        {"label": "b", "gain": -0.2, "low": None, "high": None, "paper_gain": None, "verdict": "too few runs"}],
        "empty": []}
    drawn = plots.plot_forest(entries, tmp_path / "forest", "t", "stamp", "gain")
    assert drawn == {"panel": [("a", 1.0, 0.5, 1.5, 2.0), ("b", -0.2, None, None, None)]}
    assert (tmp_path / "forest.png").stat().st_size > 0 and (tmp_path / "forest.pdf").stat().st_size > 0
    assert plots.plot_forest({}, tmp_path / "none", "t", "stamp", "gain") == {}


def test_relative_forest_puts_the_paper_gain_at_one(toy_repo):
    judged = report.judge_paper("toy", "proxy", toy_repo / "results", root=toy_repo)
    (panel,) = report.forest_entries(judged, relative=True).values()
    rmse = next(e for e in panel if "reg: cm vs erm" in e["label"])
    assert rmse["paper_gain"] == 1.0 and rmse["gain"] == pytest.approx(0.2666667 / 0.2)
    assert not any("no paper number" in e["label"] or "paper tie" in e["label"] for e in panel)
    per_table = report.forest_entries(judged, relative=False)
    assert set(per_table) == {"acc: top1 (higher is better)", "rmse: rmse (lower is better)"}


# ------------------------------------------------------------------------------------ committed files
def committed_counts() -> dict[str, dict[str, int]]:
    """Verdict counts per scale of the committed reports/claims.csv, counted here from its rows."""
    with open(REPO / "reports" / "claims.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    counts = {}
    for row in rows:
        assert row["verdict"] in rules.VERDICTS and row["scale"] in report.VERDICT_SCALES, row
        counts.setdefault(row["scale"], dict.fromkeys(rules.VERDICTS, 0))[row["verdict"]] += 1
    return counts


def test_readme_counts_match_the_committed_claims_csv():
    """The README's "What is reproduced" lines are the counts of reports/claims.csv (rebuilt by
    `snakemake -c1 report`): after a rebuild, paste the output of `python -m common.report counts` there."""
    readme = (REPO / "README.md").read_text()
    for scale, by_verdict in committed_counts().items():
        line = f"* **{scale}** scale: " + " · ".join(f"{n} {v}" for v, n in by_verdict.items())
        assert line in readme, f"README.md lacks {line!r}: paste `python -m common.report counts` into it"
    assert "(reports/claims.md)" in readme


def test_counts_command_prints_one_line_per_scale(capsys):
    assert report.main(["counts"]) == 0
    lines = capsys.readouterr().out.splitlines()
    counts = committed_counts()
    assert len(lines) == len(counts)
    for line, (scale, by_verdict) in zip(lines, counts.items()):
        assert line == f"* **{scale}** scale: " + " · ".join(f"{n} {v}" for v, n in by_verdict.items()) \
            + f" ({sum(by_verdict.values())} claims)"


@pytest.mark.parametrize("expect, low, high, verdict", [
    ("better", 1.5, 3.0, "reproduced"),  # whole interval above the margin 1.0
    ("better", 0.5, 3.0, "inconclusive"),  # holds the margin
    ("better", -2.0, 0.8, "not reproduced"),  # below the margin (but not significantly worse)
    ("better", -3.0, -0.5, "not reproduced"),
    ("no_better", -3.0, 0.9, "reproduced"),  # no gain of 1.0 or more
    ("no_better", 0.5, 1.5, "inconclusive"),
    ("no_better", 1.2, 2.0, "not reproduced"),
])
def test_claims_in_words_are_judged_against_the_stated_margin(expect, low, high, verdict):
    comparison = rules.Comparison(5, 5, True, (low + high) / 2, low, high, (0.1,))
    got = rules.judge(None, comparison, expect=expect, margin=1.0)
    assert got.verdict == verdict
    if verdict == "not reproduced" and high < 0:
        assert "significantly worse" in got.note
    # without runs or with too few the usual verdicts come first
    assert rules.judge(None, rules.Comparison(0, 5), expect=expect, margin=1.0).verdict == "not run"
    assert rules.judge(None, rules.Comparison(2, 2, True, 1.0, 0.0, 2.0), expect=expect).verdict == "too few runs"


def test_claims_in_words_come_from_rows_with_expect_and_bad_values_are_errors():
    table = {"metric": "top1", "statistic": "final", "baseline": "none", "margin": 1.0, "rows": [
        {"setting": "s", "method": "none", "paper": None},
        {"setting": "s", "method": "mixup", "paper": None, "expect": "no_better"},
        {"setting": "s", "method": "icm", "paper": None, "expect": "better", "margin": 2.5},
        {"setting": "s", "method": "other", "paper": None},
    ]}
    got = {c.method: c for c in rules.table_comparands("t", table)}
    assert (got["mixup"].expect, got["mixup"].margin, got["mixup"].words) == ("no_better", 1.0, "words: no gain ≥ +1")
    assert (got["icm"].expect, got["icm"].margin, got["icm"].words) == ("better", 2.5, "words: gain > +2.5")
    assert got["other"].expect is None and got["other"].words is None and got["other"].paper_gain is None
    table["rows"][1]["expect"] = "worse"
    with pytest.raises(ReproError, match="expect"):
        rules.table_comparands("t", table)
