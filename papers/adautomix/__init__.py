"""Adversarial AutoMixup (ICLR 2024): importing registers the `adautomix` method."""

from papers.adautomix import method  # noqa: F401
