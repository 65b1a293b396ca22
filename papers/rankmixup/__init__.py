from papers.rankmixup import model  # noqa: F401  (registers resnet50_cifar and resnet50_tiny into timm)
from papers.rankmixup.method import MNDCG, MRL, draw_copies, mix_copies, mndcg_loss, mrl_loss

__all__ = ["MNDCG", "MRL", "draw_copies", "mix_copies", "mndcg_loss", "mrl_loss"]
