from papers.cutmix.method import CutMix

__all__ = ["CutMix"]
