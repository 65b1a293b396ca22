"""LSTNet, the time-series regressor of C-Mixup's Exchange-Rate and Electricity experiments.

LSTNet: Lai, Chang, Yang, Liu, "Modeling Long- and Short-Term Temporal Patterns with Deep Neural Networks"
(SIGIR 2018, arXiv 1703.07015). C-Mixup uses its own copy, `Learner_TimeSeries` in huaxiuyao/C-Mixup
`src/models.py` (0b88fb3), with the settings of `src/config.py` ('TimeSeries-exchange_rate',
'TimeSeries-electricity'). Registered into timm as `lstnet`: `timm.create_model("lstnet", num_classes=m)`.

Forward, for a window `x: (B, P, m)` of `m` series:

1. conv block: `Conv2d(1, hid_cnn, (cnn_kernel, m))` over the window, ReLU, dropout -> `c: (B, hid_cnn, T)`,
   `T = P - cnn_kernel + 1`;
2. GRU(hid_cnn -> hid_rnn) over the `T` steps, last hidden state, dropout -> `(B, hid_rnn)`;
3. skip-GRU(hid_cnn -> hid_skip) over the last `pt * skip` steps, `pt = (P - cnn_kernel) // skip`: one
   sequence of `pt` steps per phase `j < skip` (steps `j, j + skip, ...`), last hidden states concatenated
   (phase-major), dropout -> `(B, skip * hid_skip)`;
4. `Linear(hid_rnn + skip * hid_skip, m)` on [2; 3];
5. highway: a linear autoregression over the last `highway_window` values, one `Linear(highway_window, 1)`
   shared by every series, added to 4;
6. output function: identity by default (`output_fun` None in 'exchange_rate' and 'Linear' in 'electricity':
   the official code maps only 'sigmoid' and 'tanh'), else sigmoid / tanh.

Manifold mixup (`Learner_TimeSeries.forward_mixup`) mixes the conv block's output (after ReLU and dropout,
each input through its own dropout mask) and feeds the mix to both GRUs; the highway sees the mixed raw window
`lam x1 + (1 - lam) x2`. C-Mixup's method (papers/cmixup/method.py) mixes `block_1(x)` and finishes with
`forward_head(block_2(h))`, so `block_1` returns the mixing state as one flat tensor: the conv features and
the last `highway_window` input steps, side by side. Mixing it mixes both exactly as the official code does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.models import ModelArgumentError, _entry_kwargs, register_model_once

__all__ = ["LSTNet", "lstnet"]

OUTPUT_FUNCTIONS = {None: None, "linear": None, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


class LSTNet(nn.Module):
    """LSTNet as C-Mixup's `Learner_TimeSeries` (conv, GRU, skip-GRU, highway), vectorised over the batch.

    Args:
        num_classes: Number of series `m` (input width and output dimension; the trainer passes the
            dataset's output dimension).
        hid_cnn: Conv channels (`hidCNN`: 50 Exchange-Rate, 100 Electricity).
        hid_rnn: GRU hidden size (`hidRNN`: 50 / 100).
        hid_skip: Skip-GRU hidden size (`hidSkip`: 5).
        cnn_kernel: Conv kernel height in time steps (`CNN_kernel`: 6).
        skip: Period of the skip-GRU (`skip`: 24); 0 disables it.
        highway_window: Steps of the highway autoregression (`highway_window`: 24); 0 disables it.
        drop_rate: Dropout after the conv block and after each GRU (`dropout`: 0.2).
        output_fun: None / 'linear' (identity), 'sigmoid' or 'tanh' (`output_fun`).
    """

    def __init__(
        self,
        num_classes: int,
        hid_cnn: int = 100,
        hid_rnn: int = 100,
        hid_skip: int = 5,
        cnn_kernel: int = 6,
        skip: int = 24,
        highway_window: int = 24,
        drop_rate: float = 0.2,
        output_fun: str | None = None,
    ):
        super().__init__()
        fun = output_fun.lower() if isinstance(output_fun, str) else output_fun
        if fun not in OUTPUT_FUNCTIONS:
            raise ModelArgumentError(
                f"lstnet output_fun must be null, 'linear', 'sigmoid' or 'tanh', got {output_fun!r}."
            )
        if num_classes < 1 or min(hid_cnn, hid_rnn, cnn_kernel) < 1 or min(skip, highway_window) < 0:
            raise ModelArgumentError(
                f"lstnet needs num_classes (series) >= 1, hid_cnn, hid_rnn, cnn_kernel >= 1 and skip, "
                f"highway_window >= 0; got num_classes={num_classes}, hid_cnn={hid_cnn}, hid_rnn={hid_rnn}, "
                f"cnn_kernel={cnn_kernel}, skip={skip}, highway_window={highway_window}."
            )
        if skip > 0 and hid_skip < 1:
            raise ModelArgumentError(f"lstnet hid_skip must be >= 1 when skip > 0, got {hid_skip}.")
        self.num_series = self.num_classes = num_classes
        self.hid_cnn, self.hid_rnn, self.hid_skip = hid_cnn, hid_rnn, hid_skip
        self.cnn_kernel, self.skip, self.highway_window = cnn_kernel, skip, highway_window
        self.output_fun = fun if OUTPUT_FUNCTIONS[fun] is not None else None  # 'linear' is the identity
        self.conv = nn.Conv2d(1, hid_cnn, kernel_size=(cnn_kernel, num_classes))
        self.dropout = nn.Dropout(drop_rate)
        self.gru = nn.GRU(hid_cnn, hid_rnn)  # sequence-first, as the official (T, B, C) permute
        self.gru_skip = nn.GRU(hid_cnn, hid_skip) if skip > 0 else None
        self.num_features = self.head_hidden_size = hid_rnn + skip * hid_skip
        self.head = nn.Linear(self.num_features, num_classes)  # official `linear1`
        self.highway = nn.Linear(highway_window, 1) if highway_window > 0 else None

    # ------------------------------------------------------------------------------------------ the parts
    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, P, m) windows. Returns: (B, hid_cnn, T) after ReLU and dropout, T = P - kernel + 1."""
        shortest = max(self.cnn_kernel, self.highway_window)
        if x.dim() != 3 or x.shape[2] != self.num_series or x.shape[1] < shortest:
            raise ModelArgumentError(
                f"lstnet expects windows (B, P, {self.num_series}) with P >= max(cnn_kernel, highway_window) "
                f"= {shortest}, got {tuple(x.shape)}."
            )
        c = F.relu(self.conv(x.unsqueeze(1)))  # (B, hid_cnn, T, 1)
        return self.dropout(c.squeeze(3))

    def skip_periods(self, steps: int) -> int:
        """`pt`: whole periods the skip-GRU reads, `int((P - cnn_kernel) / skip)` of the official code."""
        window = steps + self.cnn_kernel - 1
        periods = (window - self.cnn_kernel) // self.skip
        if periods < 1:
            raise ModelArgumentError(
                f"lstnet skip-GRU needs window - cnn_kernel >= skip ({window} - {self.cnn_kernel} < "
                f"{self.skip}); use a longer window or a smaller skip (skip=0 disables it)."
            )
        return periods

    def recurrent_features(self, c: torch.Tensor) -> torch.Tensor:
        """Args: c: (B, hid_cnn, T). Returns: (B, hid_rnn + skip * hid_skip): [GRU state; skip-GRU states]."""
        _, h = self.gru(c.permute(2, 0, 1))  # (T, B, hid_cnn) -> last state (1, B, hid_rnn)
        r = self.dropout(h.squeeze(0))
        if self.gru_skip is None:
            return r
        batch, periods = c.shape[0], self.skip_periods(c.shape[2])
        s = c[:, :, c.shape[2] - periods * self.skip :]  # the last pt * skip steps
        # step t = i * skip + j  ->  sequence (b, j), time i: (pt, B * skip, hid_cnn)
        s = s.reshape(batch, self.hid_cnn, periods, self.skip).permute(2, 0, 3, 1)
        _, hs = self.gru_skip(s.reshape(periods, batch * self.skip, self.hid_cnn))
        s = self.dropout(hs.reshape(batch, self.skip * self.hid_skip))  # phase-major per example
        return torch.cat([r, s], dim=1)

    def highway_term(self, tail: torch.Tensor) -> torch.Tensor:
        """Linear AR shared by the series. Args: tail: (B, highway_window, m). Returns: (B, m)."""
        z = self.highway(tail.transpose(1, 2))  # (B, m, highway_window) -> (B, m, 1)
        return z.squeeze(2)

    def _finish(self, c: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor:
        out = self.head(self.recurrent_features(c))
        if self.highway is not None:
            out = out + self.highway_term(tail)
        return out if self.output_fun is None else OUTPUT_FUNCTIONS[self.output_fun](out)

    # ------------------------------------------------ the C-Mixup manifold hook (block_1 / block_2 / head)
    def block_1(self, x: torch.Tensor) -> torch.Tensor:
        """The manifold-mixup state (B, hid_cnn * T + highway_window * m): [conv features; last steps of x].

        Mixing two states mixes the conv features (the official mixing point) and the raw steps the
        highway reads (the official highway input `lam x1 + (1 - lam) x2`)."""
        c = self.conv_features(x)
        parts = [c.flatten(1)]
        if self.highway is not None:
            parts.append(x[:, x.shape[1] - self.highway_window :, :].flatten(1))
        return torch.cat(parts, dim=1)

    def block_2(self, h: torch.Tensor) -> torch.Tensor:
        """Args: h: (B, D) state of `block_1` (possibly mixed). Returns: (B, m) predictions."""
        tail_size = self.highway_window * self.num_series if self.highway is not None else 0
        conv_size = h.shape[1] - tail_size
        if conv_size <= 0 or conv_size % self.hid_cnn:
            raise ModelArgumentError(
                f"lstnet block_2 got a state of width {h.shape[1]}, not one from block_1."
            )
        c = h[:, :conv_size].reshape(h.shape[0], self.hid_cnn, conv_size // self.hid_cnn)
        tail = (
            h[:, conv_size:].reshape(h.shape[0], self.highway_window, self.num_series) if tail_size else None
        )
        return self._finish(c, tail)

    def forward_head(self, out: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Identity: LSTNet's output layer and output function already ran in `block_2`."""
        return out

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, P, m) windows (max-abs scaled series). Returns: (B, m) next values, horizon ahead."""
        tail = x[:, x.shape[1] - self.highway_window :, :] if self.highway is not None else None
        return self._finish(self.conv_features(x), tail)


_LSTNET_ARGS = (
    "num_classes",
    "hid_cnn",
    "hid_rnn",
    "hid_skip",
    "cnn_kernel",
    "skip",
    "highway_window",
    "drop_rate",
    "output_fun",
)


@register_model_once
def lstnet(
    pretrained: bool = False,
    num_classes: int = 8,
    hid_cnn: int = 100,
    hid_rnn: int = 100,
    hid_skip: int = 5,
    cnn_kernel: int = 6,
    skip: int = 24,
    highway_window: int = 24,
    drop_rate: float = 0.2,
    output_fun: str | None = None,
    **kwargs: Any,
) -> LSTNet:
    """LSTNet for `num_classes` series; defaults are C-Mixup's Electricity settings (`src/config.py`)."""
    _entry_kwargs("lstnet", pretrained, kwargs, _LSTNET_ARGS)
    return LSTNet(
        num_classes, hid_cnn, hid_rnn, hid_skip, cnn_kernel, skip, highway_window, drop_rate, output_fun
    )
