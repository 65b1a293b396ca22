"""Teachers for distillation papers: safe loading of pickled files, and a frozen teacher from a run or a checkpoint.

A teacher is either

* a **run folder** of the shared trainer (``results/<paper>/<scale>/<experiment>/<method>/seed<k>/``): the
  pipeline trains it like any other run (an experiment config with ``method: erm``), and `load_teacher_run`
  rebuilds its model from the run's ``config.yaml`` and the weights of ``checkpoint/last.pt``; or
* **any timm model plus a local checkpoint** (`load_teacher_checkpoint`): nothing is downloaded at run time.

Every file is read with ``torch.load(..., weights_only=True)``: a pickle can name any Python callable, and
``weights_only`` refuses all but tensors, plain containers and an explicit allow-list (`common.safeload.safe_load`).
The allow-lists name only the NumPy pieces an array or a NumPy RNG state needs.

Shared by FerKD/FKD (`papers/ferkd`) and meant for other distillation papers (MEAL V2): nothing here is
paper-specific.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from common.errors import ReproError

# the safe loader and its allow-lists live in common.safeload (the trainer and the figures use them too)
from common.safeload import (  # noqa: F401  (re-exported: papers/ferkd imports them from here)
    NUMPY_ARRAY_GLOBALS,
    TRAINER_CHECKPOINT_GLOBALS,
    numpy_dtype_globals,
    safe_load,
)


@dataclass
class Teacher:
    """A frozen teacher in eval mode and what its inputs must look like.

    Attributes:
        model: the network (eval mode, no gradients).
        image_size: the side its inputs are resized to (None: the caller's choice).
        mean, std: per-channel normalisation of its inputs.
        description: where it came from (for provenance).
    """

    model: nn.Module
    image_size: int | None
    mean: tuple
    std: tuple
    description: str


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a teacher's BatchNorm statistics and weights never change."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _strip_prefix(state: dict) -> dict:
    """Drop the ``module.`` prefix DataParallel/DDP checkpoints carry (the official FKD teachers have it)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_weights(model: nn.Module, state: dict, origin: str) -> None:
    try:
        model.load_state_dict(_strip_prefix(state))
    except RuntimeError as err:
        raise ReproError(f"the weights in {origin} do not fit the model ({str(err).splitlines()[0]}); check the "
                         "teacher's model name, num_classes and model kwargs.") from None


def load_teacher_run(run_dir: str | Path, use_ema: bool = False) -> tuple[Teacher, Any]:
    """The model of a finished run of the shared trainer, frozen, and the run's resolved config.

    Args:
        run_dir: the run folder (with ``config.yaml``, ``metrics.json`` and ``checkpoint/last.pt``).
        use_ema: take the EMA weights (the run must have trained with ``train.ema_decay``).

    Returns:
        ``(teacher, cfg)``: the teacher (its normalisation and size from the run's data recipe) and the run's
        `RunConfig`.
    """
    from common.config import load_config
    from common.data import build_splits
    from common.models import build_model

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").is_file():
        raise ReproError(f"teacher run {run_dir} has not finished (no metrics.json); train it first (the workflow "
                         "does: its train job is an input of the labelling jobs).")
    checkpoint = run_dir / "checkpoint" / "last.pt"
    if not checkpoint.is_file():
        raise ReproError(f"teacher run {run_dir} has no {checkpoint.relative_to(run_dir)} on this machine "
                         "(checkpoints are not committed): delete its metrics.json and run the workflow again to "
                         "retrain it here.")
    cfg = load_config(run_dir / "config.yaml")
    state = safe_load(checkpoint, TRAINER_CHECKPOINT_GLOBALS, what="teacher checkpoint")
    weights = state.get("ema") if use_ema else state.get("model")
    if weights is None:
        raise ReproError(f"{checkpoint} holds no {'EMA ' if use_ema else ''}model weights.")
    d = cfg.data
    # the run's own data recipe decides the teacher's normalisation and input size
    _, _, _, info = build_splits(d.name, root=d.root, recipe=d.recipe, allow_download=False, image_size=d.image_size)
    model = build_model(cfg.model.name, num_classes=info.num_classes, **cfg.model.kwargs)
    _load_weights(model, weights, str(checkpoint))
    teacher = Teacher(freeze(model), info.image_size, tuple(info.mean), tuple(info.std),
                      f"run:{run_dir} ({cfg.model.name}, {cfg.data.name}/{info.recipe})")
    return teacher, cfg


def load_teacher_checkpoint(model_name: str, checkpoint: str | Path, num_classes: int, image_size: int | None,
                            mean: Sequence[float], std: Sequence[float], model_kwargs: dict | None = None) -> Teacher:
    """Any timm model (or one of ours registered in timm) with the weights of a local checkpoint, frozen.

    Args:
        model_name: timm name, e.g. ``tf_efficientnet_l2_ns_475``; built with ``pretrained=False``.
        checkpoint: a ``torch.save`` of the state dict, or of a dict holding it under ``state_dict`` or
            ``model`` (``module.`` prefixes are dropped); read with ``weights_only=True``.
        num_classes: the classifier size.
        image_size: the teacher's input side.
        mean, std: its input normalisation.
        model_kwargs: more arguments for `timm.create_model`.
    """
    from common.models import build_model

    model = build_model(model_name, num_classes=num_classes, **(model_kwargs or {}))
    path = load_checkpoint_weights(model, checkpoint, what="teacher checkpoint")
    return Teacher(freeze(model), image_size, tuple(mean), tuple(std), f"checkpoint:{path} ({model_name})")


def load_checkpoint_weights(model: nn.Module, checkpoint: str | Path, what: str = "checkpoint") -> Path:
    """Load the state dict of a local checkpoint file into `model` (a teacher's, or a student's starting weights).

    Args:
        model: the network, already built with the checkpoint's architecture and classifier size.
        checkpoint: a ``torch.save`` of the state dict, or of a dict holding it under ``state_dict``, ``model`` or
            ``state_dict_ema`` (``module.`` prefixes are dropped); read with ``weights_only=True``.
        what: the file's role, for the error messages.

    Returns:
        The resolved path.
    """
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise ReproError(f"{what} {path} does not exist; put the weights there (nothing is downloaded at run time) "
                         "or change the config's checkpoint path.")
    state = safe_load(path, NUMPY_ARRAY_GLOBALS, what=what)
    if isinstance(state, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ReproError(f"{path} holds a {type(state).__name__}, not a state dict.")
    _load_weights(model, state, str(path))
    return path
