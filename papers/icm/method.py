"""Intra-Cluster Mixup for complementary-label learning (Mai & Lin, TMLR; arXiv 2509.17971). Spec: specs/icm.md.

Official code: maitanha/cll_ot 0946ff2 (read, not copied). `train.py` `train_icm` (the losses and the loop),
`imb_cll/utils/cl_augmentation.py` `mixup_cl_data_count_error` (Mixup for CLL) and `aug_intra_class` +
`recalculate_lambda_label_sharing` (ICM).

Every training example carries only a complementary label (CL) ``cl`` ("x is not of class cl"). Per batch:

* ``cll_none``: the CLL loss of the clean batch, e.g. SCL-NL ``-log(1 - p_cl + 1e-6)``.
* ``cll_mixup`` (`mixup_cl_data_count_error`): ``lam ~ Beta(1, 1)`` (the official call never passes ``--alpha``),
  a partner ``j`` per row drawn uniformly from the whole batch *with replacement* (``j = i`` possible),
  ``x = lam x_i + (1 - lam) x_j``, loss ``lam l(f(x), cl_i) + (1 - lam) l(f(x), cl_j)``.
* ``icm_official`` (`aug_intra_class`, what the stored code runs): ``lam ~ Beta(alpha, alpha)``; a partner ``j``
  drawn uniformly among the batch members of ``i``'s cluster (``i`` included); soft target
  ``t = (1 - lam) onehot(cl_i) + lam onehot(cl_j)``, the weight of ``cl_j`` becoming ``1 - lam`` when ``x_j`` equals
  ``x_i`` (``j = i`` or a duplicate image: the code's "reverse distance weight"); **the input is not mixed**
  (``mixed_x[i] = x[i]``). The soft SCL-NL loss is ``sum_c -t_c log(clamp(1 - p_c, 1e-6, 1 - 1e-6))``, averaged
  over the batch.
* ``icm_mix`` (what the paper's name and abstract describe): the same pairs, ``lam`` and targets, and the input
  mixed within the cluster with the labels' weights: ``x = (1 - lam) x_i + lam x_j``, i.e. each image weighs what
  its CL weighs (a self-pair or a duplicate image gives ``x = x_i``; its target keeps quirk 1's weights).
  (The official file keeps a commented line ``lam x_i + (1 - lam) x_j``, whose weights are the reverse of the
  targets'; it is not used here.)

Official quirks, each an option whose default is the official behaviour (specs/icm.md §3.1):
* `duplicate_weight` (quirk 1): ``j = i`` or an identical image gives ``t = 2 (1 - lam) onehot(cl_i)``.
* `zero_alone` (quirk 2): a row alone in its cluster within the batch gets an all-zero target (zero loss) and an
  all-zero input row (``mixed_x`` starts as zeros); false: it keeps its own input and one-hot CL.
* quirk 3 (the target buffer is ``zeros(512, K)``: batch 512 only) is not reproduced: any batch works.
* quirk 4 (Adam re-created each epoch) is the trainer's ``optim.reset_each_epoch``; quirk 5 (best test accuracy,
  last partial test batch dropped) is the ``val`` split of `papers.icm.data` with ``train.select: best_val``.
* `augment` (quirk 6, ``--data_aug true``): horizontal flip + reflect-padded 28-px random crop (pad 4) per image,
  batched on the device.
* `fwd_repeat_target_a` (quirk 7): FWD + Mixup's second term uses ``cl_i`` again.
* quirk 9 (Mixup's partners from Python's unseeded ``random``): ours come from the run's generator.
The official loop also runs a clean forward it only logs a training accuracy from; it is skipped here (the MLP
has no batch statistics, so the losses and updates are unchanged).

Measured every step, never trained on: the CL-noise rate of the pairs drawn, a pair being noisy when
``cl_i = y_j`` or ``cl_j = y_i`` (the official ``count_error`` test; ``cl_i = y_i`` is impossible), over the rows
that were paired, and the share of rows left alone. Vectorised: no Python loop over the samples (the official
functions loop over every row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.errors import ReproError
from common.methods import Method, register_method
from common.mixing import sample_beta

LOSSES = ("scl_nl", "scl_exp", "fwd")
EPS_HARD = 1e-6  # the hard-label SCL-NL loss adds 1e-6 inside the log
CLAMP_SOFT = (1e-6, 1 - 1e-6)  # the soft-label one clamps instead
CLAMP_FWD = (1e-8, 1 - 1e-8)


# ------------------------------------------------------------------------------------------------- losses
def cll_loss(logits: torch.Tensor, target: torch.Tensor, loss: str = "scl_nl",
             transition: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example complementary-label loss, hard (`target` (B,) CL indices) or soft (`target` (B, K) weights).

    `scl_nl`: hard ``-log(1 - p_cl + 1e-6)``, soft ``sum_c -t_c log(clamp(1 - p_c, 1e-6, 1 - 1e-6))``;
    `scl_exp`: ``exp(p_cl)`` / ``sum_c t_c exp(p_c)``; `fwd`: ``-log((p Q)_cl)`` with ``p Q`` clamped to
    [1e-8, 1 - 1e-8] and `transition` Q (K, K). Returns (B,) float32 (average it for the official batch loss).
    """
    p = F.softmax(logits.float(), dim=1)
    if loss == "scl_nl":
        per_class = -(1 - p + EPS_HARD).log() if target.dim() == 1 else -(1 - p).clamp(*CLAMP_SOFT).log()
    elif loss == "scl_exp":
        per_class = torch.exp(p)
    elif loss == "fwd":
        if transition is None:
            raise ReproError("loss 'fwd' needs the CL transition matrix Q.")
        per_class = -(p @ transition.to(p)).clamp(*CLAMP_FWD).log()
    else:
        raise ReproError(f"unknown CLL loss {loss!r}; use one of {', '.join(LOSSES)}.")
    if target.dim() == 1:
        return per_class.gather(1, target.long().view(-1, 1)).squeeze(1)
    return (per_class * target.to(per_class)).sum(dim=1)


def uniform_transition(num_classes: int) -> torch.Tensor:
    """FWD's ``fwd-u`` Q: 1 / (K - 1) off the diagonal, 0 on it."""
    q = torch.full((num_classes, num_classes), 1.0 / (num_classes - 1))
    return q.fill_diagonal_(0.0)


def empirical_transition(labels: torch.Tensor, complementary: torch.Tensor, num_classes: int) -> torch.Tensor:
    """FWD's ``fwd-r`` Q (`get_dataset_T`): row y = the frequency of each CL among the examples of class y."""
    counts = torch.zeros(num_classes, num_classes).index_put_(
        (labels.long(), complementary.long()), torch.ones(len(labels)), accumulate=True)
    return counts / counts.sum(dim=1, keepdim=True).clamp(min=1)


# ------------------------------------------------------------------------------------------------- draws
def draw_lam(alpha: float, generator: torch.Generator) -> float:
    """One ``lam ~ Beta(alpha, alpha)`` per batch (1.0 when alpha <= 0, as the official code)."""
    return float(sample_beta(alpha, 1, generator)[0]) if alpha > 0 else 1.0


def batch_partners(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Mixup for CLL: one partner per row, uniform over the whole batch, with replacement (``j = i`` possible)."""
    return torch.randint(batch_size, (batch_size,), generator=generator)


def cluster_partners(clusters: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ICM's partners: for row i, member number ``floor(u_i * m_i)`` (in batch order) of the ``m_i`` batch rows
    sharing i's cluster, i included, as ``np.random.choice(members, 1)`` picks; rows with ``m_i < 2`` are alone.

    Args:
        clusters: (B,) int cluster id per row.
        uniforms: (B,) values in [0, 1).

    Returns:
        partners (B,) int64 (a row alone gets itself) and paired (B,) bool (``m_i >= 2``).
    """
    clusters = clusters.long().contiguous()
    order = torch.sort(clusters, stable=True).indices  # rows grouped by cluster, batch order inside a group
    sorted_ids = clusters[order].contiguous()
    start = torch.searchsorted(sorted_ids, clusters)  # first sorted position of i's cluster
    members = torch.searchsorted(sorted_ids, clusters, right=True) - start
    pick = (uniforms.to(torch.float64) * members).floor().long().clamp(max=members - 1)
    partners = order[start + pick]
    return partners, members >= 2


def pair_noise(complementary: torch.Tensor, labels: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the pair (i, j) carries CL noise (``cl_i = y_j`` or ``cl_j = y_i``, `count_error`'s test)."""
    return (complementary == labels[partners]) | (complementary[partners] == labels)


def icm_batch(inputs: torch.Tensor, complementary: torch.Tensor, partners: torch.Tensor, paired: torch.Tensor,
              lam: float, num_classes: int, mix_inputs: bool, duplicate_weight: bool = True,
              zero_alone: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """ICM's batch: inputs (mixed within clusters when `mix_inputs`) and soft CL targets (module docstring).

    Args:
        inputs: (B, D) flat images; complementary: (B,) CLs; partners, paired: from `cluster_partners`;
        lam: the batch's Beta draw; mix_inputs: false = `icm_official` (label sharing), true = `icm_mix`;
        duplicate_weight, zero_alone: official quirks 1 and 2.

    Returns:
        (B, D) inputs and (B, K) float32 targets.
    """
    own = F.one_hot(complementary.long(), num_classes).float()
    other = own[partners]
    weight_j = torch.full((len(partners),), lam, device=inputs.device)
    if duplicate_weight:  # distance 0 between x_i and x_j: the official weight becomes 1 - lam
        same = (inputs == inputs[partners]).all(dim=1)
        weight_j = torch.where(same, torch.full_like(weight_j, 1 - lam), weight_j)
    target = (1 - lam) * own + weight_j.unsqueeze(1) * other
    # the images weigh (1 - lam) and lam whatever quirk 1 does to the labels: a self-pair or a duplicate stays x_i
    mixed = (1 - lam) * inputs + lam * inputs[partners] if mix_inputs else inputs
    alone = ~paired
    if zero_alone:
        target = torch.where(alone.unsqueeze(1), torch.zeros_like(target), target)
        mixed = torch.where(alone.unsqueeze(1), torch.zeros_like(mixed), mixed)
    else:
        target = torch.where(alone.unsqueeze(1), own, target)
        mixed = torch.where(alone.unsqueeze(1), inputs, mixed)
    return mixed, target


def flip_crop(images: torch.Tensor, generator: torch.Generator, shape: tuple[int, int, int] = (1, 28, 28),
              pad: int = 4) -> torch.Tensor:
    """`RandomHorizontalFlip` then `RandomCrop(side, pad, padding_mode='reflect')` per image, batched (the
    official MNIST-family `--data_aug true` and CIFAR 'flipflop' transforms).

    Args:
        images: (B, C*H*W) flat images of `shape` (C, H, W).
    Returns:
        (B, C*H*W), each image flipped with probability 1/2 and cropped at a uniform offset in [0, 2 pad]^2.
    """
    b = images.shape[0]
    c, h, w = shape
    x = images.view(b, c, h, w)
    flips = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flips.to(x.device).view(b, 1, 1, 1), x.flip(-1), x)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    oy, ox = (torch.randint(2 * pad + 1, (b,), generator=generator).to(x.device) for _ in range(2))
    rows = (oy.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = (ox.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    out = padded[torch.arange(b, device=x.device).view(b, 1, 1, 1), torch.arange(c, device=x.device).view(1, c, 1, 1),
                 rows, cols]
    return out.reshape(b, c * h * w)


# ------------------------------------------------------------------------------------------------ methods
class CLLMethod(Method):
    """Shared by the four arms: the loss, the batch layout, the official augmentation, the noise counters.

    The training batch is ``(x (B, 784), target (B, 3))`` with ``target = [cl, y, cluster]`` (papers.icm.data):
    only ``cl`` enters the loss."""

    @dataclass
    class Params:
        loss: str = "scl_nl"  # scl_nl | scl_exp | fwd (the README's commands: scl-nl)
        transition: str = "uniform"  # FWD's Q: uniform (fwd-u) | empirical (fwd-r, from the training CLs)
        augment: bool = True  # quirk 6: --data_aug true in the README's commands
        alpha: float = 0.2  # ICM's Beta(alpha, alpha) (README: --alpha 0.2); Mixup ignores it (official: 1.0)
        duplicate_weight: bool = True  # quirk 1
        zero_alone: bool = True  # quirk 2
        fwd_repeat_target_a: bool = True  # quirk 7

    def __init__(self, params, num_classes, label_smoothing=0.0, task="classification"):
        super().__init__(params, num_classes, label_smoothing, task)
        if task != "classification":
            raise ReproError(f"method {self.name!r} learns classes from complementary labels; it needs a "
                             "complementary-label dataset (papers.icm.data, e.g. fashion_mnist_cll).")
        if label_smoothing:
            raise ReproError(f"method {self.name!r} has no label smoothing (a complementary label is not a class "
                             "target); set train.label_smoothing=0.")
        if self.params.loss not in LOSSES:
            raise ReproError(f"method.loss={self.params.loss!r}: use one of {', '.join(LOSSES)}.")
        if self.params.transition not in ("uniform", "empirical"):
            raise ReproError(f"method.transition={self.params.transition!r}: use uniform or empirical.")
        self.q = uniform_transition(num_classes)
        self.purity = float("nan")
        self.shape = (1, 28, 28)  # (C, H, W) of the flat images, from the data in `prepare`
        self._reset()

    def _reset(self):
        self._acc = None  # (noisy pairs, pairs, rows alone, rows) summed on the device

    def prepare(self, train_dataset, info) -> None:
        targets = getattr(train_dataset, "targets", None)
        if targets is None or not torch.is_tensor(targets) or targets.dim() != 2 or targets.shape[1] != 3:
            raise ReproError(f"method {self.name!r} needs a complementary-label training set ([cl, y, cluster] "
                             "targets): use a *_cll dataset of papers.icm.data.")
        self.purity = float(getattr(train_dataset, "purity", float("nan")))
        if getattr(info, "image_size", None):
            self.shape = (len(info.mean) if info.mean else 1, info.image_size, info.image_size)
        if self.params.transition == "empirical":
            self.q = empirical_transition(targets[:, 1], targets[:, 0], self.num_classes)

    def loss(self, logits, target):
        return cll_loss(logits, target, self.params.loss, self.q)

    def _count(self, noisy: torch.Tensor, paired: torch.Tensor) -> None:
        """Add a batch's pair counts on the device (read once per epoch by `epoch_stats`)."""
        counts = torch.stack([(noisy & paired).sum(), paired.sum(), (~paired).sum(),
                              torch.tensor(len(paired), device=paired.device)]).double()
        self._acc = counts if self._acc is None else self._acc + counts

    def epoch_stats(self):
        stats = {"cluster_purity": self.purity}
        if self._acc is not None:
            noisy, pairs, alone, rows = self._acc.tolist()
            stats.update({"noise_rate": noisy / pairs if pairs else float("nan"), "pairs": pairs,
                          "alone_share": alone / rows})
        self._reset()
        return stats

    def unpack(self, batch, generator):
        inputs, targets = batch
        inputs = inputs.reshape(inputs.shape[0], -1)
        if self.params.augment:
            inputs = flip_crop(inputs, generator, self.shape)
        return inputs, targets[:, 0], targets[:, 1], targets[:, 2]

    def mix(self, images, labels, generator):  # figures: CLL arms have no class targets to show
        return images, F.one_hot(labels.long(), self.num_classes).float()


@register_method("cll_none")
class CLLNone(CLLMethod):
    """The CLL loss of the clean (augmented) batch."""

    def step(self, model, batch, ctx):
        x, cl, _, _ = self.unpack(batch, ctx.generator)
        logits = model(x)
        return {"loss": self.loss(logits, cl).mean(), "logits": logits}


@register_method("cll_mixup")
class CLLMixup(CLLMethod):
    """Mixup for CLL (`mixup_cl_data_count_error`): Beta(1, 1), partners from the whole batch with replacement."""

    def step(self, model, batch, ctx):
        x, cl, y, _ = self.unpack(batch, ctx.generator)
        lam = draw_lam(1.0, ctx.generator)  # the official call leaves alpha at its default 1.0
        partners = batch_partners(x.shape[0], ctx.generator).to(x.device)
        mixed = lam * x + (1 - lam) * x[partners]
        logits = model(mixed)
        second = cl if (self.params.loss == "fwd" and self.params.fwd_repeat_target_a) else cl[partners]
        loss = lam * self.loss(logits, cl).mean() + (1 - lam) * self.loss(logits, second).mean()
        self._count(pair_noise(cl, y, partners), torch.ones_like(cl, dtype=torch.bool))
        return {"loss": loss, "logits": logits}


class ICM(CLLMethod):
    mix_inputs = False

    def step(self, model, batch, ctx):
        x, cl, y, clusters = self.unpack(batch, ctx.generator)
        lam = draw_lam(self.params.alpha, ctx.generator)
        uniforms = torch.rand(x.shape[0], generator=ctx.generator, dtype=torch.float64).to(x.device)
        partners, paired = cluster_partners(clusters, uniforms)
        mixed, target = icm_batch(x, cl, partners, paired, lam, self.num_classes, self.mix_inputs,
                                  self.params.duplicate_weight, self.params.zero_alone)
        logits = model(mixed)
        self._count(pair_noise(cl, y, partners), paired)
        return {"loss": self.loss(logits, target).mean(), "logits": logits}


@register_method("icm_official")
class ICMOfficial(ICM):
    """ICM as the stored code runs it: CLs shared within a cluster, inputs not mixed."""

    mix_inputs = False


@register_method("icm_mix")
class ICMMix(ICM):
    """ICM as the paper describes it: inputs mixed within a cluster, with the labels' weights."""

    mix_inputs = True


def expected_mixup_noise(num_classes: int, batch_size: int | None = None) -> float:
    """The analytic CL-noise rate of Mixup's pairs under uniform CLs and balanced classes (specs/icm.md §6):
    ``2/K - 1/(K(K-1))`` for ``j != i``, times ``1 - 1/B`` when the partner is drawn with replacement."""
    k = num_classes
    rate = 2 / k - 1 / (k * (k - 1))
    return rate * (1 - 1 / batch_size) if batch_size else rate


__all__ = ["ICM", "CLLMixup", "CLLNone", "ICMMix", "ICMOfficial", "batch_partners", "cll_loss", "cluster_partners",
           "empirical_transition", "expected_mixup_noise", "flip_crop", "icm_batch", "pair_noise",
           "uniform_transition"]
