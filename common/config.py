"""Run configuration: typed defaults in dataclasses, YAML files, dotted command-line overrides.

An experiment file (``papers/<paper>/configs/<scale>/<experiment>.yaml``) holds only the values that
differ from the defaults below, plus the grid the workflow expands: ``methods`` (label -> method
options) and ``seeds``. One training run is one (experiment, method label, seed); its resolved config
keeps a single ``method`` and ``seed`` and is what gets hashed and saved next to the results.

Unknown or misspelt keys are errors that name the closest valid key (timm's YAML-into-argparse
accepts them silently, which is how the released TransMix DeiT-S config lost its switch probability).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.errors import ReproError, closest


@dataclass
class DataConfig:
    name: str = "cifar10-mini"
    root: str | None = None  # local folder; else $REPRO_DATA_DIR/<name>; else the public source
    recipe: str = "default"  # train/eval transforms: pad_crop_flip (= cifar), mixup_official, deit, ... (common.data)
    image_size: int | None = None  # resize target for recipes that support it (deit)
    allow_download: bool = True
    num_workers: int = 2
    # fast path for CIFAR/Tiny-ImageNet-sized data: decode once to a cached uint8 tensor held on the device, augment
    # there (common/fastdata.py); same augmentation law as the standard DataLoader path
    device_cache: bool = False
    val_split: int = 0  # hold out this many training examples as the evaluation split
    val_per_class: bool = False  # the same number from every class (RankMixup's Tiny-ImageNet split)
    split_seed: int | None = 0  # null: the run's seed (a new split per seed, as C-Mixup's official code)
    # repeated augmentation (DeiT's RASampler, through timm's RepeatAugSampler): each drawn image appears this many
    # times in a row, spread over the processes; an epoch keeps floor(N / 256) * 256 samples in all. 0: off (DeiT: 3)
    repeated_aug: int = 0
    # false: every epoch takes the training batches in dataset order (C-Mixup's out-of-distribution datasets,
    # algorithm.train: no shuffle when is_ood); one process, standard DataLoader only
    shuffle: bool = True
    # the dataset's own options, passed to its registered builder (ICM: complementary-label setting, clusters);
    # a builder that takes none, or an option it does not know, is an error naming what it accepts
    options: dict = field(default_factory=dict)


@dataclass
class ModelConfig:
    name: str = "preact_resnet18_cifar"  # any timm name, or one of ours registered into timm
    kwargs: dict = field(default_factory=dict)  # passed to timm.create_model (drop_path_rate, depth, ...)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw | adam (L2 added to the gradient, torch.optim.Adam's weight_decay)
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # exclude 1-D params (biases, norms) and model.no_weight_decay() (pos_embed, cls_token) from decay
    no_decay_1d: bool = False
    # a fresh optimiser state (moments, step count) at the start of every epoch: ICM's official train_icm
    # re-creates Adam inside its epoch loop
    reset_each_epoch: bool = False


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | multistep | constant
    per: str = "step"  # update the lr every optimiser step or only at epoch starts (timm's default)
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    milestones: list = field(default_factory=list)  # epochs after which lr *= gamma: m -> 0-based epoch m on (multistep)
    gamma: float = 0.1
    # cosine only: the last cooldown_epochs of train.epochs run at min_lr after the cosine ends, as timm's train.py
    # with --cooldown-epochs (its --epochs 300 --cooldown-epochs 10 is train.epochs 310, cooldown_epochs 10 here)
    cooldown_epochs: float = 0.0
    # cosine only: warm-up first, then a cosine over the remaining train.epochs - warmup_epochs (timm's
    # warmup_prefix=True; ResizeMix's CosineRestartAnnealingLR); false: the warm-up overlaps the cosine's start
    warmup_prefix: bool = False


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 128  # per process; global batch = batch_size * processes * grad_accum
    grad_accum: int = 1
    clip_grad: float | None = None  # max global gradient norm
    label_smoothing: float = 0.0  # applied by the method (in the target or in the loss)
    precision: str = "no"  # no | bf16 | fp16 (through Accelerate)
    ema_decay: float | None = None  # EMA of weights; evaluated beside the model when set
    checkpoint_every: int = 1  # epochs; the last epoch is always checkpointed
    eval_every: int = 1  # epochs; the last epoch is always evaluated
    max_steps_per_epoch: int | None = None  # cap batches per epoch (smoke runs and benchmarks)
    eval_batch_size: int | None = None
    compile: bool = False  # torch.compile the model (GPU runs; the first epoch pays the compilation)
    channels_last: bool = False  # channels-last memory format for convolutional nets on GPUs
    # multi-GPU: let DDP skip parameters that got no gradient this step (a head only some steps use, as SMMix's
    # token head on Mixup steps); costs an extra graph traversal per step, so off unless a model needs it
    find_unused_parameters: bool = False
    # processes the run trains with (batch_size is per process, and every random stream is drawn per process, so
    # another count is another run). null: the number launched, recorded here by the trainer (and by the workflow
    # from resources.gpus) before the config is hashed and saved; a number: the launch must have exactly that many
    world_size: int | None = None
    # model selection: 'last' epoch, or the epoch with the best validation metric (needs a validation
    # split); the test metrics of the selected epoch are reported under metrics.json 'selected'
    select: str = "last"
    select_metric: str | None = None  # default: the task's primary metric (top1, or rmse for regression)
    select_ties: str = "later"  # a tie with the best so far moves the selection to the later epoch (<=)


@dataclass
class ResourcesConfig:
    """What one run needs from a scheduler; read by the workflow, ignored by the trainer."""

    gpus: int = 0
    cpus: int = 2
    mem_mb: int = 8000
    runtime_min: int = 60


@dataclass
class RunConfig:
    paper: str = ""
    experiment: str = ""
    scale: str = "smoke"
    seed: int = 0
    output_dir: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    method: dict = field(default_factory=lambda: {"name": "erm"})  # validated by the method's Params
    # the workflow's grid; a single run never carries these in its resolved config
    methods: dict = field(default_factory=dict)
    seeds: list = field(default_factory=lambda: [0])


GRID_KEYS = ("methods", "seeds")


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check (and gently coerce) a scalar against its dataclass type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = options[0]
    if hint is float:
        if isinstance(value, bool):
            raise ReproError(f"config key {key!r} must be a number, got {value!r}.")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ReproError(f"config key {key!r} must be a number, got {value!r}.")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ReproError(f"config key {key!r} must be an integer, got {value!r}.")
        return int(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ReproError(f"config key {key!r} must be true or false, got {value!r}.")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ReproError(f"config key {key!r} must be a string, got {value!r}.")
        return value
    if hint in (dict, list) or typing.get_origin(hint) in (dict, list):
        base = typing.get_origin(hint) or hint
        if not isinstance(value, base):
            raise ReproError(f"config key {key!r} must be a {base.__name__}, got {value!r}.")
        return value
    return value


def build_dataclass(cls, values: dict, prefix: str = ""):
    """Build dataclass `cls` from a plain dict, rejecting unknown keys with a closest-key hint."""
    if not isinstance(values, dict):
        raise ReproError(f"config section {prefix.rstrip('.') or '<top>'!r} must be a mapping, got {values!r}.")
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = prefix + str(key)
        if key not in names:
            valid = [prefix + n for n in names]
            raise ReproError(
                f"unknown config key {full!r}.{closest(full, valid)} Valid keys here: {', '.join(valid)}."
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build_dataclass(hint, value or {}, prefix=full + ".")
        else:
            kwargs[key] = _coerce(value, hint, full)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse 'a.b.c=value' (value read as YAML) into (['a', 'b', 'c'], value)."""
    if "=" not in text:
        raise ReproError(f"override {text!r} must look like key.sub=value (e.g. train.epochs=10).")
    key, raw = text.split("=", 1)
    if not key:
        raise ReproError(f"override {text!r} has an empty key.")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def set_dotted(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        if not isinstance(node.get(part, {}), dict):
            raise ReproError(f"cannot set {'.'.join(path)!r}: {part!r} is not a section.")
        node = node.setdefault(part, {})
    node[path[-1]] = value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ReproError(f"config file {str(path)!r} does not exist; pass the path of an experiment YAML.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ReproError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ReproError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}.")
    return data


def select_method(raw: dict, label: str | None) -> dict:
    """Pick one method of the experiment's grid (`methods`) as the run's `method`."""
    raw = copy.deepcopy(raw)
    grid = raw.get("methods") or {}
    if label is not None:
        if label not in grid:
            raise ReproError(
                f"method label {label!r} is not in this experiment's 'methods'.{closest(label, grid)} "
                f"Labels: {', '.join(grid) or '(none)'}."
            )
        chosen = dict(grid[label] or {})
        chosen.setdefault("name", label)
        raw["method"] = chosen
        raw["method_label"] = label
    elif grid and "method" not in raw:
        if len(grid) > 1:
            raise ReproError(f"this experiment has several methods ({', '.join(grid)}); choose one with --method.")
        (label,) = grid
        return select_method(raw, label)
    return raw


def load_config(path: str | Path | None, overrides: list[str] = (), method_label: str | None = None) -> RunConfig:
    """Read an experiment YAML, choose one method of its grid, apply dotted overrides, validate."""
    raw = read_yaml(path) if path else {}
    raw = select_method(raw, method_label)
    raw.pop("method_label", None)
    for text in overrides:
        keys, value = parse_override(text)
        set_dotted(raw, keys, value)
    cfg = build_dataclass(RunConfig, raw)
    if cfg.train.precision not in ("no", "bf16", "fp16"):
        raise ReproError(f"train.precision must be no, bf16 or fp16, got {cfg.train.precision!r}.")
    if cfg.schedule.per not in ("step", "epoch"):
        raise ReproError(f"schedule.per must be 'step' or 'epoch', got {cfg.schedule.per!r}.")
    if cfg.train.select not in ("last", "best_val"):
        raise ReproError(f"train.select must be 'last' or 'best_val', got {cfg.train.select!r}.")
    if cfg.train.select_ties not in ("later", "earlier"):
        raise ReproError(f"train.select_ties must be 'later' or 'earlier', got {cfg.train.select_ties!r}.")
    if not isinstance(cfg.method.get("name"), str):
        raise ReproError("config 'method' needs a 'name' (e.g. method.name=mixup).")
    if cfg.train.world_size is not None and cfg.train.world_size < 1:
        raise ReproError(f"train.world_size must be a number of processes (>= 1) or null (the number launched), "
                         f"got {cfg.train.world_size}.")
    return cfg


def with_world_size(cfg: RunConfig, num_processes: int, launched: str) -> RunConfig:
    """A copy of `cfg` with `train.world_size` = `num_processes`, the process count the run trains with.

    The trainer calls it with Accelerate's real count, the workflow with the count its launch command asks for
    (`resources.gpus`), so both hash the same config. `launched` says where the count comes from, for the error.

    Raises:
        ReproError: the config already names another world size.
    """
    if cfg.train.world_size is not None and cfg.train.world_size != num_processes:
        raise ReproError(
            f"train.world_size={cfg.train.world_size} but {launched}: train.batch_size is per process and every "
            "process draws its own random numbers, so a run belongs to one process count. Launch it with "
            f"`accelerate launch --num_processes {cfg.train.world_size} ...`, or set train.world_size=null to train "
            "with the count launched (another run, with its own config hash)."
        )
    resolved = copy.deepcopy(cfg)
    resolved.train.world_size = num_processes
    return resolved


def run_dict(cfg: RunConfig) -> dict:
    """The resolved config of one run (grid keys dropped): what is saved and hashed."""
    out = dataclasses.asdict(cfg)
    for key in GRID_KEYS:
        out.pop(key, None)
    return out


# keys that say where a run goes or how it is resourced, not what it computes
_NOT_HASHED = ("output_dir", "resources")
# options added after results were committed, with the value that reproduces the old behaviour: left out
# of the hash at that value, so finished runs keep their hash and are not retrained
_ADDED_LATER = {
    ("data", "val_per_class"): False,
    ("data", "repeated_aug"): 0,
    ("data", "shuffle"): True,
    ("data", "options"): {},
    ("optim", "reset_each_epoch"): False,
    ("schedule", "cooldown_epochs"): 0,
    ("schedule", "warmup_prefix"): False,
    ("train", "find_unused_parameters"): False,
    ("train", "world_size"): 1,  # every committed run trained in one process
}


def config_hash(cfg: RunConfig) -> str:
    """Hash of what determines a run's result; location and resources are excluded."""
    data = run_dict(cfg)
    for key in _NOT_HASHED:
        data.pop(key, None)
    data["data"].pop("num_workers", None)
    data["data"].pop("root", None)
    if data["train"].get("world_size") is None:  # unresolved: the one process a plain `python -m common.train` gets
        data["train"]["world_size"] = 1
    for (section, key), neutral in _ADDED_LATER.items():
        if data[section].get(key) == neutral:
            del data[section][key]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(run_dict(cfg), sort_keys=False)
