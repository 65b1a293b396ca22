"""MEAL V2 (arXiv 2009.08453): ensemble distillation fine-tuning with a logit discriminator. Importing the package
registers the methods ``mealv2`` and ``mealv2_ce``."""

from papers.mealv2.method import (  # noqa: F401
    LogitDiscriminator,
    cutmix_official,
    discriminator_loss,
    discriminator_widths,
    distillation_loss,
    ensemble_targets,
)
