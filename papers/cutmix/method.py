"""CutMix: Regularization Strategy to Train Strong Classifiers with Localizable Features.

Yun, Han, Oh, Chun, Choe, Yoo; ICCV 2019, arXiv 1905.04899. Official code: clovaai/CutMix-PyTorch,
`train.py` (the `if args.beta > 0 and r < args.cutmix_prob` branch and `rand_bbox`); this step mirrors it.
Per batch: gate r ~ U(0, 1), mix iff r < cutmix_prob (0.5 on CIFAR, 1.0 on ImageNet); lam ~ Beta(1, 1);
partner = a random permutation; one box for the batch with side floor(size * sqrt(1 - lam)) centred at a
uniform pixel (row drawn first), clipped; the box content comes from the partner; label weight
lam_c = 1 - box area / image area. Un-gated batches use plain CE on clean images.

Deviation: draws come from the run's torch generator instead of NumPy's and torch's global ones.
"""

from dataclasses import dataclass

from common.methods import MixCutMix, register_method


@register_method("cutmix")
class CutMix(MixCutMix):
    @dataclass
    class Params(MixCutMix.Params):
        mixup_alpha: float = 0.0
        cutmix_alpha: float = 1.0  # --beta 1.0 in every official setting
        prob: float = 0.5  # --cutmix_prob 0.5 on CIFAR (1.0 for ImageNet)
        partner: str = "randperm"  # torch.randperm in train.py
