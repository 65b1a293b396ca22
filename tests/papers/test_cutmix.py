"""CutMix preset against the official computation (clovaai/CutMix-PyTorch `train.py`: the
``if args.beta > 0 and r < args.cutmix_prob`` branch, `rand_bbox` and its loss).

The official code draws the gate, lam and box centre from NumPy and the permutation from torch's global
generator; we draw all of them from the run's generator. On fixed draws (ours, read back from the same
generator) the step must compute exactly what the official branch computes, written out below line by line.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.methods import StepContext, build_method

K, B, C, H, W = 10, 8, 3, 12, 9  # H != W so a swapped axis shows


class Recorder(torch.nn.Module):
    """A linear classifier on the flattened image that keeps the last input it saw."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(C * H * W, K)
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.fc(x.flatten(1))


def official_rand_bbox(size, lam, centre_dim2, centre_dim3):
    """`rand_bbox(input.size(), lam)` with its two `np.random.randint` draws given. The official names are
    W = size[2], H = size[3] (so its 'x' runs along dim 2, the rows); the first centre drawn is along dim 2."""
    dim2, dim3 = size[2], size[3]
    cut_rat = np.sqrt(1.0 - lam)
    cut_2, cut_3 = int(dim2 * cut_rat), int(dim3 * cut_rat)
    b1 = np.clip(centre_dim2 - cut_2 // 2, 0, dim2)
    c1 = np.clip(centre_dim3 - cut_3 // 2, 0, dim3)
    b2 = np.clip(centre_dim2 + cut_2 // 2, 0, dim2)
    c2 = np.clip(centre_dim3 + cut_3 // 2, 0, dim3)
    return int(b1), int(c1), int(b2), int(c2)


def official_cutmix(x, y, mixed, lam, index, centre, model):
    """The official training step's input and loss (criterion = nn.CrossEntropyLoss()), given the gate outcome
    `mixed`, lam, the permutation and the box centre instead of drawing them."""
    x = x.clone()
    if not mixed:
        pred = model(x)
        return x, F.cross_entropy(pred, y)
    target_a, target_b = y, y[index]
    b1, c1, b2, c2 = official_rand_bbox(x.size(), lam, *centre)
    x[:, :, b1:b2, c1:c2] = x[index, :, b1:b2, c1:c2]
    lam = 1 - ((b2 - b1) * (c2 - c1) / (x.size()[-1] * x.size()[-2]))  # the pasted area's exact ratio
    pred = model(x)
    return x, F.cross_entropy(pred, target_a) * lam + F.cross_entropy(pred, target_b) * (1.0 - lam)


def test_step_is_the_official_cutmix_on_fixed_draws():
    method = build_method({"name": "cutmix"}, num_classes=K)
    branches = set()
    for seed in range(12):
        torch.manual_seed(100 + seed)
        x, y = torch.randn(B, C, H, W), torch.randint(0, K, (B,))
        model = Recorder()
        draws = method.draw(torch.Generator().manual_seed(seed), B, (H, W))
        mixed = bool(draws.lam[0] < 1.0)  # the gate r < cutmix_prob (an un-gated batch keeps lam = 1)
        branches.add(mixed)
        assert bool(draws.use_cutmix.all())  # CutMix only, never Mixup
        lam, index = float(draws.lam[0]), draws.partner
        centre = (int(draws.cy[0]), int(draws.cx[0]))  # (row, column) = (official dim-2, dim-3 centre)

        ctx = StepContext(epoch=0, step=0, progress=0.0, generator=torch.Generator().manual_seed(seed))
        out = method.step(model, (x, y), ctx)
        ours_x = model.seen
        official_x, official_loss = official_cutmix(x, y, mixed, lam, index, centre, model)
        assert torch.equal(ours_x, official_x), f"seed {seed}"
        assert float(out["loss"].detach()) == pytest.approx(float(official_loss.detach()), rel=1e-5), f"seed {seed}"
    assert branches == {True, False}  # both the CutMix branch and the clean batch were compared


def test_gate_and_lambda_law():
    """cutmix_prob 0.5 (CIFAR): half the batches mixed; on those, lam ~ Beta(1, 1) = U(0, 1), centres uniform."""
    method = build_method({"name": "cutmix"}, num_classes=K)
    generator = torch.Generator().manual_seed(0)
    draws = [method.draw(generator, B, (H, W)) for _ in range(4000)]
    lams = np.array([float(d.lam[0]) for d in draws])
    gated = lams < 1.0
    assert abs(gated.mean() - 0.5) < 3 * math.sqrt(0.25 / 4000)
    assert abs(lams[gated].mean() - 0.5) < 0.02 and abs(lams[gated].var() - 1 / 12) < 0.008
    rows = np.array([int(d.cy[0]) for d in draws])
    assert rows.min() == 0 and rows.max() == H - 1 and abs(rows.mean() - (H - 1) / 2) < 0.2
