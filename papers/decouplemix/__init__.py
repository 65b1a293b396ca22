from papers.decouplemix.method import (
    DecoupleCutMix,
    DecoupleMixup,
    DecoupleResizeMix,
    decoupled_ce,
    decoupled_mix_loss,
    decoupled_mix_terms,
    eta_weights,
    lambda_adjust,
)

__all__ = [
    "DecoupleCutMix",
    "DecoupleMixup",
    "DecoupleResizeMix",
    "decoupled_ce",
    "decoupled_mix_loss",
    "decoupled_mix_terms",
    "eta_weights",
    "lambda_adjust",
]
