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

__all__ = [
    "CMixup",
    "CMixupWithinBatch",
    "ManifoldMixupRegression",
    "MixupRegression",
    "official_draws",
    "pair_probabilities",
    "pair_probability_rows",
    "sample_partners",
]
