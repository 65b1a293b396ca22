"""The papers' claims and the verdict on each: one definition, used by every table, claims.md/csv and figure.

**Claims.** Every row of a table in ``papers/<paper>/paper_results.yaml`` that is not the table's
``baseline`` and shares its ``setting`` with a baseline row is a claim: "in this setting, `method` does better
(or worse) than `baseline` on `metric` by the paper's gain". Nothing is typed twice: the paper's gain is
``row.paper - baseline_row.paper``, signed so that positive means better than the baseline (the metric's
direction comes from :func:`higher_is_better`, or from a table's ``higher_is_better:`` when
declared). A row with ``claim: false`` (or every row of a table with ``claims: false``) is listed in its table
but is not a claim (our own variants, reference benchmarks the paper does not claim). A row whose setting has
no baseline row compares with nothing and is not a claim either.

**Our gain and its 95% interval** (:func:`compare`), from the table's per-run ``statistic`` of each arm:

* *paired by seed* when both arms ran the same seeds and each seed's two resolved configs (``config.yaml``)
  are identical except for ``method``: then the seed fixed the same split, initialisation and order for both,
  and the interval is the one-sample t interval of the per-seed differences, ``mean(d) ± t(0.975, n-1)
  sd(d) / sqrt(n)``;
* *unpaired* (Welch) otherwise: ``mean(m) - mean(b) ± t(0.975, df) sqrt(s_m²/n_m + s_b²/n_b)`` with the
  Welch-Satterthwaite ``df``. Two arms without spread give the point interval ``[gain, gain]``.

**Verdicts** (:func:`judge`; intervals are closed, so a bound exactly at 0 "contains" 0):

* ``not run``: an arm has no finished run;
* ``too few runs``: an arm has fewer than 3 seeds (our gain is still shown, the interval when n >= 2);
* ``no paper gain``: the paper prints no number for the method or the baseline; our gain and interval are
  shown without a verdict;
* ``reproduced``: the interval excludes 0 on the side of the paper's gain;
* ``inconclusive``: the interval contains both 0 and the paper's gain;
* ``not reproduced``: anything else, i.e. the interval excludes the paper's gain and shows no significant
  effect in the paper's direction; the note says when it is significantly the other way. A paper gain of
  exactly 0 (a tie in the paper) has no side: it is ``not reproduced`` when we find a significant difference
  and ``inconclusive`` otherwise (with no seed count: no interval separates 0 from 0).

**Claims in words** (a row with ``expect:``, for papers whose claim is a direction, not a number): ``expect:
better`` is judged against the ``margin`` the row or table states before the runs (default 0): ``reproduced`` when
the interval lies above the margin, ``not reproduced`` when it lies below it, ``inconclusive`` otherwise;
``expect: no_better`` ("method X is ineffective") is ``reproduced`` when the whole interval lies below the margin
(no gain of that size), ``not reproduced`` when it lies above it, ``inconclusive`` otherwise. Such rows need no
paper number; when the paper prints numbers too, the paper's gain is shown but the words are judged.

**Seeds needed** (for ``inconclusive``): the smallest number of seeds per arm ``n`` at which the interval,
computed with the observed per-seed spread (the SD of the paired differences, or both arms' SDs for Welch)
and the same pairing, would be narrower than ``|paper gain|``; an interval that narrow cannot contain both 0
and the paper's gain, so at that ``n`` the verdict would no longer be inconclusive whatever the mean. It is a
planning figure at the observed spread, not a power calculation (the new mean may land anywhere). Above
:data:`SEEDS_CAP` it is reported as ``>SEEDS_CAP``.

The Student-t quantile is computed here (the regularised incomplete beta function by its continued fraction,
inverted by bisection) so the project needs no SciPy; it is tested against printed t tables.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from common.errors import ReproError

CONFIDENCE = 0.95
MIN_SEEDS = 3  # fewer seeds in an arm: "too few runs"
SEEDS_CAP = 10_000
VERDICTS = ("reproduced", "not reproduced", "inconclusive", "too few runs", "not run", "no paper gain")
# the columns of reports/claims.csv, in this order (issue #13)
CSV_COLUMNS = ("paper", "scale", "setting", "method", "baseline", "metric", "higher_is_better", "statistic",
               "paired", "n_method", "n_baseline", "paper_gain", "our_gain", "ci_low", "ci_high", "verdict",
               "seeds_needed")
# keys of a run's resolved config that may differ between the two arms of a paired seed
ARM_KEYS = ("method", "output_dir")


# Which way is better for every metric a table can name: the one place the direction of a gain comes from
# (tables, claims, figures). `ts_<m>` is <m> after temperature scaling, `error` is 100 - top-1, and a derived
# metric `<m>_<qualifier>` (e.g. `rmse_worst_domain`) goes the way of <m>.
HIGHER_IS_BETTER = frozenset({"top1", "top5", "r"})
LOWER_IS_BETTER = frozenset({"error", "nll", "ece", "aece", "cece", "oe", "ue", "rmse", "mape"})


def higher_is_better(metric: str) -> bool:
    """True for accuracies and correlations, False for errors, losses and calibration errors.

    Raises:
        ReproError: for a metric of unknown direction (add it to HIGHER_IS_BETTER or LOWER_IS_BETTER, or
            declare `higher_is_better:` in the table).
    """
    base = metric.removeprefix("ts_")
    for name in (base, base.split("_")[0]):
        if name in HIGHER_IS_BETTER:
            return True
        if name in LOWER_IS_BETTER:
            return False
    known = sorted(HIGHER_IS_BETTER | LOWER_IS_BETTER)
    raise ReproError(f"metric {metric!r} has no known direction (known: {', '.join(known)}); declare "
                     "`higher_is_better: true` or `false` in its table of paper_results.yaml.")


# ------------------------------------------------------------------------------------------- Student t
def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), converging fast for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-15
    f, c, d = tiny, tiny, 0.0
    for j in range(1, 10_000):
        if j == 1:
            numerator = 1.0
        else:
            m, odd = divmod(j - 2, 2)
            m += odd  # j = 2, 3, 4, 5, ... -> d_1, d_2, d_3, d_4 with m = 0, 1, 1, 2, ...
            if odd == 0:  # d_{2m+1}
                numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
            else:  # d_{2m}
                numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1.0) < eps:
            return f
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, for a, b > 0 and x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` > 0 degrees of freedom (real-valued df, as Welch's)."""
    if math.isinf(df):
        return statistics.NormalDist().cdf(t)
    tail = 0.5 * regularized_beta(df / (df + t * t), df / 2.0, 0.5)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The `p` quantile of Student's t with `df` degrees of freedom (e.g. t_quantile(0.975, 4) = 2.776)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if math.isinf(df) or df > 1e7:
        return statistics.NormalDist().inv_cdf(p)
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(200):  # bisection: the CDF is monotone, 200 halvings reach float resolution
        middle = 0.5 * (low + high)
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low <= 1e-13 * high:
            break
    return 0.5 * (low + high)


# ------------------------------------------------------------------------------------------ intervals
@dataclass(frozen=True)
class RunValue:
    """One finished run of one arm: its seed, the table statistic's value, and its resolved config (or None)."""

    seed: int
    value: float
    config: dict | None = None


@dataclass(frozen=True)
class Comparison:
    """Our gain of a method over its baseline (positive = better) with its 95% interval.

    `low`/`high` are None when an arm has fewer than 2 runs (paired: fewer than 2 seeds). `spread` is what the
    interval's width came from: `(sd of the differences,)` when paired, `(sd_method, sd_baseline)` for Welch.
    """

    n_method: int
    n_baseline: int
    paired: bool | None = None
    gain: float | None = None
    low: float | None = None
    high: float | None = None
    spread: tuple = ()


def same_but_method(config_a: dict | None, config_b: dict | None) -> bool:
    """Whether two runs' resolved configs agree on everything except the method (so a seed controls the same
    split, initialisation and data order in both). A run without a config.yaml cannot be checked: False."""
    if config_a is None or config_b is None:
        return False
    return _without_arm_keys(config_a) == _without_arm_keys(config_b)


def _without_arm_keys(config: dict) -> dict:
    return {key: value for key, value in config.items() if key not in ARM_KEYS}


def pairable(method: Sequence[RunValue], baseline: Sequence[RunValue]) -> bool:
    """Paired by seed: the same seeds in both arms, each seed's two configs differing only in the method."""
    by_seed = {r.seed: r for r in baseline}
    if not method or len(by_seed) != len(baseline) or {r.seed for r in method} != set(by_seed) \
            or len(method) != len(baseline):
        return False
    return all(same_but_method(r.config, by_seed[r.seed].config) for r in method)


def paired_half_width(sd: float, n: int, confidence: float = CONFIDENCE) -> float:
    """Half-width of the t interval of a mean of `n` paired differences with standard deviation `sd`."""
    return t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)


def welch_half_width(sd_a: float, n_a: int, sd_b: float, n_b: int, confidence: float = CONFIDENCE) -> float:
    """Half-width of Welch's interval of a difference of two means (Welch-Satterthwaite degrees of freedom)."""
    va, vb = sd_a**2 / n_a, sd_b**2 / n_b
    if va + vb == 0.0:
        return 0.0  # no spread in either arm: the difference is known exactly
    df = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))
    return t_quantile(0.5 + confidence / 2, df) * math.sqrt(va + vb)


def compare(method: Sequence[RunValue], baseline: Sequence[RunValue], higher_better: bool,
            confidence: float = CONFIDENCE) -> Comparison:
    """Our gain of `method` over `baseline` (signed so positive = better) and its interval, paired by seed
    when :func:`pairable`, Welch otherwise."""
    sign = 1.0 if higher_better else -1.0
    n_m, n_b = len(method), len(baseline)
    if not n_m or not n_b:
        return Comparison(n_m, n_b)
    if pairable(method, baseline):
        by_seed = {r.seed: r.value for r in baseline}
        diffs = [sign * (r.value - by_seed[r.seed]) for r in sorted(method, key=lambda r: r.seed)]
        gain = statistics.fmean(diffs)
        if len(diffs) < 2:
            return Comparison(n_m, n_b, True, gain)
        sd = statistics.stdev(diffs)
        half = paired_half_width(sd, len(diffs), confidence)
        return Comparison(n_m, n_b, True, gain, gain - half, gain + half, (sd,))
    values_m, values_b = [r.value for r in method], [r.value for r in baseline]
    gain = sign * (statistics.fmean(values_m) - statistics.fmean(values_b))
    if n_m < 2 or n_b < 2:
        return Comparison(n_m, n_b, False, gain)
    sd_m, sd_b = statistics.stdev(values_m), statistics.stdev(values_b)
    half = welch_half_width(sd_m, n_m, sd_b, n_b, confidence)
    return Comparison(n_m, n_b, False, gain, gain - half, gain + half, (sd_m, sd_b))


def seeds_needed(comparison: Comparison, paper_gain: float, confidence: float = CONFIDENCE) -> int | None:
    """Smallest seeds per arm at which the interval (observed spread, same pairing) is narrower than
    |paper_gain|, so it cannot hold both 0 and the paper's gain; SEEDS_CAP + 1 when beyond SEEDS_CAP; None
    for a paper gain of 0 or a comparison without an interval."""
    if not paper_gain or comparison.low is None:
        return None
    if comparison.paired:
        (sd,) = comparison.spread

        def width(n):
            return 2 * paired_half_width(sd, n, confidence)
    else:
        sd_m, sd_b = comparison.spread

        def width(n):
            return 2 * welch_half_width(sd_m, n, sd_b, n, confidence)
    target = abs(paper_gain)
    if width(SEEDS_CAP) >= target:
        return SEEDS_CAP + 1
    low, high = 1, 2  # width(low) >= target (or low = 1: no interval), width(high) < target after the search
    while width(high) >= target:
        low, high = high, min(2 * high, SEEDS_CAP)
    while high - low > 1:  # the width shrinks with n: bisect for the first n below the target
        middle = (low + high) // 2
        if width(middle) < target:
            high = middle
        else:
            low = middle
    return high


@dataclass(frozen=True)
class Verdict:
    verdict: str
    seeds_needed: int | None = None
    note: str = ""

    @property
    def seeds_text(self) -> str:
        if self.seeds_needed is None:
            return ""
        return f">{SEEDS_CAP}" if self.seeds_needed > SEEDS_CAP else str(self.seeds_needed)


EXPECTATIONS = ("better", "no_better")


def judge(paper_gain: float | None, comparison: Comparison, min_seeds: int = MIN_SEEDS, expect: str | None = None,
          margin: float | None = None) -> Verdict:
    """The verdict on one claim (rules in the module docstring); `expect`/`margin`: a claim in words."""
    n_m, n_b = comparison.n_method, comparison.n_baseline
    if not n_m or not n_b:
        return Verdict("not run", note="no finished run of the " + ("method" if not n_m else "baseline"))
    if min(n_m, n_b) < min_seeds or comparison.low is None:
        return Verdict("too few runs", note=f"{min(n_m, n_b)} seed(s) in an arm; a verdict needs {min_seeds}")
    if expect is not None:
        return judge_words(comparison, expect, margin or 0.0)
    if paper_gain is None:
        return Verdict("no paper gain", note="the paper prints no number for the method or the baseline")
    low, high, g = comparison.low, comparison.high, paper_gain
    if (g > 0 and low > 0) or (g < 0 and high < 0):
        if low <= g <= high:
            return Verdict("reproduced")
        size = "smaller" if abs(comparison.gain) < abs(g) else "larger"
        return Verdict("reproduced", note=f"direction reproduced; our gain is significantly {size} than the "
                       "paper's")
    if low <= 0 <= high and low <= g <= high:
        if g == 0:
            return Verdict("inconclusive", note="the paper shows a tie; no number of seeds separates 0 from 0")
        return Verdict("inconclusive", seeds_needed(comparison, g))
    if g == 0:
        return Verdict("not reproduced", note="the paper shows a tie; we find a significant difference")
    if (g > 0 and high < 0) or (g < 0 and low > 0):
        return Verdict("not reproduced", note="significantly the other way: " + (
            "worse than the baseline" if g > 0 else "better than the baseline"))
    return Verdict("not reproduced", note="the paper's gain lies outside our interval; no significant effect")


def judge_words(comparison: Comparison, expect: str, margin: float) -> Verdict:
    """A claim stated as a direction: `better` (gain above `margin`) or `no_better` (no gain above `margin`)."""
    low, high = comparison.low, comparison.high
    if expect == "better":
        if low > margin:
            return Verdict("reproduced", note=f"gain above the stated margin {margin:g}")
        if high < margin:
            return Verdict("not reproduced", note=f"gain below the stated margin {margin:g}" + (
                "; significantly worse than the baseline" if high < 0 else ""))
        return Verdict("inconclusive", note=f"the interval holds the stated margin {margin:g}")
    if expect == "no_better":
        if high < margin:
            return Verdict("reproduced", note=f"no gain of {margin:g} or more")
        if low > margin:
            return Verdict("not reproduced", note=f"a gain above the stated margin {margin:g}")
        return Verdict("inconclusive", note=f"the interval holds the stated margin {margin:g}")
    raise ReproError(f"expect must be one of {', '.join(EXPECTATIONS)}, got {expect!r}.")


# ---------------------------------------------------------------------------------------------- claims
@dataclass(frozen=True)
class Comparand:
    """One non-baseline row of a table with the baseline row of its setting (a claim unless opted out)."""

    table: str
    setting: str
    method: str
    baseline: str
    metric: str
    statistic: str
    higher_is_better: bool
    method_experiment: str | None
    baseline_experiment: str | None
    paper_method: float | None
    paper_baseline: float | None
    is_claim: bool
    expect: str | None = None  # a claim in words (module docstring): better | no_better
    margin: float | None = None

    @property
    def words(self) -> str | None:
        """A claim in words as a table cell: what the paper's words promise, with the stated margin."""
        margin = self.margin or 0.0
        if self.expect == "better":
            return f"words: gain > {margin:+g}"
        if self.expect == "no_better":
            return f"words: no gain ≥ {margin:+g}"
        return None

    @property
    def expectation(self) -> dict:
        """`expect` and `margin` as keyword arguments of `judge`."""
        return {"expect": self.expect, "margin": self.margin}

    @property
    def paper_gain(self) -> float | None:
        """The paper's gain over the baseline, positive = better; None without both numbers."""
        if self.paper_method is None or self.paper_baseline is None:
            return None
        return (1.0 if self.higher_is_better else -1.0) * (self.paper_method - self.paper_baseline)


def table_direction(table: dict) -> bool:
    """A table's `higher_is_better:` when declared, else its metric's direction."""
    declared = table.get("higher_is_better")
    if declared is not None and not isinstance(declared, bool):
        raise ReproError(f"higher_is_better must be true or false, got {declared!r}.")
    return higher_is_better(table["metric"]) if declared is None else declared


def row_experiment(table: dict, row: dict) -> str | None:
    return row.get("experiment", table.get("experiment"))


def table_comparands(table_id: str, table: dict, where: str = "") -> list[Comparand]:
    """Every row of one table set against the baseline row of its setting, in table order.

    Raises:
        ReproError: a (setting, method) pair listed twice, or a `claim:`/`claims:` value that is not a bool.
    """
    where = where or f"table {table_id!r}"
    for key, value in [("claims", table.get("claims", True))] + [("claim", r.get("claim", True))
                                                                   for r in table["rows"]]:
        if not isinstance(value, bool):
            raise ReproError(f"{where}: `{key}:` must be true or false, got {value!r}.")
    seen = set()
    for row in table["rows"]:
        key = (row["setting"], row["method"])
        if key in seen:
            raise ReproError(f"{where} lists method {row['method']!r} twice in setting {row['setting']!r}; "
                             "give the second row its own setting.")
        seen.add(key)
    baseline = table.get("baseline")
    base_rows = {r["setting"]: r for r in table["rows"] if r["method"] == baseline}
    direction = table_direction(table)
    out = []
    for row in table["rows"]:
        base = base_rows.get(row["setting"])
        if row["method"] == baseline or base is None:
            continue
        out.append(Comparand(
            table=table_id, setting=row["setting"], method=row["method"], baseline=baseline,
            metric=table["metric"], statistic=table["statistic"], higher_is_better=direction,
            method_experiment=row_experiment(table, row), baseline_experiment=row_experiment(table, base),
            paper_method=row.get("paper"), paper_baseline=base.get("paper"),
            is_claim=table.get("claims", True) and row.get("claim", True),
            expect=_expectation(row, where), margin=row.get("margin", table.get("margin"))))
    return out


def _expectation(row: dict, where: str) -> str | None:
    expect = row.get("expect")
    if expect is not None and expect not in EXPECTATIONS:
        raise ReproError(f"{where}: row {row['method']!r} has expect: {expect!r}; use one of {', '.join(EXPECTATIONS)}.")
    return expect


def paper_claims(spec: dict, where: str = "") -> list[Comparand]:
    """Every claim of one paper (a parsed paper_results.yaml), table by table, in file order."""
    return [c for table_id, table in (spec.get("tables") or {}).items()
            for c in table_comparands(table_id, table, f"{where} table {table_id!r}".strip()) if c.is_claim]
