from papers.icm import data  # noqa: F401  (registers fashion_mnist_cll, mnist_cll, kmnist_cll and the -mini sample)
from papers.icm.method import (
    CLLMixup,
    CLLNone,
    ICMMix,
    ICMOfficial,
    batch_partners,
    cll_loss,
    cluster_partners,
    expected_mixup_noise,
    flip_crop,
    icm_batch,
    pair_noise,
)
from papers.icm.model import MLPCLL, mlp_cll

__all__ = [
    "MLPCLL",
    "CLLMixup",
    "CLLNone",
    "ICMMix",
    "ICMOfficial",
    "batch_partners",
    "cll_loss",
    "cluster_partners",
    "expected_mixup_noise",
    "flip_crop",
    "icm_batch",
    "mlp_cll",
    "pair_noise",
]
