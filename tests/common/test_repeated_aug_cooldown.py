"""Repeated augmentation (DeiT's sampler through timm's) and cosine cool-down epochs (timm's --cooldown-epochs)."""

import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from common.config import config_hash, load_config, run_dict
from common.errors import ReproError
from common.train import build_scheduler, main, make_train_loader, train_sampler

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "papers/mixup/configs/smoke/cifar10_preactresnet18.yaml"
TINY = ["model.kwargs.width=8", "train.batch_size=50", "data.num_workers=0"]


def process(rank=0, world=1):
    """What the loader needs of an Accelerator."""
    return SimpleNamespace(process_index=rank, num_processes=world)


def order(cfg, epoch, rank=0, world=1, n=600):
    """The indices one process draws in one epoch, through the trainer's loader."""
    loader = make_train_loader(TensorDataset(torch.arange(n)), cfg, epoch, process(rank, world))
    return [int(i) for (batch,) in loader for i in batch], len(loader)


def runs(seq):
    """Run-length encoding: [(value, count), ...]."""
    out = []
    for x in seq:
        if out and out[-1][0] == x:
            out[-1][1] += 1
        else:
            out.append([x, 1])
    return out


# -------------------------------------------------------------------------------- repeated augmentation
def test_epoch_keeps_deits_length_with_consecutive_repeats():
    cfg = load_config(None, ["data.repeated_aug=3", "train.batch_size=64"])
    seq, batches = order(cfg, epoch=0)
    assert len(seq) == 600 // 256 * 256 == 512 and batches == 512 // 64  # DeiT's RASampler epoch
    counts = runs(seq)
    assert len({value for value, _ in counts}) == len(counts)  # an index never comes back after its run
    assert all(c == 3 for _, c in counts[:-1]) and 1 <= counts[-1][1] <= 3  # only the cut at 512 shortens one
    assert len(counts) == math.ceil(512 / 3)


def test_order_depends_on_seed_and_epoch_only():
    cfg0 = load_config(None, ["data.repeated_aug=3", "train.batch_size=64", "seed=0"])
    cfg1 = load_config(None, ["data.repeated_aug=3", "train.batch_size=64", "seed=1"])
    assert order(cfg0, 4) == order(cfg0, 4)  # resumable: rebuilt from (seed, epoch) alone
    assert order(cfg0, 4)[0] != order(cfg1, 4)[0]  # timm's sampler alone would give every seed one order
    assert order(cfg0, 4)[0] != order(cfg0, 5)[0]


def test_two_processes_split_the_single_process_list():
    cfg = load_config(None, ["data.repeated_aug=3"])
    dataset = TensorDataset(torch.arange(600))
    full = list(train_sampler(dataset, cfg, 2, process(0, 1)))
    ranks = [list(train_sampler(dataset, cfg, 2, process(r, 2))) for r in (0, 1)]
    assert [len(r) for r in ranks] == [256, 256]  # floor(600 / 256) * 256 / 2 per process
    assert [x for pair in zip(*ranks) for x in pair] == full  # rank r takes positions r, r + 2, ...
    # the copies of one image go to different processes (positions 3k, 3k+1, 3k+2 of the list)
    assert full[0] == full[1] == full[2] and ranks[0][0] == ranks[1][0]


def test_worker_seeds_differ_between_processes():
    """Copies of an image sit at the same batch position on different processes: they need distinct
    augmentation streams, i.e. distinct loader generators. Without repeats too: every process augments with its
    own stream, as DeiT and timm seed each rank apart (seed + rank)."""
    def seed(extra, rank):
        cfg = load_config(None, ["train.batch_size=64", *extra])
        loader = make_train_loader(TensorDataset(torch.arange(600)), cfg, 3, process(rank, 2))
        return loader.generator.initial_seed()

    assert seed(["data.repeated_aug=3"], 0) != seed(["data.repeated_aug=3"], 1)
    assert seed([], 0) != seed([], 1)


def test_trainer_steps_per_epoch_is_the_loaders_length(tmp_path):
    """Per-step cosine with one cool-down epoch of two: the cosine ends exactly at the end of epoch 1 only if
    the scheduler's updates per epoch equal the loader's batches (1000 images -> 768 kept -> 15 of 50)."""
    out = tmp_path / "run"
    args = ["--config", str(SMOKE), "--method", "erm", "--output", str(out), *TINY, "train.epochs=2",
            "data.repeated_aug=3", "schedule.name=cosine", "schedule.per=step", "schedule.min_lr=0.001",
            "schedule.cooldown_epochs=1"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["lr"] == pytest.approx(0.001, abs=1e-12) and rows[1]["lr"] == pytest.approx(0.001, abs=1e-12)
    state = torch.load(out / "checkpoint/last.pt", weights_only=False)
    assert state["updates"] == 2 * 15


# ------------------------------------------------------------------------------------------- cool-down
def lrs_used(scheduler, optimizer, epochs, updates_per_epoch):
    """The lr of every optimiser update, stepping the scheduler as common.train does (and timm's train.py)."""
    used, updates = [], 0
    for epoch in range(epochs):
        scheduler.step(epoch)
        for _ in range(updates_per_epoch):
            used.append(optimizer.param_groups[0]["lr"])
            updates += 1
            scheduler.step_update(updates)
    return used


def ours(per, warmup, epochs=12, cooldown=2, upe=4, base=0.1, min_lr=0.001):
    cfg = load_config(None, [f"train.epochs={epochs}", f"schedule.cooldown_epochs={cooldown}",
                             f"schedule.warmup_epochs={warmup}", "schedule.warmup_lr=1e-5",
                             f"schedule.min_lr={min_lr}", f"schedule.per={per}", f"optim.lr={base}"])
    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=base)
    return lrs_used(build_scheduler(opt, cfg, upe), opt, epochs, upe)


@pytest.mark.parametrize("per", ["epoch", "step"])
def test_cosine_without_warmup_then_min_lr(per):
    upe, base, min_lr = 4, 0.1, 0.001
    used = ours(per, warmup=0, upe=upe, base=base, min_lr=min_lr)
    cosine = lambda t, T: min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / T))
    if per == "epoch":
        expected = [cosine(e, 10) for e in range(10) for _ in range(upe)]
    else:
        expected = [cosine(k, 10 * upe) for k in range(10 * upe)]
    assert used[:10 * upe] == pytest.approx(expected, rel=1e-12)
    assert used[10 * upe:] == [min_lr] * (2 * upe)  # the cool-down: epochs 11 and 12


@pytest.mark.parametrize("per", ["epoch", "step"])
def test_matches_timms_own_cooldown_with_warmup(per):
    """timm's create_scheduler_v2 (what timm's train.py uses) with --epochs 10 --cooldown-epochs 2
    --warmup-epochs 1 (warm-up inside the cosine, warmup_prefix False) asks for 12 epochs: the same lrs."""
    from timm.scheduler import create_scheduler_v2

    upe = 4
    used = ours(per, warmup=1, upe=upe)
    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    sched, total = create_scheduler_v2(opt, sched="cosine", num_epochs=10, cooldown_epochs=2, warmup_epochs=1,
                                       warmup_lr=1e-5, min_lr=0.001, step_on_epochs=per == "epoch",
                                       updates_per_epoch=upe)
    assert total == 12
    assert used == pytest.approx(lrs_used(sched, opt, 12, upe), rel=1e-12)
    assert used[0] == pytest.approx(1e-5) and used[10 * upe:] == [0.001] * (2 * upe)


def test_cooldown_outside_cosine_or_too_long_is_an_error():
    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    for overrides, message in [
        (["schedule.name=multistep", "schedule.milestones=[5]", "schedule.cooldown_epochs=2"], "cosine schedule"),
        (["train.epochs=10", "schedule.cooldown_epochs=10"], "train.epochs counts the cool-down"),
        (["schedule.per=epoch", "schedule.cooldown_epochs=1.5"], "whole number"),
    ]:
        with pytest.raises(ReproError, match=message):
            build_scheduler(opt, load_config(None, overrides), 4)


# ------------------------------------------------------------------------------------- bad input, CLI
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["schedule.cooldown_epochs=1"], "schedule.name=multistep"),  # the smoke config is multistep
        (["data.repeated_aug=3", "data.device_cache=true"], "data.device_cache=false"),
        (["data.repeated_aug=-1"], "data.repeated_aug"),
    ],
)
def test_bad_input_fails_before_the_output_folder_exists(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    code = main(["--config", str(SMOKE), "--method", "erm", "--output", str(out), *TINY,
                 "train.max_steps_per_epoch=2", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists()


def test_end_to_end_repeats_and_a_cooldown_epoch_at_min_lr(tmp_path):
    out = tmp_path / "run"
    assert main(["--config", str(SMOKE), "--method", "erm", "--output", str(out), *TINY, "train.epochs=2",
                 "data.repeated_aug=3", "schedule.name=cosine", "schedule.per=epoch", "schedule.min_lr=0.002",
                 "schedule.cooldown_epochs=1"]) == 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] == pytest.approx(0.1) and rows[1]["lr"] == pytest.approx(0.002)
    assert (out / "metrics.json").exists()


# ---------------------------------------------------------------------------------------- config hash
def hash_without_new_options(cfg):
    """The hash as computed before the new options existed (the pre-change config_hash, written out)."""
    data = run_dict(cfg)
    for key in ("output_dir", "resources"):
        data.pop(key)
    for key in ("num_workers", "root", "repeated_aug", "shuffle", "options"):
        data["data"].pop(key)
    del data["optim"]["reset_each_epoch"]
    if data["data"]["val_per_class"] is False:
        del data["data"]["val_per_class"]
    del data["schedule"]["cooldown_epochs"]
    del data["schedule"]["warmup_prefix"]
    del data["train"]["find_unused_parameters"]
    del data["train"]["world_size"]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_new_options_at_their_neutral_value_keep_the_hash():
    path = REPO / "papers/cmixup/configs/proxy/airfoil.yaml"
    cfg = load_config(path, method_label="erm")
    assert config_hash(cfg) == hash_without_new_options(cfg)
    explicit = load_config(path, ["data.repeated_aug=0", "schedule.cooldown_epochs=0"], method_label="erm")
    assert config_hash(explicit) == config_hash(cfg)
    assert config_hash(cfg) == "808073dde329fe61"  # computed before the options were added
    assert config_hash(load_config(path, ["train.world_size=1"], method_label="erm")) == config_hash(cfg)
    for changed in (["data.repeated_aug=3"], ["schedule.cooldown_epochs=1"], ["train.find_unused_parameters=true"],
                    ["train.world_size=2"], ["optim.reset_each_epoch=true"], ["schedule.warmup_prefix=true"]):
        assert config_hash(load_config(path, changed, method_label="erm")) != config_hash(cfg)


@pytest.mark.parametrize("path", sorted(REPO.glob("papers/transmix/configs/paper/imagenet_deit_*.yaml")),
                         ids=lambda p: p.stem)
def test_transmix_deit_configs_set_repeats_and_cooldown_as_their_recipe(path):
    cfg = load_config(path, method_label="transmix")
    if path.stem.endswith("_deit"):  # DeiT main.py: RASampler on, trains --epochs 300, drops timm's cool-down
        assert (cfg.data.repeated_aug, cfg.train.epochs, cfg.schedule.cooldown_epochs) == (3, 300, 0)
    else:  # TransMix's train.py (timm 0.5.4): aug_repeats 0, loops over 300 + 10 cool-down epochs
        assert (cfg.data.repeated_aug, cfg.train.epochs, cfg.schedule.cooldown_epochs) == (0, 310, 10)


# ------------------------------------------------------------------------------------------- multistep
def multistep_lrs(per, milestones, epochs, upe=3, base=0.1, gamma=0.1):
    cfg = load_config(None, [f"train.epochs={epochs}", "schedule.name=multistep", f"schedule.per={per}",
                             f"schedule.milestones={list(milestones)}", f"schedule.gamma={gamma}", f"optim.lr={base}"])
    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=base)
    return lrs_used(build_scheduler(opt, cfg, upe), opt, epochs, upe)


@pytest.mark.parametrize("per", ["epoch", "step"])
def test_multistep_milestone_m_drops_after_m_epochs_as_torchs_multisteplr(per):
    """torch's MultiStepLR stepped once after each epoch (RankMixup, CutMix's `epoch // m` rule): milestone m = the
    lr drops from 0-based epoch m on."""
    upe, base = 3, 0.1
    used = multistep_lrs(per, [100, 150], 200, upe, base)
    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=base)
    torch_sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[100, 150], gamma=0.1)
    reference = []
    for _ in range(200):
        reference += [opt.param_groups[0]["lr"]] * upe
        opt.step()
        torch_sched.step()
    assert used == pytest.approx(reference, rel=1e-12)
    assert used[99 * upe] == base and used[100 * upe] == pytest.approx(base / 10)


@pytest.mark.parametrize("config", ["paper/cifar10_preactresnet18.yaml", "paper/cifar10_wrn28_10.yaml",
                                    "proxy/cifar10_preactresnet18.yaml"])
def test_mixup_configs_run_the_official_loop_order(config):
    """facebookresearch/mixup-cifar10 train.py: `train(epoch); test(epoch); adjust_learning_rate(epoch)` with
    `if epoch >= 100: lr /= 10` (and 150): the new lr applies from the next epoch, so epochs 0-100 run at 0.1."""
    cfg = load_config(Path(__file__).parents[2] / "papers" / "mixup" / "configs" / config, method_label="mixup")
    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=cfg.optim.lr)
    used = lrs_used(build_scheduler(opt, cfg, 1), opt, cfg.train.epochs, 1)

    official, lr = [], cfg.optim.lr
    for epoch in range(cfg.train.epochs):
        official.append(lr)  # train(epoch) and test(epoch) run at the current lr
        lr = cfg.optim.lr / (10 if epoch >= 100 else 1) / (10 if epoch >= 150 else 1)  # adjust_learning_rate
    assert used == pytest.approx(official, rel=1e-12)


# ------------------------------------------------------------------------------------------- warm-up prefix
RESIZEMIX_SCHEDULER = Path("/work/.mirror/JayQine+ResizeMix/repo")


def resizemix_official_lrs(total, warmup, base, start, eta_min):
    """JayQine/ResizeMix tools/lr_scheduler.py CosineRestartAnnealingLR without restarts, `.step()` before every
    batch: linear warm-up start -> base over `warmup` steps, then a cosine over the remaining total - warmup steps."""
    lrs = []
    for k in range(total):
        if k < warmup:
            lrs.append(start + (base - start) / warmup * k)
        else:
            lrs.append(eta_min + (base - eta_min) * (1 + math.cos((k - warmup) * math.pi / (total - warmup))) / 2)
    return lrs


@pytest.mark.parametrize("config", sorted((REPO / "papers/resizemix/configs/paper").glob("cifar*.yaml")),
                         ids=lambda p: p.stem)
def test_resizemix_cifar_configs_warm_up_then_run_the_whole_cosine(config):
    upe = 5  # steps per epoch (any: the schedule is per step)
    cfg = load_config(config, method_label="resizemix")
    assert cfg.schedule.warmup_prefix
    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=cfg.optim.lr)
    used = lrs_used(build_scheduler(opt, cfg, upe), opt, cfg.train.epochs, upe)
    total, warmup = cfg.train.epochs * upe, round(cfg.schedule.warmup_epochs * upe)
    expected = resizemix_official_lrs(total, warmup, cfg.optim.lr, cfg.schedule.warmup_lr, cfg.schedule.min_lr)
    assert used == pytest.approx(expected, rel=1e-9, abs=1e-12)
    overlapping = load_config(config, ["schedule.warmup_prefix=false"], method_label="resizemix")
    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=cfg.optim.lr)
    assert lrs_used(build_scheduler(opt, overlapping, upe), opt, 20, upe)[warmup] != pytest.approx(expected[warmup])


@pytest.mark.skipif(not RESIZEMIX_SCHEDULER.exists(), reason="the fetched JayQine/ResizeMix mirror is absent")
def test_warmup_prefix_matches_the_authors_scheduler_run_beside_it():
    import subprocess
    import types

    source = subprocess.run(["git", "-C", str(RESIZEMIX_SCHEDULER), "show", "HEAD:tools/lr_scheduler.py"],
                            capture_output=True, text=True, check=True).stdout
    official = types.ModuleType("resizemix_lr_scheduler")
    exec(compile(source, "tools/lr_scheduler.py", "exec"), official.__dict__)  # noqa: S102 (the authors' file)
    epochs, upe, base = 12, 4, 0.2
    theirs_opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=base)
    theirs = official.CosineRestartAnnealingLR(theirs_opt, float(epochs * upe), [], [], eta_min=1e-5,
                                               use_warmup=True, warmup_steps=3 * upe, warmup_startlr=1e-5,
                                               warmup_targetlr=base)
    reference = []
    for _ in range(epochs * upe):
        theirs.step()
        reference.append(theirs_opt.param_groups[0]["lr"])
    cfg = load_config(None, [f"train.epochs={epochs}", "schedule.per=step", "schedule.warmup_epochs=3",
                             "schedule.warmup_lr=1e-5", "schedule.min_lr=1e-5", "schedule.warmup_prefix=true",
                             f"optim.lr={base}"])
    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=base)
    assert lrs_used(build_scheduler(opt, cfg, upe), opt, epochs, upe) == pytest.approx(reference, rel=1e-9)


def test_warmup_prefix_is_refused_outside_the_cosine():
    cfg = load_config(None, ["schedule.name=multistep", "schedule.milestones=[2]", "schedule.warmup_prefix=true"])
    with pytest.raises(ReproError, match="warmup_prefix=true applies to the cosine schedule only"):
        build_scheduler(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1), cfg, 1)
