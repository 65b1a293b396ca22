"""mixup: Beyond Empirical Risk Minimization (Zhang, Cisse, Dauphin, Lopez-Paz; ICLR 2018, arXiv 1710.09412).

Official code: facebookresearch/mixup-cifar10, `train.py` (`mixup_data`, `mixup_criterion`); this step
mirrors it. Per batch: lam ~ Beta(alpha, alpha); partner = a random permutation (fixed points allowed,
such a row stays un-mixed); x_mix = lam * x + (1 - lam) * x[perm]; loss = lam * CE(z, y) +
(1 - lam) * CE(z, y[perm]), computed as one soft-target cross-entropy (equal, since CE is linear in the
target; tested). Every batch is mixed; no label smoothing (train.label_smoothing would go into the target).

Deviation: draws come from the run's torch generator, not NumPy's and torch's global generators, so
runs are reproducible per seed; the law is the same.
"""

from dataclasses import dataclass

from common.methods import MixCutMix, register_method


@register_method("mixup")
class Mixup(MixCutMix):
    @dataclass
    class Params(MixCutMix.Params):
        mixup_alpha: float = 1.0  # alpha = 1 on CIFAR (official train.py default)
        cutmix_alpha: float = 0.0
        prob: float = 1.0  # no gate: every batch is mixed
        partner: str = "randperm"  # torch.randperm(batch_size) in mixup_data
