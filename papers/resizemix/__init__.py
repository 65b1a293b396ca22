from papers.resizemix import model  # noqa: F401  (registers shake_shake26_2x96d_cifar into timm)
from papers.resizemix.method import (
    ResizeMix,
    openmixup_box,
    openmixup_images,
    resizemix_boxes,
    resizemix_images,
    shrunk_hw,
)

__all__ = [
    "ResizeMix",
    "openmixup_box",
    "openmixup_images",
    "resizemix_boxes",
    "resizemix_images",
    "shrunk_hw",
]
