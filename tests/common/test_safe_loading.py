"""Checkpoints load with weights_only=True: new ones hold plain types only, pre-#16 ones (NumPy RNG state) still
resume exactly, and a crafted one that would run code is refused, by resume and by the figures, with the code
never run."""

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import ReproError
from common.train import main, rng_state, set_rng_state

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "papers/mixup/configs/smoke/cifar10_preactresnet18.yaml"
TINY = ["model.kwargs.width=8", "train.batch_size=50", "data.num_workers=0", "train.max_steps_per_epoch=2"]


class WritesAMarker:
    """Unpickling this calls open(marker, 'w'): what a malicious run folder could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def run(out, *overrides):
    return main(["--config", str(SMOKE), "--method", "mixup", "--output", str(out), *TINY, *overrides])


def test_rng_state_round_trips_and_needs_no_allow_list(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert run(root / "full", "train.epochs=2") == 0
    assert run(root / "half", "train.epochs=2", "train.checkpoint_every=1") == 0
    return root


def test_a_checkpoint_holds_only_what_weights_only_reads(runs):
    state = torch.load(runs / "full/checkpoint/last.pt", weights_only=True)  # no allow-list at all
    assert state["epoch"] == 2 and isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)


def test_a_checkpoint_of_the_previous_format_resumes_to_the_same_weights(runs, tmp_path):
    # epoch 1 of the run, with NumPy's RNG state stored as the tuple np.random.get_state() returns (pre-#16)
    full = torch.load(runs / "full/checkpoint/last.pt", weights_only=True)
    out = tmp_path / "legacy"
    assert run(out, "train.epochs=1") == 0
    state = torch.load(out / "checkpoint/last.pt", weights_only=True)
    numpy_state = state["rng"]["numpy"]
    state["rng"]["numpy"] = ("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    state["config_hash"] = full["config_hash"]
    torch.save(state, out / "checkpoint/last.pt")
    with pytest.raises(pickle.UnpicklingError):  # it really names NumPy globals
        torch.load(out / "checkpoint/last.pt", weights_only=True)
    (out / "metrics.json").unlink()
    assert run(out, "train.epochs=2") == 0
    resumed = torch.load(out / "checkpoint/last.pt", weights_only=True)
    assert resumed["epoch"] == 2
    for key, value in full["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def crafted_checkpoint(folder, marker):
    path = folder / "checkpoint/last.pt"
    path.parent.mkdir(parents=True)
    torch.save({"config_hash": "x", "epoch": 1, "model": {}, "payload": WritesAMarker(marker)}, path)
    return path


def test_the_crafted_file_would_run_code_without_weights_only(tmp_path):
    marker = tmp_path / "ran"
    torch.load(crafted_checkpoint(tmp_path, marker), weights_only=False)
    assert marker.exists()  # so the two tests below test something


def test_resume_refuses_a_crafted_checkpoint_and_never_runs_it(tmp_path, capsys):
    marker = tmp_path / "ran"
    crafted_checkpoint(tmp_path / "run", marker)
    assert run(tmp_path / "run", "train.epochs=1") == 2
    err = capsys.readouterr().err
    assert "error: refusing to load checkpoint" in err and "GLOBAL io.open" in err and "delete" in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    assert not marker.exists() and not (tmp_path / "run/metrics.json").exists()


def test_figures_refuse_a_crafted_checkpoint_and_never_run_it(tmp_path):
    from common.config import load_config
    from common.plots import load_trained_model

    marker = tmp_path / "ran"
    path = crafted_checkpoint(tmp_path, marker)
    cfg = load_config(SMOKE, ["model.kwargs.width=8"], method_label="mixup")
    with pytest.raises(ReproError, match="refusing to load checkpoint"):
        load_trained_model(path, cfg, num_classes=10)
    assert not marker.exists()
