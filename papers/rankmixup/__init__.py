from papers.rankmixup.method import MNDCG, MRL, draw_copies, mix_copies, mndcg_loss, mrl_loss

__all__ = ["MNDCG", "MRL", "draw_copies", "mix_copies", "mndcg_loss", "mrl_loss"]
