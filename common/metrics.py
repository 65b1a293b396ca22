"""Evaluation metrics shared by every paper: accuracy, NLL, calibration errors, temperature, regression.

All functions are pure torch: they accept CPU or CUDA tensors, do their work on the input's device
and return Python floats (or lists of floats). Classification metrics take **logits** `(N, K)`, never
probabilities; the softmax is applied here. Inputs in half precision are upcast to float32 first.

Units: accuracies and every calibration error (ECE, AECE, classwise ECE, over-/under-confidence) are
returned in **percent** (the fraction times 100), as the RankMixup tables report them
(specs/rankmixup.md §2.6 and §4). NLL is in nats. MAPE is in percent, RMSE and Pearson r are unitless.

The calibration metrics follow the official RankMixup evaluation code
(`cvlab-yonsei/RankMixup`, `calibrate/evaluation/metrics.py`, classes `ECELoss`, `AdaptiveECELoss`,
`ClasswiseECELoss`, `OELoss`, `UELoss`) and its temperature search
(`calibrate/net/temperature_scaling.py`, `ModelWithTemperature.set_temperature`), as specified in
specs/rankmixup.md §2.5-2.6. The regression metrics follow C-Mixup's `src/algorithm.py::test`
(specs/cmixup.md §2.3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from common.errors import ReproError

DEFAULT_N_BINS = 15


def _check_classification(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate `(N, K)` logits and `(N,)` integer labels; upcast half precision to float32."""
    if logits.dim() != 2:
        raise ReproError(
            f"logits must have shape (N, K), got {tuple(logits.shape)}; flatten extra dimensions first."
        )
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ReproError(
            f"labels must have shape (N,) = ({logits.shape[0]},) to match logits {tuple(logits.shape)}, "
            f"got {tuple(labels.shape)}; pass hard class indices, not one-hot or soft targets."
        )
    if logits.shape[0] == 0:
        raise ReproError("metrics need at least one sample; got N = 0 (is the evaluation split empty?).")
    if labels.dtype.is_floating_point:
        raise ReproError(f"labels must be integer class indices, got dtype {labels.dtype}.")
    if not logits.dtype.is_floating_point:
        raise ReproError(f"logits must be floating point, got dtype {logits.dtype}.")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits, labels.to(logits.device)


def _check_n_bins(n_bins: int) -> None:
    if int(n_bins) != n_bins or n_bins < 1:
        raise ReproError(f"n_bins must be a positive integer, got {n_bins!r}; the papers use 15.")


def _uniform_edges(n_bins: int, like: torch.Tensor) -> torch.Tensor:
    """Equal-width bin edges over [0, 1], `(n_bins + 1,)`, in the dtype and device of `like`.

    The official code builds the edges with float32 `torch.linspace` on the CPU and compares the
    confidences against `edge.item()`; torch casts that Python scalar to the confidences' dtype, so
    the edges are the float32 linspace values, rounded to `like.dtype`.
    """
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float32)
    return edges.to(dtype=like.dtype, device=like.device)


def _equal_mass_edges(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Equal-mass bin edges `interp(linspace(0, n, n_bins + 1), arange(n), sort(conf))`, `(n_bins + 1,)`.

    Reproduces `numpy.linspace` (`i * (n / n_bins)`, last point set to `n`) and `numpy.interp`
    (`(s[j+1] - s[j]) * (x - j) + s[j]`, clamped to `s[n-1]` from `x >= n - 1`) in float64, then
    rounds to the confidences' dtype, as the official comparison against `edge.item()` does.

    Args:
        conf: `(N,)` confidences.
        n_bins: number of bins.
    """
    n = conf.shape[0]
    s = torch.sort(conf).values.double()
    step = n / n_bins
    pos = torch.arange(n_bins + 1, dtype=torch.float64, device=conf.device) * step
    pos[-1] = float(n)
    j = torch.floor(pos).long().clamp(max=n - 1)
    j_next = (j + 1).clamp(max=n - 1)
    interp = (s[j_next] - s[j]) * (pos - j.double()) + s[j]
    edges = torch.where(pos >= n - 1, s[n - 1], interp)
    return edges.to(conf.dtype)


def _bin_index(values: torch.Tensor, edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin of each value under the rule `edges[b] < value <= edges[b + 1]` (spec §2.6).

    A value equal to an interior edge goes to the lower bin; a value `<= edges[0]` or `> edges[-1]`
    lies in no bin. Works for non-decreasing edges (equal-mass edges may repeat; such a bin is empty).

    Args:
        values: `(M,)` values to bin.
        edges: `(B + 1,)` non-decreasing edges.

    Returns:
        `(index (M,), valid (M,))`: the bin in `[0, B)` (meaningless where `valid` is False).
    """
    # searchsorted(right=False) returns the first i with edges[i] >= v, so edges[i-1] < v <= edges[i].
    pos = torch.searchsorted(edges.contiguous(), values.contiguous(), right=False)
    valid = (pos >= 1) & (pos <= edges.shape[0] - 1)
    return (pos - 1).clamp(min=0), valid


def _bin_stats(
    conf: torch.Tensor, hit: torch.Tensor, edges: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin count, sum of confidences and sum of hits, each `(B,)` float64."""
    n_bins = edges.shape[0] - 1
    index, valid = _bin_index(conf, edges)
    index = index[valid]
    zeros = torch.zeros(n_bins, dtype=torch.float64, device=conf.device)
    count = zeros.index_add(0, index, torch.ones_like(index, dtype=torch.float64))
    conf_sum = zeros.index_add(0, index, conf[valid].double())
    hit_sum = zeros.index_add(0, index, hit[valid].double())
    return count, conf_sum, hit_sum


def _confidence_and_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 softmax confidence `(N,)` and whether the top-1 class is right `(N,)`."""
    conf, pred = torch.max(F.softmax(logits, dim=1), dim=1)
    return conf, pred.eq(labels)


def _binned_calibration_error(conf: torch.Tensor, hit: torch.Tensor, edges: torch.Tensor) -> float:
    """`sum_b |B_b|/N * |mean conf_b - acc_b|` in percent; samples outside every bin count in N."""
    _, conf_sum, hit_sum = _bin_stats(conf, hit, edges)
    # |B|/N * |conf_sum/|B| - hit_sum/|B|| = |conf_sum - hit_sum| / N; empty bins contribute 0.
    return float((conf_sum - hit_sum).abs().sum().item() / conf.shape[0] * 100.0)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent.

    Args:
        logits: `(N, K)` class scores (logits or anything with the same ranking).
        labels: `(N,)` integer class indices.
        ks: the k values; a k larger than K is computed with k = K (so top-5 with 3 classes is 100).

    Returns:
        `{'top1': float, 'top5': float}` (one key `top{k}` per requested k, named after the request).
    """
    logits, labels = _check_classification(logits, labels)
    n_classes = logits.shape[1]
    max_k = min(max(ks), n_classes)
    top = logits.topk(max_k, dim=1).indices  # (N, max_k), best first
    hits = top.eq(labels[:, None])
    result = {}
    for k in ks:
        if k < 1:
            raise ReproError(f"top-k accuracy needs k >= 1, got k = {k}.")
        k_eff = min(k, n_classes)
        result[f"top{k}"] = float(hits[:, :k_eff].any(dim=1).double().mean().item() * 100.0)
    return result


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels under `softmax(logits)`, in nats.

    Args:
        logits: `(N, K)` logits.
        labels: `(N,)` integer class indices.
    """
    logits, labels = _check_classification(logits, labels)
    # gather on log_softmax rather than F.cross_entropy: CUDA nll_loss refuses deterministic mode.
    log_probs = F.log_softmax(logits, dim=1).gather(1, labels[:, None].long())
    return float(-log_probs.double().mean().item())


def ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = DEFAULT_N_BINS) -> float:
    """Expected calibration error with equal-width bins, in percent (spec §2.6, official `ECELoss`).

    Confidence is the top-1 softmax probability. Bins are `(l, u]` with edges
    `torch.linspace(0, 1, n_bins + 1)` (float32): a sample is in bin `(l, u]` iff `l < conf <= u`,
    so a confidence exactly on an interior edge belongs to the lower bin and a confidence of 1.0 to
    the last bin. `ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`, times 100.

    Args:
        logits: `(N, K)` logits (not probabilities).
        labels: `(N,)` integer class indices.
        n_bins: number of equal-width bins (15 in every paper table).

    Returns:
        ECE in percent (the fraction times 100).
    """
    _check_n_bins(n_bins)
    logits, labels = _check_classification(logits, labels)
    conf, hit = _confidence_and_hits(logits, labels)
    return _binned_calibration_error(conf, hit, _uniform_edges(n_bins, conf))


def adaptive_ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = DEFAULT_N_BINS) -> float:
    """Adaptive (equal-mass) ECE in percent (spec §2.6, official `AdaptiveECELoss`).

    Edges are `interp(linspace(0, N, n_bins + 1), arange(N), sort(conf))`: the lowest edge is the
    minimum confidence and the highest the maximum. Bins use the same `(l, u]` rule as `ece`, so the
    minimum-confidence sample (and any sample tied with it) lies in no bin and contributes nothing,
    while still counting in N.

    Args:
        logits: `(N, K)` logits.
        labels: `(N,)` integer class indices.
        n_bins: number of equal-mass bins.

    Returns:
        AECE in percent.
    """
    _check_n_bins(n_bins)
    logits, labels = _check_classification(logits, labels)
    conf, hit = _confidence_and_hits(logits, labels)
    return _binned_calibration_error(conf, hit, _equal_mass_edges(conf, n_bins))


def classwise_ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = DEFAULT_N_BINS) -> float:
    """Classwise ECE in percent (spec §2.6, official `ClasswiseECELoss`).

    For each class c, bin `softmax(logits)[:, c]` into the equal-width `(l, u]` bins of `ece`, with
    "accuracy" the fraction of samples labelled c, and take the ECE of that class; average over
    `C = max(labels) + 1` classes, as the official code does (not over K: classes above the largest
    label present are left out).

    Args:
        logits: `(N, K)` logits.
        labels: `(N,)` integer class indices.
        n_bins: number of equal-width bins.

    Returns:
        Classwise ECE in percent.
    """
    _check_n_bins(n_bins)
    logits, labels = _check_classification(logits, labels)
    n_classes = int(labels.max().item()) + 1
    if n_classes > logits.shape[1]:
        raise ReproError(
            f"label {n_classes - 1} is out of range for logits with K = {logits.shape[1]} classes."
        )
    probs = F.softmax(logits, dim=1)[:, :n_classes]  # (N, C)
    is_class = labels[:, None].eq(torch.arange(n_classes, device=labels.device)[None, :])  # (N, C)
    edges = _uniform_edges(n_bins, probs)
    index, valid = _bin_index(probs.reshape(-1), edges)
    # One flat histogram over (class, bin) pairs: key = c * n_bins + b.
    class_of = torch.arange(n_classes, device=probs.device).repeat(probs.shape[0])
    key = (class_of * n_bins + index)[valid]
    zeros = torch.zeros(n_classes * n_bins, dtype=torch.float64, device=probs.device)
    conf_sum = zeros.index_add(0, key, probs.reshape(-1)[valid].double())
    hit_sum = zeros.index_add(0, key, is_class.reshape(-1)[valid].double())
    per_class = (conf_sum - hit_sum).abs().view(n_classes, n_bins).sum(dim=1) / probs.shape[0]
    return float(per_class.mean().item() * 100.0)


def _confidence_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int, over: bool) -> float:
    _check_n_bins(n_bins)
    logits, labels = _check_classification(logits, labels)
    conf, hit = _confidence_and_hits(logits, labels)
    count, conf_sum, hit_sum = _bin_stats(conf, hit, _uniform_edges(n_bins, conf))
    filled = count > 0
    mean_conf = conf_sum[filled] / count[filled]
    gap = (mean_conf - hit_sum[filled] / count[filled]) * (1.0 if over else -1.0)
    total = (count[filled] / conf.shape[0] * mean_conf * gap.clamp(min=0.0)).sum()
    return float(total.item() * 100.0)


def overconfidence_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = DEFAULT_N_BINS) -> float:
    """Over-confidence error (OE) in percent, official `OELoss`.

    The spec (§2.6) names the metric without a formula; this is the official code's, which is
    Thulasidasan et al. 2019's OE: `sum_b |B_b|/N * conf(B_b) * max(conf(B_b) - acc(B_b), 0)` over the
    equal-width `(l, u]` bins of `ece`.

    Args:
        logits: `(N, K)` logits.
        labels: `(N,)` integer class indices.
        n_bins: number of equal-width bins.
    """
    return _confidence_error(logits, labels, n_bins, over=True)


def underconfidence_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = DEFAULT_N_BINS) -> float:
    """Under-confidence error (UE) in percent, official `UELoss`.

    Not defined in the spec; the official code's formula is the mirror of OE and keeps OE's
    `conf(B_b)` weight: `sum_b |B_b|/N * conf(B_b) * max(acc(B_b) - conf(B_b), 0)` (some papers weight
    UE by `1 - conf` instead; we follow the official code).

    Args:
        logits: `(N, K)` logits.
        labels: `(N,)` integer class indices.
        n_bins: number of equal-width bins.
    """
    return _confidence_error(logits, labels, n_bins, over=False)


def temperature_grid() -> list[float]:
    """The official search grid: 100 values from 0.1, each the previous plus 0.1 (float accumulation).

    Built exactly as the official loop (`T = 0.1; T += 0.1`), so the values carry its rounding, e.g.
    0.30000000000000004; they are the 0.1 grid up to 1e-13.
    """
    grid, value = [], 0.1
    for _ in range(100):
        grid.append(value)
        value += 0.1
    return grid


def temperature_scale(
    logits_val: torch.Tensor,
    labels_val: torch.Tensor,
    grid: Sequence[float] | None = None,
    criterion: str = "ece",
) -> float:
    """Post-hoc temperature: the grid value that minimises a validation criterion (spec §2.5).

    The official search (`ModelWithTemperature.set_temperature`) scans `T = 0.1, 0.2, ..., 10.0` and
    keeps the **first** T with the lowest 15-bin ECE of `logits / T` (strict improvement, so ties keep
    the smaller T). RankMixup selects on ECE (`cross_validate='ece'`), which is the default here;
    `criterion='nll'` selects on validation NLL instead (the code computes both). Apply the result as
    `logits_test / T`.

    Args:
        logits_val: `(N, K)` validation logits.
        labels_val: `(N,)` validation labels.
        grid: candidate temperatures, scanned in order; default `temperature_grid()`.
        criterion: `'ece'` (spec, default) or `'nll'`.

    Returns:
        The chosen temperature, a value of `grid` (for the default grid, the accumulated float such as
        1.2000000000000002, i.e. exactly what was evaluated).
    """
    if criterion not in ("ece", "nll"):
        raise ReproError(f"unknown temperature criterion {criterion!r}; use 'ece' (the spec's) or 'nll'.")
    logits_val, labels_val = _check_classification(logits_val, labels_val)
    candidates = temperature_grid() if grid is None else [float(t) for t in grid]
    if not candidates or min(candidates) <= 0:
        raise ReproError(f"temperature grid must be non-empty and positive, got {list(candidates)}.")
    score = ece if criterion == "ece" else nll
    best_t, best_score = candidates[0], float("inf")
    for t in candidates:
        value = score(logits_val / t, labels_val)
        if value < best_score:  # strict: the first minimum wins, as in the official loop
            best_t, best_score = t, value
    return best_t


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, n_bins: int = DEFAULT_N_BINS
) -> dict[str, float]:
    """What the trainer logs each epoch: top-1/top-5 accuracy (%), NLL (nats), and calibration (%):
    15-bin ECE, adaptive ECE, classwise ECE, over- and under-confidence errors.

    Args:
        logits: `(N, K)` logits over the whole evaluation split.
        labels: `(N,)` integer class indices.
        n_bins: calibration bins.

    Returns:
        `{'top1', 'top5', 'nll', 'ece', 'aece', 'cece', 'oe', 'ue'}`.
    """
    metrics = topk_accuracy(logits, labels, ks=(1, 5))
    metrics["nll"] = nll(logits, labels)
    metrics["ece"] = ece(logits, labels, n_bins=n_bins)
    metrics["aece"] = adaptive_ece(logits, labels, n_bins=n_bins)
    metrics["cece"] = classwise_ece(logits, labels, n_bins=n_bins)
    metrics["oe"] = overconfidence_error(logits, labels, n_bins=n_bins)
    metrics["ue"] = underconfidence_error(logits, labels, n_bins=n_bins)
    return metrics


def regression_metrics(preds: torch.Tensor, targets: torch.Tensor, domains: torch.Tensor | None = None
                       ) -> dict[str, float]:
    """RMSE, MAPE (%) and Pearson r as C-Mixup computes them (specs/cmixup.md §2.3), and per-domain RMSE.

    * `rmse = sqrt(mean((pred - y)^2))` over all entries;
    * `mape = 100 * mean(|pred - y| / |y|)` over the entries with `y != 0`;
    * `r`: Pearson correlation per output dimension (population moments), averaged over the
      dimensions whose targets have non-zero variance; NaN if there is none, or if a kept prediction
      column is constant (as the official numpy code gives);
    * with `domains`: `rmse_worst_domain`, the largest RMSE of a domain (C-Mixup's `cal_worst_acc` over the test
      domains), and `rmse_domain_mean`, the unweighted mean of the domains' RMSEs (`rmse` itself pools every
      example: the "average" of C-Mixup's out-of-distribution tables, `algorithm.test` on the whole test split).

    Args:
        preds: `(N,)`, `(N, 1)` or `(N, D)` predictions.
        targets: same shape as `preds` (a `(N,)` / `(N, 1)` mix is accepted).
        domains: optional `(N,)` integer domain of each example.

    Returns:
        `{'rmse', 'mape', 'r'}`, plus `{'rmse_worst_domain', 'rmse_domain_mean', 'r_worst_domain', 'r_worst_group'}`
        with `domains`.
    """
    # (N, 1) -> (N,) on both sides, as the official code squeezes, so (N,) vs (N, 1) never broadcasts.
    pred = preds.squeeze(1) if preds.dim() == 2 and preds.shape[1] == 1 else preds
    true = targets.squeeze(1) if targets.dim() == 2 and targets.shape[1] == 1 else targets
    if pred.shape != true.shape or pred.dim() not in (1, 2) or pred.shape[0] == 0:
        raise ReproError(
            f"preds {tuple(preds.shape)} and targets {tuple(targets.shape)} must both be (N,), (N, 1) "
            f"or the same (N, D) with N > 0."
        )
    pred = pred.double()
    true = true.to(pred.device).double()
    rmse = torch.sqrt(((pred - true) ** 2).mean())
    nonzero = true != 0
    mape = ((pred[nonzero] - true[nonzero]).abs() / true[nonzero].abs()).mean() * 100.0
    pred2 = pred.reshape(pred.shape[0], -1)
    true2 = true.reshape(true.shape[0], -1)
    dev_p = pred2 - pred2.mean(dim=0)
    dev_t = true2 - true2.mean(dim=0)
    sigma_p = dev_p.pow(2).mean(dim=0).sqrt()
    sigma_t = dev_t.pow(2).mean(dim=0).sqrt()
    corr = (dev_p * dev_t).mean(dim=0) / (sigma_p * sigma_t)
    r = corr[sigma_t != 0].mean()
    out = {"rmse": float(rmse.item()), "mape": float(mape.item()), "r": float(r.item())}
    if domains is not None:
        domains = torch.as_tensor(domains).to(pred.device).reshape(-1)
        if domains.shape[0] != pred.shape[0]:
            raise ReproError(f"domains has {domains.shape[0]} entries for {pred.shape[0]} predictions.")
        _, group = torch.unique(domains, return_inverse=True)
        sq = ((pred2 - true2) ** 2).sum(dim=1)  # per example, summed over output dims
        sums = torch.zeros(int(group.max()) + 1, dtype=sq.dtype, device=sq.device).index_add_(0, group, sq)
        counts = torch.bincount(group).to(sq.dtype) * pred2.shape[1]
        per_domain = torch.sqrt(sums / counts)
        out["rmse_worst_domain"] = float(per_domain.max().item())
        out["rmse_domain_mean"] = float(per_domain.mean().item())
        # C-Mixup's r tables (DTI): the domain whose r is closest to 0, signed (`cal_worst_acc`: smallest |r|)
        r_domain = torch.stack([_pearson(pred2[group == g], true2[group == g]) for g in range(len(counts))])
        finite = r_domain[~torch.isnan(r_domain)]
        out["r_worst_domain"] = float(finite[finite.abs().argmin()].item()) if len(finite) else float("nan")
        # WILDS' r_wg (PovertyMap): the smallest signed r of a group (PearsonCorrelation.worst, NaN groups ignored)
        out["r_worst_group"] = float(finite.min().item()) if len(finite) else float("nan")
    return out


def _pearson(pred2: torch.Tensor, true2: torch.Tensor) -> torch.Tensor:
    """Pearson r of `(N, D)` predictions and targets as `regression_metrics`' `r` (population moments, averaged
    over the output dimensions whose targets vary)."""
    dev_p, dev_t = pred2 - pred2.mean(dim=0), true2 - true2.mean(dim=0)
    corr = (dev_p * dev_t).mean(dim=0) / (dev_p.pow(2).mean(dim=0).sqrt() * dev_t.pow(2).mean(dim=0).sqrt())
    return corr[dev_t.pow(2).mean(dim=0) != 0].mean()


def reliability_diagram_data(
    logits: torch.Tensor, labels: torch.Tensor, n_bins: int = DEFAULT_N_BINS
) -> dict[str, list[float]]:
    """Per-bin statistics for a reliability diagram, with the equal-width `(l, u]` bins of `ece`.

    Confidence and accuracy are fractions in [0, 1] (for plotting against the diagonal), NaN for an
    empty bin. `sum_b count_b * |confidence_b - accuracy_b| / N * 100` equals `ece`.

    Args:
        logits: `(N, K)` logits.
        labels: `(N,)` integer class indices.
        n_bins: number of bins.

    Returns:
        `{'lower', 'upper', 'confidence', 'accuracy', 'count'}`, each a list of `n_bins` floats.
    """
    _check_n_bins(n_bins)
    logits, labels = _check_classification(logits, labels)
    conf, hit = _confidence_and_hits(logits, labels)
    edges = _uniform_edges(n_bins, conf)
    count, conf_sum, hit_sum = _bin_stats(conf, hit, edges)
    safe = count.clamp(min=1.0)
    empty = count == 0
    nan = torch.full_like(count, float("nan"))
    return {
        "lower": edges[:-1].double().tolist(),
        "upper": edges[1:].double().tolist(),
        "confidence": torch.where(empty, nan, conf_sum / safe).tolist(),
        "accuracy": torch.where(empty, nan, hit_sum / safe).tolist(),
        "count": count.tolist(),
    }
