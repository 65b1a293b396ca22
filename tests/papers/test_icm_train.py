"""ICM through the shared trainer on the committed Fashion-MNIST sample: the official Adam re-created every epoch
(optim.reset_each_epoch), both reported numbers (official best drop-last view, honest last epoch), the per-epoch
noise and purity statistics, and data.options validation."""

import json

import pytest
import torch

from common.config import config_hash, load_config
from common.data import build_splits
from common.errors import ReproError
from common.safeload import safe_load
from common.train import train

SMOKE = "papers/icm/configs/smoke/fmnist_uniform.yaml"


def run(tmp_path, method, *overrides):
    cfg = load_config(SMOKE, list(overrides), method_label=method)
    out = tmp_path / method
    metrics = train(cfg, out, command="test")
    return cfg, out, metrics


def test_adam_state_restarts_every_epoch_only_when_asked(tmp_path):
    steps_per_epoch = 600 // 64
    cfg, out, _ = run(tmp_path, "none")
    state = safe_load(out / "checkpoint" / "last.pt")["optimizer"]["state"]
    assert cfg.optim.reset_each_epoch and cfg.optim.name == "adam"
    assert {int(s["step"]) for s in state.values()} == {steps_per_epoch}  # the second epoch's steps only
    cfg2, out2, _ = run(tmp_path / "kept", "none", "optim.reset_each_epoch=false")
    state = safe_load(out2 / "checkpoint" / "last.pt")["optimizer"]["state"]
    assert {int(s["step"]) for s in state.values()} == {2 * steps_per_epoch}
    assert config_hash(cfg) != config_hash(cfg2)


def test_both_numbers_and_the_noise_statistics_are_logged(tmp_path):
    _, out, metrics = run(tmp_path, "icm_official")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    official = max(r["val_top1"] for r in rows)  # best over epochs on the drop-last view
    assert metrics["selected"]["val"]["top1"] == official
    assert metrics["final"]["top1"] == rows[-1]["test_top1"]
    for r in rows:
        stats = r["method_stats"]
        assert 0 <= stats["noise_rate"] <= 1 and 0 < stats["cluster_purity"] <= 1 and stats["pairs"] > 0
    _, val, test, _ = build_splits("fashion_mnist_cll-mini", split_seed=0, options={"test_drop_last": 64})
    assert len(val) == 192 and len(test) == 200 and torch.equal(val.images, test.images[:192])


def test_unknown_data_option_and_options_on_a_dataset_without_any(tmp_path):
    with pytest.raises(ReproError, match="no option 'k_clusters'.*k_cluster"):
        build_splits("fashion_mnist_cll-mini", options={"k_clusters": 5})
    with pytest.raises(ReproError, match="takes none"):
        build_splits("cifar10-mini", options={"k_cluster": 5})


class WritesAMarker:
    """Unpickling this calls open(marker, 'w'): what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_simsiam_clusters_load_the_encoder_weights_and_refuse_code(tmp_path):
    import torchvision

    from papers.icm.data import cluster_ids, simsiam_features

    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    state = {f"module.encoder.{k}": v for k, v in net.state_dict().items()}
    state["module.predictor.0.weight"] = torch.zeros(2, 2)  # SimSiam's predictor: ignored
    path = tmp_path / "simsiam.pth.tar"
    torch.save({"epoch": 800, "state_dict": state}, path)
    images = torch.randn(6, 784)
    net.fc = torch.nn.Identity()
    net.eval()
    with torch.no_grad():
        expected = net(images.view(-1, 1, 28, 28))
    assert torch.allclose(simsiam_features(images, str(path)), expected)
    ids = cluster_ids(images, [0, 1, 2, 0, 1, 2], "simsiam", k=2, seed=0, simsiam_checkpoint=str(path))
    assert ids.shape == (6,) and set(ids) <= {0, 1}

    marker = tmp_path / "ran"
    torch.save({"state_dict": state, "payload": WritesAMarker(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ReproError):
        simsiam_features(images, str(tmp_path / "evil.pth"))
    assert not marker.exists()
    with pytest.raises(ReproError, match="simsiam_checkpoint"):
        cluster_ids(images, [0] * 6, "simsiam", k=2, seed=0)
