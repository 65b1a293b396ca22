"""DTI (papers/cmixup/dti.py): the authors' pickles read safely (files the test writes as the official
`store_x_y` does), the splits and domains, the encoder against `Learner_Dti_dg` / `DTI_Encoder` written out (forward
and `forward_mixup` at every pair of mixing layers), the C-Mixup step on it, and the worst-domain r."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.data import build_splits
from common.errors import ReproError
from common.methods import StepContext, build_method
from common.metrics import regression_metrics
from papers.cmixup import dti

WIDTH = 63 * 100 + 26 * 1000


def one_hot_rows(n: int, seed: int) -> torch.Tensor:
    """`(n, 32300)` rows as the official loader builds them: one-hot SMILES (63, 100) then protein (26, 1000)."""
    g = torch.Generator().manual_seed(seed)
    drug = F.one_hot(torch.randint(0, 63, (n, 100), generator=g), 63).transpose(1, 2)
    protein = F.one_hot(torch.randint(0, 26, (n, 1000), generator=g), 26).transpose(1, 2)
    return torch.cat([drug.reshape(n, -1), protein.reshape(n, -1)], 1).float()


def write_official_files(folder, sizes=(10, 4, (3, 2))):
    """The four files, each `pickle.dump((x, y))` as `store_x_y`; test = the years' rows in shuffled order."""
    folder.mkdir(parents=True, exist_ok=True)
    n_train, n_valid, years = sizes
    packets = {"train": (one_hot_rows(n_train, 0), torch.randn(n_train, 1)),
               "valid": (one_hot_rows(n_valid, 1), torch.randn(n_valid, 1))}
    xs = [one_hot_rows(n, 2 + k) for k, n in enumerate(years)]
    ys = [torch.randn(n, 1) for n in years]
    order = torch.randperm(sum(years))
    packets["test"] = (torch.cat(xs)[order], torch.cat(ys)[order])
    packets["test_assay_list"] = (xs, ys)
    for name, packet in packets.items():
        with open(folder / f"DTI_sub100_{name}.pkl", "wb") as fh:
            pickle.dump(packet, fh)
    return packets


def test_registry_reads_the_authors_files(tmp_path):
    packets = write_official_files(tmp_path / "dti")
    train, val, test, info = build_splits("dti", root=tmp_path / "dti", allow_download=False)
    assert torch.equal(train.features, packets["train"][0]) and torch.equal(val.targets, packets["valid"][1])
    xs, ys = packets["test_assay_list"]
    assert torch.equal(test.features, torch.cat(xs)) and torch.equal(test.targets, torch.cat(ys))
    assert test.domains.tolist() == [0, 0, 0, 1, 1] and info.task == "regression"


def test_missing_files_are_one_line_naming_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_DATA_DIR", str(tmp_path))
    with pytest.raises(ReproError) as err:
        build_splits("dti", allow_download=False)
    assert "\n" not in str(err.value) and str(tmp_path / "dti" / "DTI_sub100_train.pkl") in str(err.value)


def test_files_that_do_not_pair_up_are_refused(tmp_path):
    write_official_files(tmp_path / "dti")
    with open(tmp_path / "dti" / "DTI_sub100_test.pkl", "wb") as fh:
        pickle.dump((one_hot_rows(4, 9), torch.randn(4, 1)), fh)
    with pytest.raises(ReproError, match="not one set"):
        build_splits("dti", root=tmp_path / "dti", allow_download=False)


class _Touch:
    """A pickle that would create a file when loaded by plain pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "created"
    with open(tmp_path / "bad.pkl", "wb") as fh:
        pickle.dump((_Touch(target), torch.zeros(1)), fh)
    with pytest.raises(ReproError, match="pickled tensors"):
        dti.read_tensor_pickle(tmp_path / "bad.pkl")
    assert not target.exists()


# ------------------------------------------------------------------------- the official encoder, written out
def official_cnn(convs, fc1, x, mix_with=None, lam=None, layer=None):
    """networks.CNN.forward / forward_mixup: float64 convs + ReLU, mix after `layer`, max pool, fc1 on float."""
    x = x.double()
    if mix_with is None:
        for conv in convs:
            x = F.relu(conv(x))
    else:
        x1, x2, mixed = x, mix_with.double(), None
        for i, conv in enumerate(convs):
            if i <= layer:
                x1, x2 = F.relu(conv(x1)), F.relu(conv(x2))
            else:
                if mixed is None:
                    mixed = x1 * lam + x2 * (1 - lam)
                mixed = F.relu(conv(mixed))
        x = mixed if mixed is not None else x1 * lam + x2 * (1 - lam)
    x = F.adaptive_max_pool1d(x, output_size=1)
    return fc1(x.view(x.size(0), -1).float())


def official_forward(model, x1, x2=None, lam=None, layers=(None, None)):
    """Learner_Dti_dg.forward / forward_mixup with DTI_Encoder's predictor loop (no activations) and classifier."""
    d1, p1 = x1[:, :6300].reshape(-1, 63, 100), x1[:, 6300:].reshape(-1, 26, 1000)
    if x2 is None:
        d2 = p2 = None
    else:
        d2, p2 = x2[:, :6300].reshape(-1, 63, 100), x2[:, 6300:].reshape(-1, 26, 1000)
    v_d = official_cnn(model.drug.conv, model.drug.fc1, d1, d2, lam, layers[0])
    v_p = official_cnn(model.protein.conv, model.protein.fc1, p1, p2, lam, layers[1])
    v_f = torch.cat((v_d, v_p), 1)
    for layer in model.predictor:
        v_f = layer(v_f)
    return model.head(v_f)


def test_encoder_equals_the_official_forward_and_forward_mixup_at_every_layer_pair():
    torch.manual_seed(0)
    model = dti.dti_encoder(num_classes=1).eval()
    assert model.drug.conv[0].weight.dtype == torch.float64 and model.drug.fc1.weight.dtype == torch.float32
    x1, x2, lam = one_hot_rows(2, 5), one_hot_rows(2, 6), 0.37
    plain = model(x1)
    torch.testing.assert_close(plain, official_forward(model, x1), rtol=0, atol=0)
    packed1, packed2 = model.block_1(x1), model.block_1(x2)
    for drug_layer in range(3):
        for protein_layer in range(3):
            model.mix_layers = (drug_layer, protein_layer)
            ours = model.forward_head(model.block_2(packed1 * lam + packed2 * (1 - lam)))
            official = official_forward(model, x1, x2, lam, (drug_layer, protein_layer))
            torch.testing.assert_close(ours, official, rtol=1e-6, atol=1e-7)
            # unmixed, every resume point gives the plain forward
            torch.testing.assert_close(model.forward_head(model.block_2(packed1)), plain)


def test_mixing_layers_are_drawn_uniformly_from_the_run_generator():
    model = dti.DTIEncoder()
    a = [model.draw_mixing_point(torch.Generator().manual_seed(3)) for _ in range(2)]
    assert a[0] == a[1]  # same generator state, same draw
    g = torch.Generator().manual_seed(0)
    counts = np.zeros((3, 3))
    for _ in range(900):
        counts[model.draw_mixing_point(g)] += 1
    assert counts.min() > 60 and counts.max() < 140  # 100 expected per pair; binomial sd ~9.4
    with pytest.raises(ReproError, match="draw_mixing_point"):
        dti.DTIEncoder().block_2(torch.zeros(1, 10))


def test_cmixup_manifold_step_draws_the_layers_and_trains(tmp_path, monkeypatch):
    write_official_files(tmp_path / "dti", sizes=(8, 2, (2, 2)))
    train, _, _, info = build_splits("dti", root=tmp_path / "dti", allow_download=False)
    method = build_method({"name": "cmixup", "alpha": 2.0, "bandwidth": 10.0, "manifold": True}, num_classes=1,
                          task="regression")
    method.prepare(train, info)
    model = dti.dti_encoder()
    method.check_model(model)
    monkeypatch.setattr(random, "sample", lambda *a: pytest.fail("Python's random must not be used"))
    ctx = StepContext(epoch=0, step=0, progress=0.0, generator=torch.Generator().manual_seed(1))
    out = method.step(model, (train.features[:4], train.targets[:4]), ctx)
    assert model.mix_layers is not None and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.drug.conv[0].weight.grad is not None and model.protein.conv[2].weight.grad.abs().sum() > 0


def test_worst_domain_r_is_the_smallest_absolute_r_signed():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(30, generator=g)
    pred = torch.cat([true[:10] + 0.1 * torch.randn(10, generator=g),  # r ~ +1
                      -true[10:20] + 2.0 * torch.randn(10, generator=g),  # negative, weak
                      true[20:] + 0.5 * torch.randn(10, generator=g)])
    domains = torch.tensor([5] * 10 + [7] * 10 + [9] * 10)
    expected = [np.corrcoef(pred[i:i + 10].numpy(), true[i:i + 10].numpy())[0, 1] for i in (0, 10, 20)]
    worst = min(expected, key=abs)
    out = regression_metrics(pred[:, None], true[:, None], domains=domains)
    assert out["r_worst_domain"] == pytest.approx(worst, abs=1e-9)
