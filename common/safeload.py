"""Loading pickled files without running code: ``torch.load(..., weights_only=True)`` and explicit allow-lists.

A pickle can name any Python callable, which unpickling calls: a run folder or a label file copied in from
another machine could run code when it is resumed, plotted or read. ``weights_only=True`` refuses everything
but tensors, plain containers (dict, list, tuple, str, int, float, bool, None) and what a caller allow-lists.

Used by the trainer's resume (`common.train.load_checkpoint`), the figures (`common.plots`), and the teachers
and label files of distillation papers (`common.teacher`, `papers/ferkd`).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import ReproError

try:  # NumPy >= 2 keeps the array machinery in numpy._core; files pickled by NumPy 1 name numpy.core
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - NumPy 1
    from numpy.core import multiarray as _multiarray

_RECONSTRUCT = _multiarray._reconstruct

# What unpickling a NumPy array needs: the array class, the dtype and its concrete class (rebuilt by BUILD),
# and the reconstructor under both of its names (files written by NumPy 1 say numpy.core.multiarray).
NUMPY_ARRAY_GLOBALS: tuple = (
    np.ndarray,
    np.dtype,
    _RECONSTRUCT,
    (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
)


def numpy_dtype_globals(*dtypes: Any) -> tuple:
    """The dtype classes of `dtypes` (e.g. np.float32), for an allow-list."""
    return tuple(type(np.dtype(d)) for d in dtypes)


# The trainer's checkpoint/last.pt. The trainer now writes tensors and plain containers only (NumPy's RNG
# state as a tensor), so a new checkpoint needs none of this; checkpoints written before issue #16 hold NumPy's
# RNG state (a uint32 array) and maybe NumPy scalars, which these names rebuild without running code.
TRAINER_CHECKPOINT_GLOBALS: tuple = (
    *NUMPY_ARRAY_GLOBALS,
    *numpy_dtype_globals(np.uint32, np.float64, np.float32, np.int64),
    _multiarray.scalar,
)


def safe_load(path: str | Path, allowed: Sequence = (), what: str = "file") -> Any:
    """``torch.load(path, weights_only=True)`` with `allowed` (and nothing else) added to the allow-list.

    Args:
        path: the file.
        allowed: classes and functions the file may name, as `torch.serialization.safe_globals` takes them
            (an object, or ``(object, "module.name")`` for a legacy name).
        what: what the file is, for the messages.

    Returns:
        The loaded object, on the CPU.

    Raises:
        ReproError: the file is missing, or names anything outside the allow-list (it is then not run).
    """
    path = Path(path)
    if not path.is_file():
        raise ReproError(f"{what} {path} does not exist.")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        # keep torch's 'Unsupported global: GLOBAL x.y', drop its advice to allow-list x.y (wrong for an unknown file)
        detail = [detail[0].split(" was not an allowed global")[0]] if detail else detail
        raise ReproError(
            f"refusing to load {what} {path}: it names something outside the allow-list of plain tensors and "
            f"NumPy arrays ({detail[0] if detail else err}). Loading it could run arbitrary code; if it should "
            "hold only arrays, it is corrupt or was not written by the expected tool."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ReproError(f"cannot read {what} {path} ({type(err).__name__}: {err}); re-copy it.") from None
