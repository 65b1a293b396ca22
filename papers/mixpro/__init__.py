from papers.mixpro.method import (
    MaskMixArea,
    MixPro,
    area_target,
    draw_maskmix,
    mask_geometry,
    maskmix_images,
    pal_loss,
    pal_weights,
    pixel_mask,
    token_mask,
)

__all__ = ["MaskMixArea", "MixPro", "area_target", "draw_maskmix", "mask_geometry", "maskmix_images",
           "pal_loss", "pal_weights", "pixel_mask", "token_mask"]
