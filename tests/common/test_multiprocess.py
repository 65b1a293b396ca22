"""Multi-process training under Accelerate on CPU (gloo): the same global batches as one process, per-process
random draws, evaluation that counts every example once, one writer, exact resume after SIGKILL, the process
count in the run's identity, and TransMix / SMMix on a DDP-wrapped model.

Two CPU processes are started as `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2`:
`accelerate launch --cpu --num_processes 2` takes accelerate's simple launcher, which starts ONE process unless
mpirun is configured (accelerate 1.x `launch_command`), so a "2-process" test run that way would test nothing.
`tests/common/mp_driver.py` runs the unchanged trainer and records what each process drew and evaluated.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

from common.config import config_hash, load_config, with_world_size
from common.errors import ReproError
from common.train import GlobalBatchSampler, derived_seed, main, make_train_loader
from common.workflow import run_config_hash

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("mp_driver.py")
VIT = {"name": "vit_tiny_patch4_32", "kwargs": {"depth": 1, "embed_dim": 48, "num_heads": 3}}


# ------------------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as sock:  # other test sessions may run beside this one: never the fixed 29500
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(tmp_path: Path) -> dict:
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", REPRO_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("REPRO_TEST_PAUSE_AFTER_EPOCH", None)
    return env


def launch_command(record: Path, args: list) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), str(DRIVER), str(record), *map(str, args)]


def launch(record: Path, args: list, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(launch_command(record, args), cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def ranks(record: Path) -> list[dict]:
    return [json.loads((record / f"rank{r}.json").read_text()) for r in range(2)]


def experiment(root: Path, name: str, body: dict) -> Path:
    """An experiment config in a workflow layout under `root` (papers/mp/configs/smoke/<name>.yaml)."""
    path = root / "papers/mp/configs/smoke" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"paper": "mp", "experiment": name, "scale": "smoke", "seeds": [0], **body}))
    return path


def weights(run: Path) -> dict:
    return torch.load(run / "checkpoint/last.pt", weights_only=False)["model"]


def same_metrics(rec: list[dict]) -> bool:
    """Every process returned the same metrics (each measures its own wall time)."""
    strip = [{k: v for k, v in r["metrics"].items() if k != "wall_time_s"} for r in rec]
    return all(m == strip[0] for m in strip)


def log_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in rows]


# ------------------------------------------------------------------------------- data order (no launch)
def fake_accelerator(world: int, rank: int):
    return SimpleNamespace(num_processes=world, process_index=rank)


@pytest.mark.parametrize("world", [2, 3])
def test_processes_split_exactly_the_batches_of_one_process(world):
    """Rank r's batch i is the r-th block of batch i of one process with a world-times larger batch."""
    data = TensorDataset(torch.arange(103))  # 103 = no whole number of global batches: the rest is dropped
    cfg = load_config(None, ["train.batch_size=4", "data.num_workers=0"])
    big = load_config(None, [f"train.batch_size={4 * world}", "data.num_workers=0"])
    for epoch in (0, 1):
        single = [b[0] for b in make_train_loader(data, big, epoch, fake_accelerator(1, 0))]
        shards = [[b[0] for b in make_train_loader(data, cfg, epoch, fake_accelerator(world, r))]
                  for r in range(world)]
        assert len(single) == 103 // (4 * world) and all(len(s) == len(single) for s in shards)
        for i, batch in enumerate(single):
            assert torch.equal(torch.cat([s[i] for s in shards]), batch), (epoch, i)
    assert len(GlobalBatchSampler(103, 4, world, 0, seed=0)) == (103 // (4 * world)) * 4
    # each process's workers get their own base seed (augmentation streams differ per process, as DeiT/timm)
    seeds = {make_train_loader(data, cfg, 0, fake_accelerator(world, r)).generator.initial_seed()
             for r in range(world)}
    assert len(seeds) == world


def test_device_cache_processes_take_the_augmented_batches_of_one_process():
    from common.data import CIFAR10_MEAN, CIFAR10_STD
    from common.fastdata import DeviceLoader

    def loader(batch_size, world, rank):
        dev = DeviceLoader.__new__(DeviceLoader)  # the batching law alone, on synthetic uint8 images
        dev.images = torch.randint(0, 256, (50, 3, 8, 8), generator=torch.Generator().manual_seed(1),
                                   dtype=torch.uint8)
        dev.labels = torch.arange(50)
        dev.mean, dev.std, dev.batch_size, dev.rank, dev.world = CIFAR10_MEAN, CIFAR10_STD, batch_size, rank, world
        return list(dev.epoch(torch.Generator().manual_seed(7)))

    single = loader(10, 1, 0)
    shards = [loader(5, 2, r) for r in range(2)]
    assert len(single) == 5 and all(len(s) == 5 for s in shards)
    for i, (images, labels) in enumerate(single):
        assert torch.equal(torch.cat([s[i][1] for s in shards]), labels)
        assert torch.equal(torch.cat([s[i][0] for s in shards]), images)  # same crop and flip per image


# ------------------------------------------------------------------------------ run identity (no launch)
def test_world_size_is_in_the_hash_and_the_workflow_computes_the_trainers(tmp_path):
    base = {"data": {"name": "cifar10-mini", "num_workers": 0}, "model": VIT, "methods": {"erm": {"name": "erm"}}}
    for gpus, processes in ((0, 1), (1, 1), (2, 2), (8, 8)):
        path = experiment(tmp_path, f"g{gpus}", {**base, "resources": {"gpus": gpus}})
        cfg = load_config(path, ["seed=0"], method_label="erm")
        # what the trainer hashes once Accelerate has started `processes` processes
        trainer_hash = config_hash(with_world_size(cfg, processes, "test"))
        assert run_config_hash("mp", "smoke", f"g{gpus}", "erm", 0, root=tmp_path) == trainer_hash
        assert (trainer_hash == config_hash(cfg)) == (processes == 1)  # one process: the hash of before
    cfg = load_config(path, ["train.world_size=2"], method_label="erm")
    with pytest.raises(ReproError, match=r"train.world_size=2 but Accelerate started 1 process"):
        with_world_size(cfg, 1, "Accelerate started 1 process(es)")


def test_committed_cmixup_runs_keep_their_hash():
    """The workflow's hash of every committed C-Mixup Airfoil run is still the one its provenance recorded."""
    checked = 0
    for prov in sorted(REPO.glob("results/cmixup/proxy/airfoil/*/seed*/provenance.json")):
        record = json.loads(prov.read_text())
        method, seed = prov.parent.parent.name, int(prov.parent.name[len("seed"):])
        assert run_config_hash("cmixup", "proxy", "airfoil", method, seed) == record["config_hash"], prov
        checked += 1
    assert checked >= 20  # 4 methods x seeds 0-4 at least


# -------------------------------------------------------------------- ERM: 2 x b == 1 x 2b (one launch)
ERM = {
    "data": {"name": "cifar10-mini", "num_workers": 0, "device_cache": True, "val_split": 101},
    "model": VIT,
    "optim": {"name": "adamw", "lr": 1.0e-3},
    "schedule": {"name": "constant"},
    "train": {"epochs": 2, "batch_size": 25, "max_steps_per_epoch": 3, "eval_batch_size": 32},
    "resources": {"gpus": 2},
    "methods": {"erm": {"name": "erm"}},
}


@pytest.fixture(scope="module")
def erm_runs(tmp_path_factory):
    """One 2-process ERM run (batch 25 each) and the 1-process run with batch 50, same config otherwise.

    The device cache makes the comparison exact with augmentation on: both runs train on the same augmented
    global batches (DeviceLoader's law), and ERM draws nothing else; the ViT has no BatchNorm."""
    tmp = tmp_path_factory.mktemp("erm")
    config = experiment(tmp, "erm_vit", ERM)
    env = launch_env(tmp)
    two, record = tmp / "two", tmp / "record"
    launch(record, ["--config", config, "--method", "erm", "--output", two, "seed=0"], env)
    one = tmp / "one"
    old = os.environ.get("REPRO_CACHE_DIR")
    os.environ["REPRO_CACHE_DIR"] = env["REPRO_CACHE_DIR"]
    try:
        assert main(["--config", str(config), "--method", "erm", "--output", str(one), "seed=0",
                     "train.batch_size=50"]) == 0
    finally:
        if old is None:
            os.environ.pop("REPRO_CACHE_DIR")
        else:
            os.environ["REPRO_CACHE_DIR"] = old
    return SimpleNamespace(root=tmp, config=config, two=two, one=one, record=record)


@pytest.mark.slow
def test_two_processes_give_the_weights_of_one_process_with_twice_the_batch(erm_runs):
    from common.models import build_model
    from common.train import seed_globals

    two, one = weights(erm_runs.two), weights(erm_runs.one)
    state = torch.load(erm_runs.two / "checkpoint/last.pt", weights_only=False)
    assert state["world_size"] == 2 and state["updates"] == 6
    assert [len(r["steps"]) for r in ranks(erm_runs.record)] == [6, 6]
    seed_globals(derived_seed(0, 0, 0, 0))  # the trainer's initialisation
    init = build_model(VIT["name"], num_classes=10, **VIT["kwargs"]).state_dict()
    moved = 0
    for key in one:
        assert torch.allclose(two[key], one[key], atol=2e-5, rtol=1e-4), key
        moved += int(not torch.allclose(one[key], init[key], atol=1e-4))
    assert moved > len(one) // 2  # the comparison is about trained weights, not the shared initialisation
    # the logged training loss is the mean over both processes, as one process with the whole batch logs it
    for row_two, row_one in zip(log_rows(erm_runs.two), log_rows(erm_runs.one), strict=True):
        assert row_two["train_loss"] == pytest.approx(row_one["train_loss"], rel=1e-4)
        assert row_two["val_top1"] == row_one["val_top1"] and row_two["test_top1"] == row_one["test_top1"]
        assert row_two["test_nll"] == pytest.approx(row_one["test_nll"], rel=1e-4)


@pytest.mark.slow
def test_evaluation_counts_every_example_once_and_every_process_agrees(erm_runs):
    from common.data import build_splits
    from common.metrics import classification_metrics
    from common.models import build_model

    rec = ranks(erm_runs.record)
    # 101 validation rows and 200 test rows, each evaluated twice (2 epochs): no padded repeats gathered
    assert all(r["eval_rows"] == [101, 200, 101, 200] for r in rec)
    assert same_metrics(rec)  # every process computed the same metrics
    metrics = json.loads((erm_runs.two / "metrics.json").read_text())
    assert metrics == rec[0]["metrics"]
    assert sum(metrics["final_reliability"]["test"]["count"]) == 200
    # the logged metrics are those of the saved weights on the whole split, evaluated here in one process
    cfg = load_config(erm_runs.config, method_label="erm")
    _, val_ds, test_ds, info = build_splits("cifar10-mini", val_split=101, split_seed=0)
    model = build_model(cfg.model.name, num_classes=info.num_classes, **cfg.model.kwargs)
    model.load_state_dict(weights(erm_runs.two))
    model.eval()
    last = log_rows(erm_runs.two)[-1]
    for split, ds in (("val", val_ds), ("test", test_ds)):
        images, labels = zip(*(ds[i] for i in range(len(ds))), strict=True)
        with torch.no_grad():
            expected = classification_metrics(model(torch.stack(images)), torch.tensor(labels))
        assert last[f"{split}_top1"] == expected["top1"], split
        assert last[f"{split}_nll"] == pytest.approx(expected["nll"], rel=1e-5), split


@pytest.mark.slow
def test_only_the_main_process_writes_and_the_hash_matches_the_workflow(erm_runs):
    two = erm_runs.two
    assert sorted(p.name for p in two.iterdir()) == [
        ".lock", "checkpoint", "config.yaml", "log.jsonl", "metrics.json", "provenance.json"]
    assert [r["epoch"] for r in log_rows(two)] == [1, 2]  # one writer: each epoch logged once
    prov = json.loads((two / "provenance.json").read_text())
    assert prov["device_count"] == 2
    assert load_config(two / "config.yaml").train.world_size == 2
    # the workflow's hash (from resources.gpus: 2, without launching) is the one the 2-process trainer recorded
    assert prov["config_hash"] == run_config_hash("mp", "smoke", "erm_vit", "erm", 0, root=erm_runs.root)
    one = json.loads((erm_runs.one / "provenance.json").read_text())["config_hash"]
    assert one != prov["config_hash"]


@pytest.mark.slow
def test_another_process_count_is_refused_with_a_message(erm_runs, tmp_path, capsys):
    args = ["--config", str(erm_runs.config), "--method", "erm", "seed=0"]
    # a finished 2-process run, asked for again from one process
    before = (erm_runs.two / "metrics.json").read_bytes()
    assert main([*args, "--output", str(erm_runs.two)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "It ran with 2 processes and this launch has 1" in err
    assert (erm_runs.two / "metrics.json").read_bytes() == before
    # an interrupted 2-process run (its checkpoint alone), resumed from one process
    partial = tmp_path / "partial"
    (partial / "checkpoint").mkdir(parents=True)
    shutil.copy(erm_runs.two / "checkpoint/last.pt", partial / "checkpoint/last.pt")
    saved = (partial / "checkpoint/last.pt").read_bytes()
    assert main([*args, "--output", str(partial)]) == 2
    err = capsys.readouterr().err
    assert "written by a run of 2 process(es) and this launch has 1" in err and "--num_processes 2" in err
    assert (partial / "checkpoint/last.pt").read_bytes() == saved
    assert sorted(p.name for p in partial.iterdir()) == [".lock", "checkpoint"]
    # a config that names its process count, launched with another
    assert main([*args, "--output", str(tmp_path / "named"), "train.world_size=2"]) == 2
    assert "train.world_size=2 but Accelerate started 1 process" in capsys.readouterr().err


# ------------------------------------------------------------- TransMix: per-process draws, SIGKILL resume
TRANSMIX = [
    "--config", REPO / "papers/transmix/configs/smoke/cifar10_vit.yaml", "--method", "transmix",
    "model.kwargs={depth: 1, embed_dim: 48, num_heads: 3, drop_path_rate: 0.1}", "train.epochs=3",
    "train.batch_size=20", "train.max_steps_per_epoch=2", "data.num_workers=0", "seed=1",
]


@pytest.fixture(scope="module")
def transmix_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transmix")
    full, record = tmp / "full", tmp / "record"
    launch(record, [*TRANSMIX, "--output", full], launch_env(tmp))
    return SimpleNamespace(root=tmp, full=full, record=record)


@pytest.mark.slow
def test_transmix_under_ddp_draws_independently_per_process(transmix_run):
    rec = ranks(transmix_run.record)
    for rank, r in enumerate(rec):
        assert len(r["steps"]) == 6
        for step in r["steps"][::2]:  # the first step of each epoch: the generator as freshly seeded
            fresh = torch.Generator().manual_seed(derived_seed(1, step["epoch"], rank, 3)).get_state()
            assert step["generator"] == hashlib.sha256(fresh.numpy().tobytes()).hexdigest()
    lams = [[s["scalars"]["lam"] for s in r["steps"]] for r in rec]
    assert lams[0] != lams[1]  # the processes mix with their own draws (DeiT/timm seed each rank apart)
    # the class-token attention was read through the DDP wrapper on CutMix batches of both processes
    assert all(any("transmix_minus_area" in s["scalars"] for s in r["steps"]) for r in rec)
    assert same_metrics(rec)
    assert [row["epoch"] for row in log_rows(transmix_run.full)] == [1, 2, 3]


@pytest.mark.slow
def test_sigkill_of_every_process_resumes_to_the_uninterrupted_result(transmix_run):
    killed, record = transmix_run.root / "killed", transmix_run.root / "record-killed"
    env = dict(launch_env(transmix_run.root), REPRO_TEST_PAUSE_AFTER_EPOCH="1")
    proc = subprocess.Popen(launch_command(record, [*TRANSMIX, "--output", killed]), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (record / "paused").exists():
        time.sleep(0.1)
    assert (record / "paused").exists(), "the run never reached the end of epoch 1"
    pids = [int((record / f"pid{r}").read_text()) for r in range(2)]
    for pid in pids:  # a killed job: every process at once, nothing cleaned up
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists()
    assert torch.load(killed / "checkpoint/last.pt", weights_only=False)["epoch"] == 1

    resumed = launch(transmix_run.root / "record-resumed", [*TRANSMIX, "--output", killed],
                     launch_env(transmix_run.root))
    assert "resuming" in resumed.stdout + resumed.stderr
    full, again = weights(transmix_run.full), weights(killed)
    for key in full:
        assert torch.equal(full[key], again[key]), key
    assert log_rows(killed) == log_rows(transmix_run.full)
    assert json.loads((killed / "metrics.json").read_text())["final"] == \
        json.loads((transmix_run.full / "metrics.json").read_text())["final"]


# ------------------------------------------------------------------------- SMMix: motivating pass under DDP
@pytest.mark.slow
def test_smmix_motivating_pass_runs_on_a_ddp_model(tmp_path):
    run, record = tmp_path / "run", tmp_path / "record"
    launch(record, ["--config", REPO / "papers/smmix/configs/smoke/cifar10_vit.yaml", "--method", "smmix",
                    "--output", run, "model.kwargs={depth: 1, embed_dim: 48, num_heads: 3}", "train.epochs=1",
                    "train.batch_size=20", "train.max_steps_per_epoch=3", "data.num_workers=0",
                    # the token head gets no gradient on a Mixup step (paper configs set it, as official main.py)
                    "train.find_unused_parameters=true"], launch_env(tmp_path))
    rec = ranks(record)
    branches = [[s["scalars"]["smmix_batch"] for s in r["steps"]] for r in rec]
    # both branches ran: SMMix steps (motivating pass + token head through the DDP wrapper) and Mixup steps
    assert any(1.0 in b for b in branches) and any(0.0 in b for b in branches), branches
    assert same_metrics(rec)
    final = weights(run)
    assert all(torch.isfinite(v).all() for v in final.values())
