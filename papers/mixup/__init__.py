from papers.mixup.method import Mixup

__all__ = ["Mixup"]
