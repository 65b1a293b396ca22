"""FerKD (ICCV 2023) with FKD (ECCV 2022): importing this package registers the `fkd` method and `resnet20_cifar`.

Pure functions named by issue #15: `quantize_soft_labels`, `recover_soft_labels` (FKD's label_quantization and
Recover_soft_label) and `adapt_region_labels` (FerKD's label adaptation).
"""

from papers.ferkd import model  # noqa: F401  (registers resnet20_cifar in timm's registry)
from papers.ferkd.adapt import adapt_region_labels, region_groups, region_scores, softened_ground_truth
from papers.ferkd.labels import (
    RegionLabels,
    load_label_set,
    quantize_soft_labels,
    read_official_file,
    recover_soft_labels,
)
from papers.ferkd.method import FKD, RegionDataset, fkd_mixup_cutmix, fkd_passes, selfmix_partners

__all__ = [
    "FKD", "RegionDataset", "RegionLabels", "adapt_region_labels", "fkd_mixup_cutmix", "fkd_passes",
    "load_label_set", "quantize_soft_labels", "read_official_file", "recover_soft_labels", "region_groups",
    "region_scores", "selfmix_partners", "softened_ground_truth",
]
