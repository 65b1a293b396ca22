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
from papers.cmixup.lstnet import LSTNet, lstnet  # registers `lstnet` into timm

__all__ = [
    "CMixup",
    "CMixupWithinBatch",
    "LSTNet",
    "ManifoldMixupRegression",
    "MixupRegression",
    "lstnet",
    "official_draws",
    "pair_probabilities",
    "pair_probability_rows",
    "sample_partners",
]
