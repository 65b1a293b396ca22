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
