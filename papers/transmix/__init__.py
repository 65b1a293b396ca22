from papers.transmix.method import TransMix, cutmix_box, transmix_target, transmix_weights

__all__ = ["TransMix", "cutmix_box", "transmix_target", "transmix_weights"]
