"""Two regression baselines of C-Mixup's in-distribution table: k-Mixup and Local Mixup.

* **k-Mixup** — Greenewald, Gu, Yurochkin, Solomon, Chien, "k-Mixup Regularization for Deep Learning via
  Optimal Transport" (TMLR 2023, arXiv 2106.02933); official code AnmingGu/kmixup-cifar10 `train.py`
  `mixup_data` (input branch, `--mixupBatch k`): one `lam ~ Beta(alpha, alpha)` per batch; a random permutation
  `index` of the batch; the batch is cut into blocks of `k` consecutive anchors, block `b` holding anchors
  `[bk, (b+1)k)` and candidate partners `index[bk:(b+1)k]`; within each block the partners are matched to the
  anchors by the optimal assignment (`scipy.optimize.linear_sum_assignment`) of the **Euclidean** (not squared)
  distances between flattened inputs; then mixup of inputs and targets with those partners. `k = 1` is mixup.
  (`get_k_alpha` computes an adjusted alpha that `train` never uses: the run's alpha is used as given.)
* **Local Mixup** — Baena, Drumetz, Gripon, "Preventing Manifold Intrusion with Locality: Local Mixup" (2022,
  arXiv 2201.04368); official code raphael-baena/Local-Mixup (`fashionmnist.py`/`svhn.py` `mixup_data`,
  `train`): partners by a random permutation of the batch, one `lam ~ Beta(alpha, alpha)`, and each mixed
  example's loss weighted by a decreasing function of the distance `d = ||x_i - x_partner||_2` between the two
  inputs, normalised by the sum of the weights: `loss = sum_i w_i l_i / sum_i w_i`. The paper's main graph is
  the threshold `w = 1[d <= epsilon]` (`weight: threshold`); the released scripts use `w = exp(-decay d)`
  (`weight: exp`). With `epsilon -> 0` only self pairs count (plain training); `epsilon -> inf` is mixup.

Loss form: the official codes write `lam MSE(pred, y_a) + (1 - lam) MSE(pred, y_b)`; we use
`MSE(pred, lam y_a + (1 - lam) y_b)` like every other row of the C-Mixup tables. For MSE the two differ by
`lam (1 - lam) (y_a - y_b)^2`, which does not depend on the model (same gradients, per example too).

The C-Mixup paper's settings for these baselines (k, alpha, epsilon) are not known here (its appendix was not
read); the configs give ours and their reasons. The optimal assignment is the one sequential part (an
O(k^3) Hungarian algorithm per block, NumPy, written out below because scipy is not a dependency).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import ReproError
from common.methods import Method, register_method
from common.mixing import randperm_partner, sample_beta
from papers.cmixup.method import mix_pair

WEIGHTS = ("threshold", "exp")


# ------------------------------------------------------------------------------------------ pure functions
def optimal_assignment(cost) -> np.ndarray:
    """Column of each row in the minimum-cost perfect matching of a square cost matrix (Hungarian algorithm).

    Shortest augmenting paths with row/column potentials, O(k^3); the inner scans over columns are vectorised.

    Args:
        cost: `(k, k)` finite costs.

    Returns:
        `(k,)` int64 `col` with `sum_i cost[i, col[i]]` minimal (the value `linear_sum_assignment` reaches).
    """
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or not np.isfinite(c).all():
        raise ReproError(f"optimal_assignment needs a finite square cost matrix, got shape {c.shape}.")
    k = c.shape[0]
    u, v = np.zeros(k + 1), np.zeros(k + 1)  # potentials of rows and columns (index 0: a virtual column)
    row_of = np.zeros(k + 1, dtype=np.int64)  # row_of[j]: row (1-based) matched to column j, 0 = free
    for i in range(1, k + 1):
        row_of[0], j0 = i, 0
        min_slack = np.full(k + 1, np.inf)
        previous = np.zeros(k + 1, dtype=np.int64)
        used = np.zeros(k + 1, dtype=bool)
        while True:  # grow the alternating tree from row i until it reaches a free column
            used[j0] = True
            i0 = row_of[j0]
            free = ~used[1:]
            slack = c[i0 - 1] - u[i0] - v[1:]
            better = free & (slack < min_slack[1:])
            min_slack[1:][better] = slack[better]
            previous[1:][better] = j0
            candidates = np.where(free, min_slack[1:], np.inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            u[row_of[used]] += delta
            v[used] -= delta
            min_slack[~used] -= delta
            j0 = j1
            if row_of[j0] == 0:
                break
        while j0:  # flip the augmenting path
            j1 = previous[j0]
            row_of[j0] = row_of[j1]
            j0 = j1
    col = np.empty(k, dtype=np.int64)
    col[row_of[1:] - 1] = np.arange(k)
    return col


def kmixup_partners(inputs: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """Partners of k-Mixup: per block of `k` anchors, the optimal matching to the block's candidates.

    Args:
        inputs: `(B, ...)` inputs (flattened for the distances).
        order: `(B,)` a permutation of the batch (the official `index = torch.randperm(B)`).
        k: block size (`--mixupBatch`); the last block has `B mod k` anchors when `k` does not divide `B`.

    Returns:
        `(B,)` int64 partner of each anchor, a permutation of the batch; block `b` maps
        `[bk, (b+1)k)` onto `order[bk:(b+1)k]` minimising the sum of Euclidean input distances.
    """
    if k < 1:
        raise ReproError(f"k-Mixup block size k must be >= 1, got {k}.")
    flat = inputs.detach().reshape(inputs.shape[0], -1).double()
    order = order.to(flat.device)
    partner = torch.empty_like(order)
    for start in range(0, flat.shape[0], k):  # B / k blocks: the only loop (the assignment is sequential)
        block = order[start:start + k]
        if len(block) == 1:
            partner[start] = block[0]
            continue
        cost = torch.cdist(flat[start:start + k], flat[block]).cpu().numpy()
        partner[start:start + k] = block[torch.as_tensor(optimal_assignment(cost), device=block.device)]
    return partner


def local_weights(inputs: torch.Tensor, partner_inputs: torch.Tensor, weight: str, epsilon: float,
                  decay: float) -> torch.Tensor:
    """Local Mixup's weight of each pair from its input distance `d = ||x_i - x_j||_2` (flattened inputs).

    Args:
        inputs, partner_inputs: `(B, ...)` the two inputs of each pair.
        weight: 'threshold' (`w = 1[d <= epsilon]`, the paper's graph) or 'exp' (`w = exp(-decay d)`, the
            released scripts).

    Returns:
        `(B,)` float32 weights in [0, 1].
    """
    d = (inputs.reshape(inputs.shape[0], -1).float() - partner_inputs.reshape(inputs.shape[0], -1).float()).norm(dim=1)
    if weight == "threshold":
        return (d <= epsilon).float()
    if weight == "exp":
        return torch.exp(-decay * d)
    raise ReproError(f"Local Mixup weight must be one of {', '.join(WEIGHTS)}, got {weight!r}.")


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`sum_i w_i mean_d (pred - target)^2 / sum_i w_i` (official Local Mixup normalisation); a batch whose
    weights are all zero gives a zero loss (no local pair), with the graph kept for backward.

    Args:
        pred, target: `(B, D)` (or `(B,)`).
        weights: `(B,)`.
    """
    per_example = (pred.float() - target.float()).pow(2).reshape(pred.shape[0], -1).mean(dim=1)
    total = weights.sum()
    return (weights * per_example).sum() / total.clamp_min(torch.finfo(total.dtype).tiny)


# ------------------------------------------------------------------------------------------------ methods
class _InBatchRegressionMixup(Method):
    """Shared checks of the in-batch regression baselines (input mixing, MSE)."""

    def __init__(self, params, num_classes, label_smoothing=0.0, task="classification"):
        super().__init__(params, num_classes, label_smoothing, task)
        if not self.params.alpha > 0:
            raise ReproError(f"method.alpha must be > 0, got {self.params.alpha!r}.")
        if label_smoothing:
            raise ReproError(f"method {self.name!r} is for regression; set train.label_smoothing=0.")

    def prepare(self, train_dataset, info) -> None:
        if info.task != "regression":
            raise ReproError(f"method {self.name!r} mixes regression targets; dataset {info.name!r} is "
                             f"{info.task}. Use a regression dataset (airfoil, no2, ...).")


@register_method("k_mixup")
class KMixup(_InBatchRegressionMixup):
    """k-Mixup (input mixing): optimal-transport matching of blocks of `k` anchors to `k` random partners."""

    @dataclass
    class Params:
        alpha: float = 2.0  # C-Mixup's alpha for every mixing row (config.py mix_alpha)
        k: int = 16  # the official README's example (--mixupBatch=16)

    def __init__(self, params, num_classes, label_smoothing=0.0, task="classification"):
        super().__init__(params, num_classes, label_smoothing, task)
        if self.params.k < 1:
            raise ReproError(f"method.k (k-Mixup block size) must be >= 1, got {self.params.k!r}.")

    def step(self, model, batch, ctx):
        inputs, targets = batch
        lam = float(sample_beta(self.params.alpha, 1, ctx.generator)[0])
        order = randperm_partner(inputs.shape[0], ctx.generator)
        partner = kmixup_partners(inputs, order, self.params.k).to(inputs.device)
        pred = model(mix_pair(inputs, inputs[partner], lam))
        y_mix = mix_pair(targets, targets[partner], lam)
        loss = F.mse_loss(pred.float().view_as(y_mix), y_mix.float())
        gap = (targets - targets[partner]).abs().mean()
        return {"loss": loss, "logits": pred, "lam": lam, "partner_label_gap": gap.detach()}


@register_method("local_mixup")
class LocalMixup(_InBatchRegressionMixup):
    """Local Mixup (input mixing): random in-batch partners, loss of each pair weighted by its locality."""

    @dataclass
    class Params:
        alpha: float = 2.0  # C-Mixup's alpha for every mixing row (config.py mix_alpha)
        # defaults: the released scripts (fashionmnist.py / svhn.py: w = exp(-0.0005 d), for pixel-space distances);
        # the C-Mixup configs use the paper's threshold graph, w = 1[d <= epsilon], with a data-scaled epsilon
        weight: str = "exp"
        epsilon: float = 1.0  # 'threshold': on ||x_i - x_j|| (input units as fed to the model)
        decay: float = 0.0005  # 'exp': w = exp(-decay d)

    def __init__(self, params, num_classes, label_smoothing=0.0, task="classification"):
        super().__init__(params, num_classes, label_smoothing, task)
        p = self.params
        if p.weight not in WEIGHTS:
            raise ReproError(f"method.weight must be one of {', '.join(WEIGHTS)}, got {p.weight!r}.")
        if not p.epsilon > 0 or not p.decay >= 0:
            raise ReproError(f"method.epsilon must be > 0 and method.decay >= 0, got {p.epsilon!r}, {p.decay!r}.")

    def step(self, model, batch, ctx):
        inputs, targets = batch
        p = self.params
        lam = float(sample_beta(p.alpha, 1, ctx.generator)[0])
        partner = randperm_partner(inputs.shape[0], ctx.generator).to(inputs.device)
        weights = local_weights(inputs, inputs[partner], p.weight, p.epsilon, p.decay)
        pred = model(mix_pair(inputs, inputs[partner], lam))
        y_mix = mix_pair(targets, targets[partner], lam)
        loss = weighted_mse(pred.view_as(y_mix), y_mix, weights)
        return {"loss": loss, "logits": pred, "lam": lam, "local_fraction": weights.mean().detach()}
