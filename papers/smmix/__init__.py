"""SMMix (ICCV 2023): importing this package registers the `smmix` method and its token-head ViTs in timm."""

from papers.smmix import model  # noqa: F401  (registers smmix_* models in timm's registry)
from papers.smmix.method import (
    SMMix,
    consistency_target,
    draw_smmix,
    mix_windows,
    motivating_pass,
    select_windows,
    smmix_loss,
    smmix_targets,
    window_scores,
    window_sizes,
    window_tokens,
)

__all__ = [
    "SMMix", "consistency_target", "draw_smmix", "mix_windows", "motivating_pass", "select_windows", "smmix_loss",
    "smmix_targets", "window_scores", "window_sizes", "window_tokens",
]
