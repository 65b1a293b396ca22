"""The shared trainer: ``python -m common.train --config FILE [--method LABEL] [--output DIR] key.sub=value ...``.

Also runs under ``accelerate launch -m common.train ...`` (multi-GPU, mixed precision). One run writes
one folder: ``config.yaml`` (resolved), ``log.jsonl`` (one line per epoch), ``checkpoint/last.pt``
(resumable state), and at the very end ``provenance.json`` then ``metrics.json``. A folder with
``metrics.json`` is a finished run: running the same command again does nothing, and a different config
is refused rather than overwriting it. A killed run resumes from its last checkpoint when the same
command is run again, and ends with the same weights as an uninterrupted one: every random stream
(data order, augmentation, mixing, drop-path) is re-seeded per epoch from (seed, epoch, rank).

Several processes: the number is part of the run (``train.world_size``, in the hash), and a checkpoint resumes
only under the count that wrote it. Each step's global batch is the one a single process with the global batch
would take (`GlobalBatchSampler`); mixing, drop path and augmentation draw per process. Only the main process
writes the folder, holding a lock on ``<run>/.lock`` for the whole run, so a second writer is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from common.config import RunConfig, config_hash, dump_yaml, load_config, with_world_size
from common.errors import ReproError
from common.methods import StepContext, build_method
from common.provenance import provenance

CHECKPOINT = "checkpoint/last.pt"


# ----------------------------------------------------------------------------------------------- setup
def derived_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch, process, stream)."""
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101 + stream) % (2**31 - 1)


def seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds every CUDA device


def build_optimizer(model: torch.nn.Module, cfg: RunConfig, owned: dict | None = None) -> torch.optim.Optimizer:
    """The optimiser over the model's parameters and those of the modules the method owns (`Method.attach`)."""
    import timm.optim

    if owned:  # one container: weight-decay filtering and parameter names as for the model alone
        model = torch.nn.ModuleDict({"model": model, **{f"method_{k}": m for k, m in owned.items()}})
    o = cfg.optim
    if o.name == "sgd":
        # timm's 'sgd' is Nesterov and 'momentum' is plain heavy-ball SGD
        opt, extra = ("sgd" if o.nesterov else "momentum"), {}
    elif o.name in ("adamw", "adam"):
        opt, extra = o.name, {"betas": tuple(o.betas), "eps": o.eps}
    else:
        raise ReproError(f"optim.name must be 'sgd', 'adamw' or 'adam', got {o.name!r}.")
    return timm.optim.create_optimizer_v2(
        model, opt=opt, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum,
        filter_bias_and_bn=o.no_decay_1d, **extra,
    )


def build_scheduler(optimizer, cfg: RunConfig, updates_per_epoch: int):
    """timm scheduler in units of epochs (per='epoch') or optimiser updates (per='step').

    Cosine with schedule.cooldown_epochs = c: the cosine spans train.epochs - c and the last c epochs run at
    min_lr (timm's CosineLRScheduler returns lr_min past t_initial with cycle_limit 1), which is timm's train.py
    with --epochs E-c --cooldown-epochs c. Warm-up overlaps the start of the cosine (timm's warmup_prefix=False,
    what DeiT and TransMix ran), so the cosine still reaches min_lr at epoch E-c; with schedule.warmup_prefix the
    cosine starts after the warm-up and spans the rest (ResizeMix's official scheduler)."""
    from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, StepLRScheduler

    s, epochs = cfg.schedule, cfg.train.epochs
    unit = 1 if s.per == "epoch" else updates_per_epoch
    in_epochs = s.per == "epoch"
    warmup = round(s.warmup_epochs * unit)
    if s.cooldown_epochs:
        if s.name != "cosine":
            raise ReproError(f"schedule.cooldown_epochs={s.cooldown_epochs:g} applies to the cosine schedule only "
                             f"(timm's --cooldown-epochs); set schedule.cooldown_epochs=0 for schedule.name={s.name}.")
        if not 0 < s.cooldown_epochs < epochs:
            raise ReproError(f"schedule.cooldown_epochs={s.cooldown_epochs:g} must lie in [0, train.epochs={epochs}): "
                             "train.epochs counts the cool-down (DeiT's 300 + 10 is train.epochs=310, "
                             "schedule.cooldown_epochs=10).")
        if in_epochs and s.cooldown_epochs != int(s.cooldown_epochs):
            raise ReproError(f"schedule.cooldown_epochs={s.cooldown_epochs:g} must be a whole number of epochs with "
                             "schedule.per=epoch (the lr changes only at epoch starts); or use schedule.per=step.")
    if s.warmup_prefix and s.name != "cosine":
        raise ReproError(f"schedule.warmup_prefix=true applies to the cosine schedule only; set it false for "
                         f"schedule.name={s.name}.")
    if s.name == "cosine":
        cosine_t = round((epochs - s.cooldown_epochs) * unit) - (warmup if s.warmup_prefix else 0)
        return CosineLRScheduler(
            optimizer, t_initial=max(1, cosine_t), lr_min=s.min_lr, warmup_t=warmup, warmup_lr_init=s.warmup_lr,
            warmup_prefix=s.warmup_prefix, t_in_epochs=in_epochs,
        )
    if s.name == "multistep":
        if not s.milestones:
            raise ReproError("schedule.name=multistep needs schedule.milestones (epochs), e.g. [100, 150].")
        # timm's MultiStepLRScheduler counts decay_t <= t + 1, so decay_t = m would already drop the lr in 0-based
        # epoch m - 1; + 1 makes a milestone m mean "after m epochs" (0-based epoch m onwards), as torch's
        # MultiStepLR stepped once per epoch
        return MultiStepLRScheduler(
            optimizer, decay_t=[int(m * unit) + 1 for m in s.milestones], decay_rate=s.gamma,
            warmup_t=warmup, warmup_lr_init=s.warmup_lr, t_in_epochs=in_epochs,
        )
    if s.name == "constant":
        return StepLRScheduler(optimizer, decay_t=10**9, decay_rate=1.0, warmup_t=warmup,
                               warmup_lr_init=s.warmup_lr, t_in_epochs=in_epochs)
    raise ReproError(f"schedule.name must be cosine, multistep or constant, got {s.name!r}.")


class GlobalBatchSampler(Sampler[int]):
    """One process's share of the order a single process would train on, one global batch at a time.

    The permutation is the one `DataLoader(dataset, shuffle=True, generator=torch.Generator().manual_seed(seed))`
    draws (that loader first takes its workers' base seed from the generator, then `torch.randperm`). Global batch
    i is positions [i * B, (i + 1) * B) of it, B = batch_size * world, and process r trains on its r-th block of
    batch_size. So at every step the processes together hold exactly the examples that one process with batch
    B would hold, whatever the process count: only the random draws differ (each process has its own streams).
    An incomplete last global batch is dropped, as the single-process loader's drop_last.

    torch's DistributedSampler deals the permutation out round-robin instead (process r gets every world-th
    index), which makes the global batch depend on the process count.
    """

    def __init__(self, size: int, batch_size: int, world: int, rank: int, seed: int):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world}).")
        self.size, self.batch_size, self.world, self.rank, self.seed = size, batch_size, world, rank, seed
        self.steps = size // (batch_size * world)

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's worker base seed
        order = torch.randperm(self.size, generator=generator)[: self.steps * self.batch_size * self.world]
        return iter(order.view(self.steps, self.world, self.batch_size)[:, self.rank].reshape(-1).tolist())


def train_sampler(dataset, cfg: RunConfig, epoch: int, accelerator, batch_size: int | None = None):
    """The training sampler of one epoch: repeated augmentation, global batches split over the processes, or
    None (one process: the DataLoader shuffles with the (seed, epoch) generator of `make_train_loader`)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if world > 1 and not cfg.data.shuffle:
        raise ReproError(f"data.shuffle=false (batches in dataset order) runs in one process, not {world}.")
    if cfg.data.repeated_aug:
        from timm.data.distributed_sampler import RepeatAugSampler

        # timm's defaults (selected_round=256, selected_ratio=0, i.e. the world size) are DeiT's RASampler: an epoch
        # keeps the first floor(N / 256) * 256 of the N * repeats repeated indices, split over the processes
        sampler = RepeatAugSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                   num_repeats=cfg.data.repeated_aug)
        # it seeds its permutation with the epoch alone (as DeiT); a seed derived from (seed, epoch), the same on
        # every process, makes runs differ between seeds and stay resumable
        sampler.set_epoch(derived_seed(cfg.seed, epoch, 0, 4))
        return sampler
    if world > 1:
        return GlobalBatchSampler(len(dataset), batch_size or cfg.train.batch_size, world, rank,
                                  derived_seed(cfg.seed, epoch, 0, 1))
    return None


def make_train_loader(dataset, cfg: RunConfig, epoch: int, accelerator, batch_size: int | None = None) -> DataLoader:
    """A loader whose order and worker seeds depend only on (seed, epoch): resumable at epoch bounds.
    `batch_size` overrides train.batch_size (a method's pass plan, `TrainPass.batch_size`)."""
    sampler = train_sampler(dataset, cfg, epoch, accelerator, batch_size)
    # the generator gives the workers' base seed (and the order, in one process): per process, so every process
    # augments with its own stream as DeiT and timm seed theirs (seed + rank); one process keeps rank 0's
    generator = torch.Generator().manual_seed(derived_seed(cfg.seed, epoch, accelerator.process_index, 1))
    return DataLoader(
        dataset, batch_size=batch_size or cfg.train.batch_size, shuffle=sampler is None and cfg.data.shuffle,
        sampler=sampler,
        generator=generator, num_workers=cfg.data.num_workers, drop_last=True,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
    )


def pass_plan(method, train_ds, cfg: RunConfig, accelerator, steps_per_epoch: int) -> tuple[list, list[int]]:
    """The method's passes over the data (`Method.passes`) and the batches of each.

    The default plan is one pass per epoch with ``steps_per_epoch`` batches each. Another plan (FKD: a pass with n
    crops per image counts n epochs) sets the lr once per pass, so it needs ``schedule.per: epoch``; its batches
    follow each pass's batch size (capped by train.max_steps_per_epoch), and it reads the DataLoader path."""
    plan = method.passes(cfg.train.epochs, cfg.train.batch_size)
    if [(p.epoch, p.epochs, p.batch_size) for p in plan] == [(e, 1, None) for e in range(cfg.train.epochs)]:
        return plan, [steps_per_epoch] * len(plan)
    if cfg.schedule.per != "epoch":
        raise ReproError(f"method {method.name!r} counts its passes over the data as several epochs and sets the lr "
                         "once per pass: set schedule.per=epoch.")
    if cfg.data.device_cache:
        raise ReproError(f"method {method.name!r} trains on its own view of the data; set data.device_cache=false.")
    steps = []
    for p in plan:
        batch = p.batch_size or cfg.train.batch_size
        sampler = train_sampler(train_ds, cfg, p.epoch, accelerator, batch)
        n = (len(sampler) if sampler is not None else len(train_ds)) // batch
        if n == 0:
            raise ReproError(f"method {method.name!r} loads {batch} examples per batch in the pass at epoch {p.epoch}, "
                             f"more than the {len(train_ds)} training examples: lower train.batch_size.")
        steps.append(min(n, cfg.train.max_steps_per_epoch) if cfg.train.max_steps_per_epoch else n)
    return plan, steps


def optimisation_step(accelerator, model, optimizer, method, batch, ctx: StepContext, clip_grad=None) -> dict:
    """One micro-batch: the method's step under autocast, backward, clipping and the optimiser step when the
    accumulation window closes. Shared by the trainer loop and the benchmarks in bench/."""
    with accelerator.accumulate(model):
        with accelerator.autocast():
            result = method.step(model, batch, ctx)
        accelerator.backward(result["loss"])
        if accelerator.sync_gradients and clip_grad:
            accelerator.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return result


def show_progress_bars(main: bool) -> bool:
    """tqdm bars on the main process, and only when stderr is a terminal: in a job log (Snakemake, SLURM) every
    redraw would be one more line. The one line per epoch (`tqdm.write`, to stdout) is printed either way."""
    return main and sys.stderr.isatty()


def check_finite(loss_sum, epoch: int, batch: int, optimizer, out: Path) -> None:
    """Stop on a NaN/inf loss (checked on the running sum, so a bad batch anywhere since the last check shows)."""
    value = float(loss_sum)
    if not math.isfinite(value):
        raise ReproError(
            f"the training loss became {value} by epoch {epoch + 1}, batch {batch + 1} "
            f"(lr {optimizer.param_groups[0]['lr']:.3g}). The last checkpoint in {out / 'checkpoint'} "
            "is kept. Lower optim.lr, set train.clip_grad, or use train.precision=no; then delete "
            "the checkpoint folder (the config changed) and run again."
        )


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model, loader, accelerator, task: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Metrics over a whole split, with the gathered outputs and targets (for temperature scaling)."""
    from common.metrics import classification_metrics, regression_metrics

    model.eval()
    outputs, targets = [], []
    for inputs, target in loader:
        with accelerator.autocast():
            out = model(inputs)
        out, target = accelerator.gather_for_metrics((out.float(), target))
        outputs.append(out.cpu())
        targets.append(target.cpu())
    outputs, targets = torch.cat(outputs), torch.cat(targets)
    if task == "regression":
        # a dataset with a domain id per example (out-of-distribution tables) also gets per-domain errors; the
        # loader does not shuffle, so the gathered rows are in dataset order
        domains = getattr(getattr(loader, "dataset", None), "domains", None)
        return regression_metrics(outputs, targets, domains=domains), outputs, targets
    return classification_metrics(outputs, targets), outputs, targets


def calibration_extras(outputs: dict) -> tuple[dict, dict]:
    """Post-hoc temperature scaling and reliability data for one evaluation.

    With a validation split the temperature is fitted on it (grid 0.1..10, lowest ECE, as RankMixup's
    official tester) and applied to the test logits: logged as val_temperature and test_ts_*. Returns the
    row entries and the reliability-diagram data (test, and test after scaling)."""
    from common.metrics import classification_metrics, reliability_diagram_data, temperature_scale

    row, reliability = {}, {}
    test_logits, test_labels = outputs["test"]
    reliability["test"] = reliability_diagram_data(test_logits, test_labels)
    if "val" in outputs:
        temperature = temperature_scale(*outputs["val"])
        row["val_temperature"] = temperature
        scaled = test_logits / temperature
        row.update({f"test_ts_{k}": v for k, v in classification_metrics(scaled, test_labels).items()})
        reliability["test_ts"] = reliability_diagram_data(scaled, test_labels)
    return row, reliability


PRIMARY = {"classification": ("top1", max), "regression": ("rmse", min)}
HIGHER_IS_BETTER = {"top1": True, "top5": True, "r": True, "r_worst_group": True}  # every other: lower is better
SHOWN = ("top1", "top5", "nll", "ece", "ts_ece", "rmse", "mape")  # the per-epoch line a person reads


def _split_metrics(row: dict, split: str) -> dict:
    return {k[len(split) + 1:]: v for k, v in row.items() if k.startswith(split + "_") and "_ema_" not in k}


def select_epoch(history: list[dict], metric: str, ties: str) -> dict:
    """The row with the best validation `metric`; a tie moves to the later epoch if ties == 'later'."""
    higher = HIGHER_IS_BETTER.get(metric, False)
    best = None
    for row in history:
        if f"val_{metric}" not in row:
            continue
        value = row[f"val_{metric}"]
        if best is None:
            best = row
            continue
        old = best[f"val_{metric}"]
        better = value > old if higher else value < old
        if better or (ties == "later" and value == old):
            best = row
    return best


def summarise(history: list[dict], task: str, select: str = "last", select_metric: str | None = None,
              ties: str = "later") -> dict:
    """metrics.json: test metrics of the final epoch, of the best test epoch, the median of the last 10
    evaluations, and, with a validation split, of the epoch selected on validation."""
    key, better = PRIMARY[task]
    evals = [h for h in history if f"test_{key}" in h]
    best_row = better(evals, key=lambda h: h[f"test_{key}"])
    last10 = [h[f"test_{key}"] for h in evals[-10:]]
    metrics = {
        "task": task, "eval_split": "test", "primary_metric": key, "select": select,
        "final": _split_metrics(evals[-1], "test"), "final_epoch": evals[-1]["epoch"],
        "best": _split_metrics(best_row, "test"), "best_epoch": best_row["epoch"],
        f"median_last10_{key}": statistics.median(last10), "n_evals_in_median": len(last10),
    }
    ema_last10 = [h[f"test_ema_{key}"] for h in evals[-10:] if f"test_ema_{key}" in h]
    if ema_last10:  # the EMA model's (train.ema_decay, or a method's own, `Method.ema_model`)
        metrics[f"median_last10_ema_{key}"] = statistics.median(ema_last10)
    if any("val_" + key in h for h in history):
        metric = select_metric or key
        chosen = select_epoch(history, metric, ties)
        metrics["selected"] = {"epoch": chosen["epoch"], "metric": f"val_{metric}", "ties": ties,
                               "val": _split_metrics(chosen, "val"), "test": _split_metrics(chosen, "test")}
    return metrics


# --------------------------------------------------------------------------------------- checkpointing
def save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-save leaves the previous checkpoint intact


def rng_state() -> dict:
    """Every global RNG state, in types ``torch.load(weights_only=True)`` reads without an allow-list: Python's
    as its (version, tuple of ints, float or None), NumPy's legacy MT19937 state with its keys as a tensor."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`; also takes a checkpoint written before issue #16 (NumPy's state as its tuple)."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path) -> dict:
    """A run's checkpoint, read with ``weights_only=True`` (`common.safeload`): a run folder copied in from
    another machine cannot run code when it is resumed. What the trainer writes is tensors and plain containers;
    the allow-list adds only the NumPy pieces of checkpoints written before (their NumPy RNG state), so those
    resume too. Anything else is refused, and the message says how to start the run afresh."""
    from common.safeload import TRAINER_CHECKPOINT_GLOBALS, safe_load

    try:
        return safe_load(path, TRAINER_CHECKPOINT_GLOBALS, what="checkpoint")
    except ReproError as err:
        raise ReproError(f"{err} To train this run afresh instead, delete {path.parent}/ and run the same "
                         "command again.") from None


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ train
LOCK = ".lock"


class RunFolderLock:
    """An exclusive `flock` on `<run>/.lock`, held by the main process for the whole run.

    Two processes writing one run folder would interleave `log.jsonl` and race on the checkpoint; the second
    one to start is refused before it changes anything (opening the existing lock file does not modify it). The
    kernel drops the lock when its holder exits, however it dies (SIGKILL included), so a killed run resumes
    without clean-up. The file holds the holder's pid and host, for the message."""

    def __init__(self, out: Path):
        self.out, self.fd = out, None

    def acquire(self) -> None:
        import fcntl
        import socket

        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ReproError(
                f"run folder {self.out} is being written by another process (pid {holder}); two writers would "
                "interleave its log and checkpoint. Wait for that run to finish (or stop it), or pass another "
                "--output."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor of the open file releases the flock
            self.fd = None


def on_main(accelerator, fn):
    """Run `fn()` on the main process only and hand its result, or its ReproError, to every process.

    Folder work (locking, superseding, reading a checkpoint's header) must happen once, and every process must
    then take the same branch, or the others wait forever at the next collective call."""
    payload = [None]
    if accelerator.is_main_process:
        try:
            payload[0] = ("ok", fn())
        except ReproError as exc:
            payload[0] = ("error", str(exc))
        except BaseException as exc:  # a bug: the main process re-raises it, the others stop with its name
            payload[0] = ("crash", f"{type(exc).__name__}: {exc}")
            if accelerator.num_processes > 1:
                from accelerate.utils import broadcast_object_list

                broadcast_object_list(payload, from_process=0)
            raise
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(payload, from_process=0)
    kind, value = payload[0]
    if kind == "error":
        raise ReproError(value)
    if kind == "crash":
        raise RuntimeError(f"the main process failed: {value}")
    return value


def supersede(out: Path, old_hash: str | None) -> None:
    """Move an older config's run files aside (never delete them) so a new config can start afresh."""
    keep = out / f"superseded-{old_hash or 'unknown'}"
    keep.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.json", "provenance.json", "log.jsonl", "config.yaml", CHECKPOINT):
        if (out / name).exists():
            os.replace(out / name, keep / Path(name).name)
    print(f"[repro] the config changed: the previous run's files are kept in {keep}")


def check_output_dir(out: Path, digest: str, on_change: str = "error", world_size: int = 1) -> bool:
    """True if `out` already holds this exact finished run; a different finished run is refused
    (on_change='error') or moved aside (on_change='restart', what the workflow asks for)."""
    metrics, prov = out / "metrics.json", out / "provenance.json"
    if not metrics.exists():
        return False
    try:
        record = json.loads(prov.read_text())
    except (OSError, ValueError):
        record = {}
    done_hash = record.get("config_hash")
    if done_hash == digest:
        return True
    if on_change == "restart":
        supersede(out, done_hash)
        return False
    done_world = record.get("device_count")  # the provenance's count of processes
    why = (f" It ran with {done_world} processes and this launch has {world_size}: the process count is part of "
           "a run's config." if isinstance(done_world, int) and done_world != world_size else "")
    raise ReproError(
        f"{out} already holds a finished run with a different config (hash {done_hash} vs {digest}).{why} "
        "Finished results are never overwritten: pass another --output, or delete that folder to retrain."
    )


def open_checkpoint(out: Path, digest: str, world_size: int, on_change: str) -> dict | None:
    """The checkpoint to resume from, or None to start afresh (a different config's is moved aside under
    on_change='restart', refused otherwise; one written under another process count is named as such)."""
    ckpt_path = out / CHECKPOINT
    if not ckpt_path.exists():
        return None
    state = load_checkpoint(ckpt_path)
    if state["config_hash"] == digest:
        return state
    if on_change == "restart":
        supersede(out, state["config_hash"])
        return None
    written = state.get("world_size")  # absent from checkpoints of before world sizes were recorded
    if written is not None and written != world_size:
        raise ReproError(
            f"{ckpt_path} was written by a run of {written} process(es) and this launch has {world_size}: a "
            "checkpoint resumes only under the process count that wrote it (batch_size is per process and every "
            f"process has its own random streams). Resume it with `accelerate launch --num_processes {written} "
            "...`, or pass another --output to start a new run."
        )
    raise ReproError(
        f"{ckpt_path} was written by a different config (hash {state['config_hash']} vs {digest}); "
        "resume needs the same config. Delete the checkpoint folder to start over, or use another --output."
    )


def reduce_sums(accelerator, sums: dict) -> dict:
    """Sum each per-process running total over the processes (a key missing on one process counts 0 there).

    Every process must call it at the same point: it is a collective call when there are several."""
    if accelerator.num_processes == 1:
        return sums
    from accelerate.utils import gather_object

    keys = sorted(set(gather_object(sorted(sums))))  # a method may log some keys on some batches only
    values = torch.stack([torch.as_tensor(sums.get(k, 0.0), dtype=torch.float32).to(accelerator.device)
                          for k in keys])
    return dict(zip(keys, accelerator.reduce(values, reduction="sum").cpu(), strict=True))


def train(cfg: RunConfig, out: Path, command: str, on_change: str = "error") -> dict:
    """Train and evaluate one run into `out`; returns the metrics dict (the same on every process)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # validate everything cheap before the output folder is touched
    build_method(cfg.method, num_classes=2, label_smoothing=cfg.train.label_smoothing)  # name and options
    build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optim.lr), cfg, 1)  # schedule
    if cfg.data.repeated_aug < 0:
        raise ReproError(f"data.repeated_aug must be 0 (off) or a number of repeats (DeiT: 3), "
                         f"got {cfg.data.repeated_aug}.")
    if cfg.data.repeated_aug and cfg.data.device_cache:
        raise ReproError(
            f"data.repeated_aug={cfg.data.repeated_aug} needs the standard DataLoader: the device cache "
            "(data.device_cache=true) draws its own order and has no repeated-augmentation sampler. "
            "Set data.device_cache=false, or data.repeated_aug=0."
        )
    if not cfg.data.shuffle and (cfg.data.repeated_aug or cfg.data.device_cache):
        raise ReproError("data.shuffle=false (batches in dataset order) needs the standard DataLoader without "
                         "repeated augmentation: set data.repeated_aug=0 and data.device_cache=false.")
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if cfg.train.find_unused_parameters else []
    accelerator = Accelerator(mixed_precision=cfg.train.precision,
                              gradient_accumulation_steps=cfg.train.grad_accum, kwargs_handlers=handlers)
    # the process count is part of the run: recorded in the config that is hashed and saved
    world = accelerator.num_processes
    cfg = with_world_size(cfg, world, f"Accelerate started {world} process(es)")
    digest = config_hash(cfg)
    lock = RunFolderLock(out)
    try:
        on_main(accelerator, lock.acquire)  # only the main process writes the folder
        return _train_locked(cfg, out, command, on_change, accelerator, digest)
    finally:
        lock.release()


@dataclass
class Run:
    """Everything one run holds between its phases (`_train_locked` reads top to bottom like the run)."""

    cfg: RunConfig
    out: Path
    command: str
    accelerator: Any
    digest: str
    info: Any = None
    train_ds: Any = None
    method: Any = None
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    eval_loaders: dict = field(default_factory=dict)
    device_loader: Any = None
    ema: Any = None
    plan: list = field(default_factory=list)  # the method's passes over the data (`TrainPass`)
    pass_steps: list = field(default_factory=list)  # batches of each pass
    start_epoch: int = 0
    updates: int = 0  # optimiser updates so far
    history: list = field(default_factory=list)  # one log row per pass
    extras: dict = field(default_factory=dict)  # reliability data kept for metrics.json
    wall_before: float = 0.0  # seconds spent before a resume
    started: float = 0.0

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def _train_locked(cfg: RunConfig, out: Path, command: str, on_change: str, accelerator, digest: str) -> dict:
    """The run, phase by phase: claim the folder, build, resume, one pass per epoch (train, evaluate and select,
    log and checkpoint), finish."""
    main_state = {}

    def prepare_folder() -> str:
        if check_output_dir(out, digest, on_change, accelerator.num_processes):
            return "finished"
        main_state["checkpoint"] = open_checkpoint(out, digest, accelerator.num_processes, on_change)
        return "fresh" if main_state["checkpoint"] is None else "resume"

    status = on_main(accelerator, prepare_folder)
    if status == "finished":
        if accelerator.is_main_process:
            print(f"[repro] {out}: finished run with the same config already there; nothing to do.")
        metrics = json.loads((out / "metrics.json").read_text())
        accelerator.end_training()
        return metrics
    run = build_run(Run(cfg, out, command, accelerator, digest))
    if status == "resume":
        # the main process read it while deciding; the others read the same file, which no one writes before
        # the end of the first epoch (after a barrier)
        resume_run(run, main_state.pop("checkpoint") if run.main else load_checkpoint(out / CHECKPOINT))
    if run.main:  # the log holds exactly the epochs the model state has seen
        (out / "config.yaml").write_text(dump_yaml(cfg))
        (out / "log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in run.history))

    run.started = time.time()
    # the method's passes over the data (one per epoch unless it counts otherwise); a checkpoint ends a pass
    first = next((k for k, p in enumerate(run.plan) if p.epoch >= run.start_epoch), len(run.plan))
    bar = tqdm(range(first, len(run.plan)), desc=f"{cfg.experiment or 'run'}/{run.method.name}/seed{cfg.seed}",
               initial=first, total=len(run.plan), unit="epoch", disable=not show_progress_bars(run.main),
               dynamic_ncols=True)
    for k in bar:
        row = train_one_pass(run, k)
        last = k + 1 == len(run.plan)
        epoch, stop = run.plan[k].epoch, run.plan[k].stop
        if last or stop // cfg.train.eval_every > epoch // cfg.train.eval_every:
            evaluate_and_select(run, row)
        run.history.append(row)
        log_row(run, row)
        if last or stop // cfg.train.checkpoint_every > epoch // cfg.train.checkpoint_every:
            checkpoint_run(run, stop)
    bar.close()
    return finish_run(run)


def build_run(run: Run) -> Run:
    """Build phase: data splits, method, model (initialised from the seed alone), the pass plan, optimiser,
    schedule, evaluation loaders, device placement, device cache and EMA."""
    from common.data import build_splits
    from common.models import build_model

    cfg, accelerator, world = run.cfg, run.accelerator, run.world
    d = cfg.data
    train_ds, val_ds, test_ds, info = build_splits(
        d.name, root=d.root, recipe=d.recipe, allow_download=d.allow_download,
        val_split=d.val_split, split_seed=d.split_seed if d.split_seed is not None else cfg.seed,
        image_size=d.image_size, val_per_class=d.val_per_class, options=d.options,
    )
    method = build_method(cfg.method, num_classes=info.num_classes,
                          label_smoothing=cfg.train.label_smoothing, task=info.task)
    model_kwargs = dict(cfg.model.kwargs)
    seed_globals(derived_seed(cfg.seed, 0, 0, 0))  # model init depends on the seed only
    model = build_model(cfg.model.name, num_classes=info.num_classes, **model_kwargs)
    method.check_model(model)
    owned = method.attach(model)  # modules the method owns: on the model's device, optimised beside it
    for module in owned.values():
        module.to(accelerator.device)
    if cfg.train.ema_decay and method.ema_model() is not None:
        raise ReproError(f"method {method.name!r} keeps its own EMA model (evaluated as test_ema_*): "
                         "leave train.ema_decay unset.")
    if cfg.train.select == "best_val" and val_ds is None:
        raise ReproError("train.select=best_val needs a validation split: set data.val_split (e.g. 5000).")
    if len(train_ds) < cfg.train.batch_size:
        raise ReproError(f"train.batch_size={cfg.train.batch_size} exceeds the {len(train_ds)} training examples.")

    # batches per epoch = len(make_train_loader(...)) (drop_last); the device cache yields as many as the sampler
    sampler = train_sampler(train_ds, cfg, 0, accelerator)
    per_process = len(sampler) if sampler is not None else len(train_ds)
    steps_per_epoch = per_process // cfg.train.batch_size
    if steps_per_epoch == 0:
        if cfg.data.repeated_aug:
            raise ReproError(f"each of the {world} processes gets {per_process} training samples per epoch "
                             "(repeated augmentation keeps floor(N / 256) * 256 samples per epoch), fewer than "
                             f"train.batch_size={cfg.train.batch_size}: lower train.batch_size.")
        raise ReproError(f"the global batch, train.batch_size={cfg.train.batch_size} x {world} processes, exceeds "
                         f"the {len(train_ds)} training examples: lower train.batch_size.")
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    updates_per_epoch = max(1, steps_per_epoch // cfg.train.grad_accum)
    run.plan, run.pass_steps = pass_plan(method, train_ds, cfg, accelerator, steps_per_epoch)

    optimizer = build_optimizer(model, cfg, owned)
    run.scheduler = build_scheduler(optimizer, cfg, updates_per_epoch)
    # prepared loaders shard the evaluation batches over the processes and pad the last round with repeats;
    # evaluate() gathers with gather_for_metrics, which drops the repeats: every example counts exactly once
    run.eval_loaders = {
        split: accelerator.prepare(DataLoader(ds, batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
                                              shuffle=False, num_workers=cfg.data.num_workers))
        for split, ds in (("val", val_ds), ("test", test_ds)) if ds is not None
    }
    method.prepare(train_ds, info)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.train.compile:
        # keep forward hooks visible to the compiled graph (attention capture for TransMix relies on them)
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        model = torch.compile(model)
    if cfg.data.device_cache:
        from common.fastdata import DeviceLoader

        run.device_loader = DeviceLoader(train_ds, info, cfg.train.batch_size, accelerator.device,
                                         accelerator.process_index, accelerator.num_processes)
    if cfg.train.ema_decay:
        from timm.utils import ModelEmaV3

        run.ema = ModelEmaV3(accelerator.unwrap_model(model), decay=cfg.train.ema_decay)
    run.info, run.train_ds, run.method, run.model, run.optimizer = info, train_ds, method, model, optimizer
    return run


def resume_run(run: Run, state: dict) -> None:
    """Resume phase: every state the checkpoint holds (model, optimiser, schedule, scaler, EMA, method, RNGs)."""
    accelerator = run.accelerator
    accelerator.unwrap_model(run.model).load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    run.method.load_state_dict(state.get("method", {}))
    set_rng_state(state["rng"])
    run.start_epoch, run.updates, run.history = state["epoch"], state["updates"], state["history"]
    run.extras = state.get("extras", {})
    run.wall_before = state["wall_time_s"]
    if run.main:
        print(f"[repro] resuming {run.out} from epoch {run.start_epoch} (checkpoint {run.out / CHECKPOINT})")


def train_one_pass(run: Run, k: int) -> dict:
    """One pass over the training data (one epoch unless the method counts otherwise): per-pass random streams,
    the schedule, every optimisation step. The steps' scalars are summed on the device and read at the NaN-check
    interval and once at the end. Returns the log row's training part."""
    cfg, accelerator, model, method, optimizer = run.cfg, run.accelerator, run.model, run.method, run.optimizer
    train_pass, steps_per_epoch = run.plan[k], run.pass_steps[k]
    epoch, stop = train_pass.epoch, train_pass.stop
    total_steps = sum(run.pass_steps)
    # every stream is drawn per process (as DeiT and timm seed seed + rank): each process mixes, drops paths
    # and augments with its own draws; the data order alone is shared (GlobalBatchSampler)
    seed_globals(derived_seed(cfg.seed, epoch, accelerator.process_index, 2))
    generator = torch.Generator().manual_seed(derived_seed(cfg.seed, epoch, accelerator.process_index, 3))
    run.scheduler.step(epoch)
    if cfg.optim.reset_each_epoch:  # as a new optimiser each epoch: moments and step counts start again
        optimizer.state.clear()
    model.train()
    if run.device_loader is not None:
        loader = run.device_loader.epoch(torch.Generator().manual_seed(derived_seed(cfg.seed, epoch, 0, 1)))
    else:
        loader = make_train_loader(method.train_dataset(run.train_ds, run.info, train_pass), cfg, epoch, accelerator,
                                   train_pass.batch_size)
    sums, count, t0 = {}, 0, time.time()
    steps = tqdm(loader, total=steps_per_epoch, leave=False, disable=not show_progress_bars(run.main), unit="batch",
                 desc=f"epoch {stop}/{cfg.train.epochs}", dynamic_ncols=True)
    for i, (inputs, targets) in enumerate(steps):
        if i >= steps_per_epoch:
            break
        inputs = inputs.to(accelerator.device, non_blocking=True)
        if cfg.train.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        targets = targets.to(accelerator.device, non_blocking=True)
        step = sum(run.pass_steps[:k]) + i
        ctx = StepContext(epoch=epoch, step=step, progress=step / max(1, total_steps), generator=generator,
                          total_steps=total_steps)
        result = optimisation_step(accelerator, model, optimizer, method, (inputs, targets), ctx,
                                   cfg.train.clip_grad)
        if accelerator.sync_gradients:
            run.updates += 1
            run.scheduler.step_update(run.updates)
            if run.ema is not None:
                run.ema.update(accelerator.unwrap_model(model), step=run.updates)
            method.after_update(accelerator.unwrap_model(model), ctx)
        for key, value in result.items():  # tensors stay on the device: no sync per step
            if key != "logits":
                sums[key] = sums.get(key, 0.0) + (value.detach().float() if torch.is_tensor(value) else value)
        count += 1
        if i % 50 == 49 or i + 1 == steps_per_epoch:  # one host sync every 50 steps
            # summed over the processes, so that all of them stop together on a bad loss
            loss_sum = reduce_sums(accelerator, {"loss": sums["loss"]})["loss"]
            check_finite(loss_sum, epoch, i, optimizer, run.out)
            if run.main:
                steps.set_postfix(loss=f"{float(loss_sum) / (count * run.world):.3f}")
    steps.close()
    sums = reduce_sums(accelerator, sums)  # the epoch's training scalars averaged over every process's steps
    row = {"epoch": stop, "lr": optimizer.param_groups[0]["lr"], "epoch_time_s": round(time.time() - t0, 3)}
    if train_pass.epochs != 1:
        row["pass_epochs"] = train_pass.epochs
    row.update({f"train_{k}": float(v) / max(1, count * run.world) for k, v in sums.items()})
    stats = method.epoch_stats()  # the main process's own (the log is written by it)
    if stats:
        row["method_stats"] = stats
    return row


def evaluate_and_select(run: Run, row: dict) -> None:
    """Evaluate/select phase: metrics of every split (and of the EMA model) into `row`; for classification the
    calibration extras, keeping the reliability data of the final epoch and of the epoch selected on validation."""
    outputs, task = {}, run.info.task
    ema_module = run.ema.module if run.ema is not None else run.method.ema_model()
    for split, eval_loader in run.eval_loaders.items():
        split_metrics, logits, labels = evaluate(run.model, eval_loader, run.accelerator, task)
        row.update({f"{split}_{k}": v for k, v in split_metrics.items()})
        outputs[split] = (logits, labels)
        if ema_module is not None:
            ema_metrics = evaluate(ema_module, eval_loader, run.accelerator, task)[0]
            row.update({f"{split}_ema_{k}": v for k, v in ema_metrics.items()})
    if task == "classification":
        extra_row, reliability = calibration_extras(outputs)
        row.update(extra_row)
        run.extras["final_reliability"] = reliability
        if "val" in outputs:
            cfg = run.cfg
            chosen = select_epoch([*run.history, row], cfg.train.select_metric or PRIMARY[task][0],
                                  cfg.train.select_ties)
            if chosen is row:
                run.extras["selected_reliability"] = reliability


def log_row(run: Run, row: dict) -> None:
    """Append the row to log.jsonl and print the one line per epoch (main process)."""
    if not run.main:
        return
    with open(run.out / "log.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    primary = PRIMARY[run.info.task][0]
    shown = "  ".join(
        f"{split}: " + " ".join(f"{k} {v:.4g}" for k, v in _split_metrics(row, split).items() if k in SHOWN)
        for split in run.eval_loaders if f"{split}_{primary}" in row)
    tqdm.write(f"epoch {row['epoch']:>4}/{run.cfg.train.epochs}  lr {row['lr']:.4g}  "
               f"loss {row.get('train_loss', 0):.4f}  {shown}  ({row['epoch_time_s']:.1f} s)")


def checkpoint_run(run: Run, stop: int) -> None:
    """Write checkpoint/last.pt (main process, after every process has finished the pass)."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if run.main:
        save_checkpoint(run.out / CHECKPOINT, {
            "config_hash": run.digest, "world_size": run.world, "epoch": stop, "updates": run.updates,
            "history": run.history,
            "model": accelerator.unwrap_model(run.model).state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "ema": run.ema.state_dict() if run.ema is not None else None, "method": run.method.state_dict(),
            "rng": rng_state(), "wall_time_s": run.wall_before + time.time() - run.started, "extras": run.extras,
        })


def finish_run(run: Run) -> dict:
    """Finish phase: metrics.json from the history, provenance.json, then metrics.json last (main process)."""
    cfg, info, history, extras = run.cfg, run.info, run.history, run.extras
    metrics = summarise(history, info.task, cfg.train.select, cfg.train.select_metric, cfg.train.select_ties)
    if "final_reliability" in extras:
        metrics["final_reliability"] = extras["final_reliability"]
    if "selected" in metrics and "selected_reliability" in extras:
        metrics["selected"]["reliability"] = extras["selected_reliability"]
    if any(k.startswith("test_ema_") for k in history[-1]):
        metrics["final_ema"] = {k[len("test_ema_"):]: v for k, v in history[-1].items() if k.startswith("test_ema_")}
    wall = run.wall_before + time.time() - run.started
    metrics.update({"epochs": cfg.train.epochs, "wall_time_s": round(wall, 3), "scale": cfg.scale,
                    "dataset": info.name, "model": cfg.model.name, "method": run.method.name, "seed": cfg.seed})
    if run.main:
        write_json(run.out / "provenance.json", provenance(
            run.digest, wall, run.world,
            extra={"command": run.command, "data_source": info.source, "experiment": cfg.experiment,
                   "paper": cfg.paper, "scale": cfg.scale,
                   # a copy of the result: if a workflow deletes metrics.json to retrain after a config
                   # change, supersede() keeps this file, so the old result is never lost
                   "metrics": metrics},
        ))
        write_json(run.out / "metrics.json", metrics)  # written last: its presence means "finished"
        print(f"[repro] finished {run.out} in {wall / 60:.1f} min: "
              f"{metrics['primary_metric']} final {metrics['final'][metrics['primary_metric']]:.4g}")
    run.accelerator.end_training()
    return metrics


def default_output(cfg: RunConfig) -> Path:
    return Path("runs") / (cfg.experiment or "run") / str(cfg.method["name"]) / f"seed{cfg.seed}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m common.train",
        description="Train and evaluate one run. Overrides are dotted keys: train.epochs=10 optim.lr=0.05",
    )
    parser.add_argument("--config", help="experiment YAML (papers/<paper>/configs/<scale>/<experiment>.yaml)")
    parser.add_argument("--method", help="label of one entry of the experiment's 'methods' grid")
    parser.add_argument("--output", help="run folder (default: output_dir, else runs/<experiment>/<method>/seed<k>)")
    parser.add_argument("--on-config-change", choices=("error", "restart"), default="error",
                        help="if the folder holds a run of another config: refuse (default), or move its files "
                        "to superseded-<hash>/ and start afresh (what the workflow uses)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after the options


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, method_label=args.method)
        out = Path(args.output or cfg.output_dir or default_output(cfg))
        train(cfg, out, command="python -m common.train " + " ".join(argv), on_change=args.on_config_change)
    except ReproError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume from the last checkpoint.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
