"""C-Mixup: Improving Generalization in Regression (Yao, Wang, Zhang, Zou, Finn; NeurIPS 2022, arXiv 2210.05775).

Official code: huaxiuyao/C-Mixup (0b88fb3), `src/algorithm.py`: `get_mixup_sample_rate` (the kernel),
`train` (the step), `get_batch_kde_mixup_batch` (within-batch variant); `src/models.py`
`Learner.forward_mixup` (manifold mixing after the first block). Spec: shared/specs/cmixup.md.

Per batch: `lam ~ Beta(alpha, alpha)` (one scalar); each anchor `i` gets a partner `j`, drawn
* uniformly over the whole training set (`mixtype=random`: the paper's "mixup"/"manifold mixup" rows), or
* from `P[i, :] ∝ exp(-||y_i - y_j||^2 / (2 sigma^2))` over the whole training set, self included
  (`mixtype=kde`: C-Mixup), by NumPy's inverse CDF `searchsorted(cumsum(p) / total, u, side="right")`, or
* within the batch (`batch_type=1`): uniform partners first, then a kernel draw over the 2B pool;
then `y_mix = lam y_i + (1 - lam) y_j`, `pred = f(lam x_i + (1 - lam) x_j)` (input) or
`head(lam g(x_i) + (1 - lam) g(x_j))` (manifold) and the loss is `MSE(pred, y_mix)`.

Deviations (randomness only, the law is the official one): the epoch permutation is the trainer's
shuffled loader, and `lam`, partners and uniforms come from the run's torch generator instead of NumPy's
global one (`official_draws` replays the official NumPy order for parity tests). The kernel rows a batch
needs are computed on the fly from the batch labels (`O(B N d)`, the same float64 values as the official
dense `N x N` matrix), so memory does not grow as `N^2`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from common.errors import ReproError
from common.methods import Method, TrainPass, register_method
from common.mixing import sample_beta

PARTNERS = ("uniform", "kernel", "batch_kernel")


# ------------------------------------------------------------------------------------------ pure functions
def _labels64(labels) -> torch.Tensor:
    """Labels as `(N, d)` float64, through float32 as the official code (`torch.tensor(y, float32)`)."""
    y = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
    y = y.to(torch.float32).to(torch.float64)
    return y.reshape(y.shape[0], -1)


def pair_probability_rows(anchor_labels, labels, bandwidth: float) -> torch.Tensor:
    """Rows of the C-Mixup sampling matrix for some anchors, computed on the fly.

    Args:
        anchor_labels: `(B,)` or `(B, d)` labels of the anchors.
        labels: `(N,)` or `(N, d)` labels of every candidate partner (the training set).
        bandwidth: kernel width sigma, in label units (> 0; `inf` gives uniform rows).

    Returns:
        `(B, N)` float64 on the labels' device; row `b` is `exp(-||y_b - y_j||^2 / (2 sigma^2))` normalised
        to sum to one (the anchor itself, at distance 0, holds the row maximum).
    """
    if not bandwidth > 0:
        raise ReproError(f"bandwidth must be > 0 (label units; Airfoil uses 1.75), got {bandwidth!r}.")
    anchors = _labels64(anchor_labels)
    pool = _labels64(labels).to(anchors.device)
    if anchors.shape[1] != pool.shape[1]:
        raise ReproError(f"anchor labels have {anchors.shape[1]} dims but the pool's have {pool.shape[1]}.")
    # differences, no cancellation; summed over chunks of label dimensions so that no (B, N, d) tensor larger
    # than 2^26 elements exists at once (Electricity: d = 321, N = 15.6k); one chunk whenever d is small
    step = max(1, 2**26 // max(1, anchors.shape[0] * pool.shape[0]))
    sq_dist = sum(((a[:, None, :] - p[None, :, :]) ** 2).sum(-1)
                  for a, p in zip(anchors.split(step, dim=1), pool.split(step, dim=1), strict=True))
    # the maximum log-kernel of each row is 0 (self or a duplicate), so exp never overflows
    kernel = torch.exp(-sq_dist / (2.0 * float(bandwidth) ** 2))
    return kernel / kernel.sum(dim=1, keepdim=True)


def pair_probabilities(labels, bandwidth: float) -> np.ndarray:
    """The official dense matrix `P` (`get_mixup_sample_rate`): `(N, N)` float64, row `i` = partner law of `i`.

    Args:
        labels: `(N,)` or `(N, d)` training labels.
        bandwidth: kernel width sigma (label units).
    """
    return pair_probability_rows(labels, labels, bandwidth).cpu().numpy()


def sample_partners(probabilities, uniforms) -> torch.Tensor:
    """Inverse-CDF draw of one partner per row, exactly as `np.random.choice(N, p=row)` does for uniform `u`.

    Args:
        probabilities: `(B, N)` rows (each sums to ~1; NumPy divides the cumsum by its last entry).
        uniforms: `(B,)` values in [0, 1).

    Returns:
        `(B,)` int64 partner indices, on the rows' device.
    """
    p = torch.as_tensor(probabilities, dtype=torch.float64)
    u = torch.as_tensor(uniforms, dtype=torch.float64).to(p.device).reshape(-1, 1)
    cdf = p.cumsum(dim=1)
    cdf = cdf / cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).squeeze(1)  # numpy side="right"
    return idx.clamp_(max=p.shape[1] - 1)


def official_draws(rng: np.random.RandomState, probabilities, batch_size: int, alpha: float, mixtype: str):
    """One epoch of the official NumPy draws (`algorithm.train`): permutation; per batch beta, then B partners.

    Uses `rng.random_sample` + `sample_partners` where the official code calls `np.random.choice` per
    example (the same stream, checked in the tests). Returns a list of `(idx1, lam, idx2)` per batch.
    """
    n = len(probabilities) if probabilities is not None else None
    order = rng.permutation(n)
    batches = []
    for k in range(n // batch_size):
        lam = rng.beta(alpha, alpha)
        idx1 = order[k * batch_size:(k + 1) * batch_size]
        if mixtype == "kde":
            idx2 = sample_partners(np.asarray(probabilities)[idx1], rng.random_sample(batch_size)).numpy()
        else:
            idx2 = rng.randint(0, n, size=batch_size)
        batches.append((idx1, lam, idx2))
    return batches


def mix_pair(a: torch.Tensor, b: torch.Tensor, lam) -> torch.Tensor:
    """`lam * a + (1 - lam) * b`, the official operation order (inputs, features and targets).

    `lam` is a float, or a `(B,)` float64 tensor of one weight per row (PovertyMap `mixup.py` `mix_up`: both
    `l` and `1 - l` are computed in float64, then cast to float32 and broadcast over each row)."""
    if not torch.is_tensor(lam):
        return a * lam + b * (1 - lam)
    shape = (-1,) + (1,) * (a.dim() - 1)
    return a * lam.to(torch.float32).to(a.device).view(shape) + b * (1 - lam).to(torch.float32).to(b.device).view(shape)


def partners_excluding_self(rows: torch.Tensor | None, anchors: torch.Tensor, n: int, uniforms: torch.Tensor
                            ) -> torch.Tensor:
    """One partner per anchor, never the anchor itself (PovertyMap `get_sample`: redraw while `idx == prev_idx`,
    i.e. the row's law conditioned on `j != i`).

    Args:
        rows: `(B, N)` kernel rows, or None for uniform partners over the other `N - 1` rows.
        anchors: `(B,)` int64 training-set indices of the anchors.
        n: training-set size N.
        uniforms: `(B,)` float64 in [0, 1).
    """
    if rows is None:  # uniform over the N - 1 others: floor(u (N - 1)), shifted past the anchor
        draw = (uniforms * (n - 1)).floor().long().clamp_(max=n - 2).to(anchors.device)
        return draw + (draw >= anchors).long()
    rows = rows.clone()
    rows[torch.arange(len(anchors), device=rows.device), anchors.to(rows.device)] = 0.0
    return sample_partners(rows, uniforms)


# ------------------------------------------------------------------------------------------------ methods
class RegressionMixup(Method):
    """Mixup for regression with the partner law of `partners` and input or manifold mixing.

    Options: `alpha` (Beta), `partners` ('uniform' | 'kernel' | 'batch_kernel'), `bandwidth` (sigma, label
    units; kernel laws only), `manifold` (mix the output of the model's first block, as `forward_mixup`).
    PovertyMap's `train_mixup` (`PovertyMap/main.py`, `mixup.py`, `models/poverty.py`) adds, all off by default:
    `lam_per_sample` (one Beta draw per row), `exclude_self` (partner != anchor; the training set is then served
    with each row's index appended to its target, `train_dataset`), `both_directions` (the step trains on
    `[mix(x_i, x_j, l1); mix(x_j, x_i, l2)]`, 2B rows, `l2` drawn anew) and `anchors_per_batch` (loader batch of
    anchors; main.py halves batch 64 to 32 for mixup). Label smoothing is meaningless here and is rejected.
    """

    @dataclass
    class Params:
        alpha: float = 2.0  # Beta(2, 2): config.py mix_alpha for Airfoil/NO2/Electricity
        partners: str = "kernel"
        bandwidth: float = 1.75  # main.sh, Airfoil
        manifold: bool = False
        lam_per_sample: bool = False
        exclude_self: bool = False
        both_directions: bool = False
        anchors_per_batch: int | None = None

    def __init__(self, params, num_classes, label_smoothing=0.0, task="classification"):
        super().__init__(params, num_classes, label_smoothing, task)
        p = self.params
        if p.partners not in PARTNERS:
            raise ReproError(f"method.partners must be one of {', '.join(PARTNERS)}, got {p.partners!r}.")
        if not p.alpha > 0:
            raise ReproError(f"method.alpha must be > 0, got {p.alpha!r}.")
        if p.partners != "uniform" and not p.bandwidth > 0:
            raise ReproError(f"method.bandwidth must be > 0 (label units), got {p.bandwidth!r}.")
        if label_smoothing:
            raise ReproError(f"method {self.name!r} is for regression; set train.label_smoothing=0.")
        if p.exclude_self and p.partners == "batch_kernel":
            raise ReproError("method.exclude_self applies to partners 'uniform' and 'kernel' (PovertyMap), not "
                             "'batch_kernel'.")
        if p.both_directions and not p.lam_per_sample:
            raise ReproError("method.both_directions draws a second weight per row: set method.lam_per_sample=true "
                             "(PovertyMap mix_up).")
        if p.anchors_per_batch is not None and p.anchors_per_batch < 1:
            raise ReproError(f"method.anchors_per_batch must be >= 1 or null, got {p.anchors_per_batch!r}.")
        self.features = self.labels = self.dataset = None

    def prepare(self, train_dataset, info) -> None:
        """Keep every training label `(N, d)` (and the inputs when the dataset holds them as one tensor)."""
        if info.task != "regression":
            raise ReproError(f"method {self.name!r} mixes regression targets; dataset {info.name!r} is "
                             f"{info.task}. Use a regression dataset (airfoil, no2, ...).")
        base, rows = train_dataset, None
        if hasattr(base, "indices") and hasattr(base, "dataset"):  # a Subset (data.val_split > 0)
            base, rows = base.dataset, torch.as_tensor(base.indices)
        labels = getattr(base, "targets", None)
        if torch.is_tensor(labels):
            self.labels = labels if rows is None else labels[rows]
        else:
            self.labels = torch.stack([torch.as_tensor(train_dataset[i][1]) for i in range(len(train_dataset))])
        self.labels = self.labels.reshape(len(train_dataset), -1).float()
        features = getattr(base, "features", None)
        if torch.is_tensor(features):
            self.features = features if rows is None else features[rows]
        self.dataset = train_dataset

    def check_model(self, model) -> None:
        if self.params.manifold:
            _first_block_split(model)

    def passes(self, epochs: int, batch_size: int) -> list[TrainPass]:
        """With `anchors_per_batch`, every epoch loads that many anchors per batch (needs schedule.per=epoch)."""
        batch = self.params.anchors_per_batch
        return [TrainPass(epoch, 1, batch_size=batch) for epoch in range(epochs)] if batch else \
            super().passes(epochs, batch_size)

    def train_dataset(self, train_ds, info, train_pass: TrainPass):
        """With `exclude_self`, the training rows with their index appended to the target (float64, exact)."""
        return IndexedTargets(train_ds) if self.params.exclude_self else train_ds

    def _partner_inputs(self, idx: torch.Tensor, device) -> torch.Tensor:
        if self.features is not None:
            return self.features[idx.cpu()].to(device)
        # windows built on the fly (time series): fetch the B partners like a loader would
        return default_collate([self.dataset[int(i)][0] for i in idx.cpu()]).to(device)

    def draw(self, targets: torch.Tensor, generator: torch.Generator, anchors: torch.Tensor | None = None):
        """`(lam, partner indices into the training set (B,))`; for 'batch_kernel' indices into [batch; pool].

        With `exclude_self` (`anchors`: the anchors' training-set indices) the partners come first, then `lam`
        (B,) float64 with `lam_per_sample`, and with `both_directions` `lam` is a pair `(l1, l2)`."""
        if self.labels is None:
            raise ReproError(f"method {self.name!r} needs prepare(train_dataset, info) before step().")
        p, batch = self.params, targets.shape[0]
        if p.exclude_self:
            u = torch.rand(batch, generator=generator, dtype=torch.float64)
            rows = pair_probability_rows(targets, self.labels.to(targets.device), p.bandwidth) \
                if p.partners == "kernel" else None
            partner = partners_excluding_self(rows, anchors, self.labels.shape[0], u)
            return self._draw_lam(batch, generator), partner
        lam = self._draw_lam(batch, generator)
        if p.partners == "kernel":
            u = torch.rand(batch, generator=generator, dtype=torch.float64)
            rows = pair_probability_rows(targets, self.labels.to(targets.device), p.bandwidth)
            return lam, sample_partners(rows, u)
        # one bounded integer per example, as the official np.random.choice(N) per example
        uniform = torch.randint(0, self.labels.shape[0], (batch,), generator=generator)
        if p.partners == "uniform":
            return lam, uniform
        u = torch.rand(batch, generator=generator, dtype=torch.float64)
        # within-batch: kernel over the 2B pool [batch; uniform partners], draws for the first B rows
        pool = torch.cat([targets, self.labels[uniform].to(targets.device).view_as(targets)])
        rows = pair_probability_rows(targets, pool, p.bandwidth)
        return lam, (uniform, sample_partners(rows, u))

    def _draw_lam(self, batch: int, generator: torch.Generator):
        p = self.params
        if not p.lam_per_sample:
            return float(sample_beta(p.alpha, 1, generator)[0])
        lam = [torch.from_numpy(sample_beta(p.alpha, batch, generator)) for _ in range(1 + p.both_directions)]
        return tuple(lam) if p.both_directions else lam[0]

    def step(self, model, batch, ctx):
        inputs, targets = batch
        anchors = None
        if self.params.exclude_self:  # IndexedTargets: the row's training-set index is the last target column
            if targets.dim() != 2 or targets.shape[1] != self.labels.shape[1] + 1:
                raise ReproError(f"method {self.name!r} with exclude_self needs the batches of its train_dataset "
                                 f"(targets with the row index appended), got targets {tuple(targets.shape)}; "
                                 "set data.device_cache=false.")
            anchors, targets = targets[:, -1].long(), targets[:, :-1].float()
        lam, partner = self.draw(targets, ctx.generator, anchors)
        if self.params.partners == "batch_kernel":
            uniform, pooled = partner
            pool_x = torch.cat([inputs, self._partner_inputs(uniform, inputs.device)])
            pool_y = torch.cat([targets, self.labels[uniform].to(targets.device).view_as(targets)])
            pooled = pooled.to(inputs.device)
            x2, y2 = pool_x[pooled], pool_y[pooled]
        else:
            x2 = self._partner_inputs(partner, inputs.device)
            y2 = self.labels[partner.cpu()].to(targets.device).view_as(targets)
        if self.params.both_directions:  # [mix(i, j, l1); mix(j, i, l2)] (train_mixup: mixed_x1, mixed_x2)
            (lam, lam2), x1 = lam, inputs
            inputs, x2 = torch.cat([x1, x2]), torch.cat([x2, x1])
            targets, y2 = torch.cat([targets, y2]), torch.cat([y2, targets])
            lam = torch.cat([lam, lam2])
        y_mix = mix_pair(targets, y2, lam)
        if self.params.manifold:
            first, rest = _first_block_split(model)
            draw_point = getattr(getattr(model, "module", model), "draw_mixing_point", None)
            if draw_point is not None:  # a model that mixes at a layer drawn per step (DTI's encoder)
                draw_point(ctx.generator)
            pred = rest(mix_pair(first(inputs), first(x2), lam))
        else:
            pred = model(mix_pair(inputs, x2, lam))
        loss = F.mse_loss(pred.float().view_as(y_mix), y_mix.float())
        gap = (targets - y2).abs().mean()  # how far partners' labels are: what the kernel shrinks
        mean_lam = lam.mean().item() if torch.is_tensor(lam) else lam  # a CPU draw: no device sync
        return {"loss": loss, "logits": pred, "lam": mean_lam, "partner_label_gap": gap.detach()}


class IndexedTargets(torch.utils.data.Dataset):
    """A training set whose target is `[y..., index]` in float64 (exact for y float32 and any index < 2^53)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        x, y = self.dataset[index]
        y = torch.as_tensor(y).reshape(-1).to(torch.float64)
        return x, torch.cat([y, torch.tensor([float(index)], dtype=torch.float64)])


def _first_block_split(model):
    """`(g, head)` with `model(x) == head(g(x))`: mixing point of `Learner.forward_mixup` (after block_1)."""
    net = getattr(model, "module", model)
    if all(hasattr(net, k) for k in ("block_1", "block_2", "forward_head")):
        return net.block_1, (lambda h: net.forward_head(net.block_2(h)))
    raise ReproError(
        f"manifold mixing needs a model with block_1, block_2 and forward_head (mlp_regression); got "
        f"{type(net).__name__}. Set method.manifold=false or use model.name=mlp_regression."
    )


@register_method("mixup_regression")
class MixupRegression(RegressionMixup):
    """The paper's "mixup" row: uniform partners over the training set, input mixing (`mixtype=random`)."""

    @dataclass
    class Params(RegressionMixup.Params):
        partners: str = "uniform"


@register_method("manifold_mixup_regression")
class ManifoldMixupRegression(RegressionMixup):
    """The paper's "Manifold mixup" row: uniform partners, mixing after the first block."""

    @dataclass
    class Params(RegressionMixup.Params):
        partners: str = "uniform"
        manifold: bool = True


@register_method("cmixup")
class CMixup(RegressionMixup):
    """C-Mixup: kernel partners (`mixtype=kde`); `manifold` chooses the mixing point (Airfoil: true)."""


@register_method("cmixup_batch")
class CMixupWithinBatch(RegressionMixup):
    """C-Mixup within the batch (`batch_type=1`, RCF-MNIST): kernel draw over [batch; uniform partners]."""

    @dataclass
    class Params(RegressionMixup.Params):
        partners: str = "batch_kernel"
