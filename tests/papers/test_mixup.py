"""Mixup preset against the official computation (facebookresearch/mixup-cifar10 `train.py`).

The official `mixup_data` draws lam from NumPy and the permutation from torch's global generator; we draw both
from the run's generator. On fixed draws (ours, read back from the same generator) the step must compute exactly
what `mixup_data` + `mixup_criterion` compute, written out below line by line.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.methods import StepContext, build_method

K, B, C, H, W = 10, 8, 3, 6, 5  # H != W so a swapped axis shows


class Recorder(torch.nn.Module):
    """A linear classifier on the flattened image that keeps the last input it saw."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(C * H * W, K)
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.fc(x.flatten(1))


def official_mixup(x, y, lam, index, model):
    """`mixup_data` then `mixup_criterion(nn.CrossEntropyLoss(), ...)` of the official train.py, given lam and
    the permutation instead of drawing them."""
    mixed_x = lam * x + (1 - lam) * x[index, :]
    y_a, y_b = y, y[index]
    pred = model(mixed_x)
    loss = lam * F.cross_entropy(pred, y_a) + (1 - lam) * F.cross_entropy(pred, y_b)
    return mixed_x, loss


@pytest.mark.parametrize("seed", range(6))
def test_step_is_the_official_mixup_on_fixed_draws(seed):
    method = build_method({"name": "mixup"}, num_classes=K)
    torch.manual_seed(100 + seed)
    x, y = torch.randn(B, C, H, W), torch.randint(0, K, (B,))
    model = Recorder()
    # the draws the step will take: same generator, same seed
    draws = method.draw(torch.Generator().manual_seed(seed), B, (H, W))
    lam, index = float(draws.lam[0]), draws.partner
    assert 0.0 < lam < 1.0 and not bool(draws.use_cutmix.any())  # every batch mixed (no gate), Mixup only
    assert sorted(index.tolist()) == list(range(B))  # a permutation, as torch.randperm(batch_size)

    ctx = StepContext(epoch=0, step=0, progress=0.0, generator=torch.Generator().manual_seed(seed))
    out = method.step(model, (x, y), ctx)
    ours_x = model.seen
    official_x, official_loss = official_mixup(x, y, lam, index, model)
    assert torch.allclose(ours_x, official_x, atol=1e-6)
    assert float(out["loss"].detach()) == pytest.approx(float(official_loss.detach()), rel=1e-5)


def test_lambda_law_is_beta_alpha_alpha():
    """lam ~ Beta(1, 1) = U(0, 1) with the official CIFAR alpha: mean 1/2, variance 1/12."""
    method = build_method({"name": "mixup"}, num_classes=K)
    generator = torch.Generator().manual_seed(0)
    lams = np.array([float(method.draw(generator, B, (H, W)).lam[0]) for _ in range(4000)])
    assert abs(lams.mean() - 0.5) < 0.015 and abs(lams.var() - 1 / 12) < 0.006
