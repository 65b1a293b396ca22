from papers.cmixup import data  # noqa: F401  (registers NO2, the time series, Crime and SkillCraft)
from papers.cmixup.baselines import KMixup, LocalMixup, kmixup_partners, local_weights, optimal_assignment
from papers.cmixup.dti import DTIEncoder, dti_encoder  # registers `dti_encoder` (DTI) into timm
from papers.cmixup.lstnet import LSTNet, lstnet  # registers `lstnet` into timm
from papers.cmixup.method import (
    CMixup,
    CMixupWithinBatch,
    ManifoldMixupRegression,
    MixupRegression,
    official_draws,
    pair_probabilities,
    pair_probability_rows,
    sample_partners,
)
from papers.cmixup.mlp import RegressionMLP, mlp_regression  # noqa: F401  (registers `mlp_regression` into timm)
from papers.cmixup.poverty import (
    resnet18_poverty,  # registers `poverty` (WILDS PovertyMap) and `resnet18_poverty`
)
from papers.cmixup.resnet_rcf import (  # registers `resnet18_rcf` (RCF-MNIST) into timm
    RCFResNet18,
    resnet18_rcf,
)

__all__ = [
    "CMixup",
    "CMixupWithinBatch",
    "DTIEncoder",
    "KMixup",
    "LSTNet",
    "LocalMixup",
    "ManifoldMixupRegression",
    "MixupRegression",
    "RCFResNet18",
    "dti_encoder",
    "kmixup_partners",
    "local_weights",
    "lstnet",
    "official_draws",
    "optimal_assignment",
    "pair_probabilities",
    "pair_probability_rows",
    "resnet18_poverty",
    "resnet18_rcf",
    "sample_partners",
]
