"""C-Mixup PovertyMap (issue #14): the WILDS poverty_v1.1 loader on a tiny sample written in the real layout, the
fold / split rules, the urban/rural worst-group r, the official partner draw and per-row mixing of `train_mixup`,
the multispectral ResNet-18 against a longhand description (and the official file when it is at hand), the
paper config's schedule, and training steps through `common.train`."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.config import load_config
from common.data import build_splits
from common.errors import ReproError
from common.methods import StepContext, build_method
from common.metrics import regression_metrics
from common.mixing import sample_beta
from papers.cmixup import poverty
from papers.cmixup.method import IndexedTargets, partners_excluding_self, sample_partners

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "papers/cmixup/configs/paper/poverty.yaml"
OFFICIAL_REPO = Path(os.environ.get("CMIXUP_OFFICIAL_REPO", "/work/.mirror/huaxiuyao+C-Mixup/repo"))
# dhs_metadata.csv's header in poverty_v1.1 (WILDS reads country, urban, wealthpooled; the rest rides along)
COLUMNS = ("lat", "lon", "wealthpooled", "country", "year", "urban", "nl_mean", "nl_center", "households")
# WILDS SURVEY_NAMES['2009-17A']['train'], transcribed separately from poverty.FOLD_COUNTRIES (which holds val, test)
FOLD_A_TRAIN = ("cameroon", "democratic_republic_of_congo", "ghana", "kenya", "lesotho", "malawi", "mozambique",
                "nigeria", "senegal", "togo", "uganda", "zambia", "zimbabwe")


# ------------------------------------------------------------------------------------------- tiny sample
def plain_fold_rows(countries, fold):
    """The split rules written out: OOD test / val by country, in-country rows permuted by WILDS' rng."""
    test = [i for i, c in enumerate(countries) if c in poverty.FOLD_COUNTRIES[fold]["test"]]
    val = [i for i, c in enumerate(countries) if c in poverty.FOLD_COUNTRIES[fold]["val"] and i not in test]
    rest = [i for i in range(len(countries)) if i not in test and i not in val]
    shuffled = np.random.default_rng(ord(fold) + 541433).permutation(np.array(rest))
    return {"train": sorted(shuffled[2000:].tolist()), "id_val": sorted(shuffled[:1000].tolist()),
            "id_test": sorted(shuffled[1000:2000].tolist()), "val": val, "test": test}


def write_sample(folder: Path, n_train: int = 6, fold: str = "A") -> dict:
    """A poverty_v1.1 folder: 2,000 + n_train in-country rows, 4 OOD-val rows, 4 OOD-test rows of `fold`; images
    (8 x 224 x 224, constant per band so they compress) only for the train / val / test rows."""
    rng = np.random.default_rng(0)
    val_c, test_c = poverty.FOLD_COUNTRIES[fold]["val"], poverty.FOLD_COUNTRIES[fold]["test"]
    in_country = [c for c in poverty.DHS_COUNTRIES if c not in val_c + test_c]
    countries = [in_country[i % len(in_country)] for i in range(2000 + n_train)]
    countries += [val_c[0], val_c[1], val_c[0], val_c[-1], test_c[0], test_c[1], test_c[-1], test_c[0]]
    order = rng.permutation(len(countries))  # OOD rows scattered among the others
    countries = [countries[i] for i in order]
    wealth = np.round(rng.normal(0.2, 0.8, len(countries)), 6)
    urban = rng.integers(0, 2, len(countries))
    rows = plain_fold_rows(countries, fold)
    for split in ("val", "test"):  # both urban groups in each OOD split
        for k, i in enumerate(rows[split]):
            urban[i] = k % 2
    folder.mkdir(parents=True)
    with open(folder / poverty.METADATA, "w", newline="") as fh:  # rewritten with the fixed urban flags
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for i, (c, w, u) in enumerate(zip(countries, wealth, urban, strict=True)):
            writer.writerow([0.1 * i, 0.2 * i, repr(float(w)), c, 2010 + i % 7, "True" if u else "False", 1.5, 2.0, 20])
    (folder / "images").mkdir()
    for i in rows["train"] + rows["val"] + rows["test"]:
        bands = (np.arange(8) * 0.1 + wealth[i]).astype(np.float32)
        np.savez_compressed(folder / "images" / f"landsat_poverty_img_{i}.npz",
                            x=np.ascontiguousarray(np.broadcast_to(bands[:, None, None], poverty.IMAGE_SHAPE)))
    return {"countries": countries, "wealth": wealth, "urban": urban, "rows": rows}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wilds") / "poverty_v1.1"
    return folder, write_sample(folder)


# ------------------------------------------------------------------------------------------ folds, splits
def test_fold_country_lists_partition_the_23_countries():
    tests = [set(poverty.FOLD_COUNTRIES[f]["test"]) for f in poverty.FOLDS]
    assert sorted(c for t in tests for c in t) == sorted(poverty.DHS_COUNTRIES)  # every country tested once
    for k, fold in enumerate(poverty.FOLDS):  # WILDS rotates: fold k's validation countries are fold k+1's test
        assert set(poverty.FOLD_COUNTRIES[fold]["val"]) == tests[(k + 1) % 5]
    a = poverty.FOLD_COUNTRIES["A"]
    assert sorted(set(poverty.DHS_COUNTRIES) - set(a["val"]) - set(a["test"])) == sorted(FOLD_A_TRAIN)
    assert [poverty.fold_of_seed(s) for s in range(7)] == ["A", "B", "C", "D", "E", "A", "B"]


@pytest.mark.parametrize("fold", poverty.FOLDS)
def test_fold_splits_match_the_rules_written_out(fold):
    rng = np.random.default_rng(3)
    countries = np.array(poverty.DHS_COUNTRIES)[rng.integers(0, 23, 4000)]
    got = poverty.fold_splits(countries, fold)
    want = plain_fold_rows(list(countries), fold)
    for name in poverty.SPLITS:
        assert got[name].tolist() == want[name], name
    assert len(got["id_val"]) == len(got["id_test"]) == 1000
    assert sorted(np.concatenate([got[s] for s in poverty.SPLITS]).tolist()) == list(range(4000))  # a partition


def test_subsample_is_wilds_subsample_idxs():
    idxs = np.arange(10, 30)
    rest, first = poverty.subsample(idxs, 5, True, 65), poverty.subsample(idxs, 5, False, 65)
    order = np.arange(10, 30)
    np.random.default_rng(65 + 541433).shuffle(order)
    assert first.tolist() == order[:5].tolist() and rest.tolist() == order[5:].tolist()
    assert idxs.tolist() == list(range(10, 30))  # the input is not shuffled in place


# ------------------------------------------------------------------------------------------------ loader
def test_registry_reads_the_wilds_layout(sample, monkeypatch):
    folder, truth = sample
    monkeypatch.setenv("REPRO_DATA_DIR", str(folder.parent.parent))  # not used: data.root wins
    train, val, test, info = build_splits("poverty", root=folder, split_seed=0, allow_download=False)
    assert info.task == "regression" and info.num_classes == 1 and "fold:A" in info.source
    for split, ds in (("train", train), ("val", val), ("test", test)):
        rows = truth["rows"][split]
        assert ds.rows.tolist() == rows
        assert torch.equal(ds.targets[:, 0], torch.tensor(truth["wealth"][rows], dtype=torch.float32))
        assert ds.domains.tolist() == truth["urban"][rows].tolist()
    assert len(train) == 6 and len(val) == 4 and len(test) == 4
    image, target = test[1]
    i = truth["rows"]["test"][1]
    assert image.shape == (8, 224, 224) and image.dtype == torch.float32
    expected = torch.tensor((np.arange(8) * 0.1 + truth["wealth"][i]).astype(np.float32))
    assert torch.equal(image[:, 100, 7], expected) and target.item() == pytest.approx(truth["wealth"][i], abs=1e-6)
    # the root may also be the WILDS root above poverty_v1.1, or $REPRO_DATA_DIR/wilds/poverty_v1.1
    assert build_splits("poverty", root=folder.parent, allow_download=False)[0].rows.tolist() == truth["rows"]["train"]


def test_no_nl_zeroes_the_night_lights_band_and_id_validation_is_an_option(sample):
    folder, truth = sample
    _, _, test, _ = build_splits("poverty", root=folder, allow_download=False, options={"no_nl": True})
    image, _ = test[0]
    assert image[-1].abs().sum() == 0 and image[:-1].abs().sum() > 0
    with pytest.raises(ReproError, match="fold must be one of"):
        build_splits("poverty", root=folder, allow_download=False, options={"fold": "F"})
    # ID validation (1,000 rows, images read lazily, so none is needed to build it)
    _, id_val, _, _ = build_splits("poverty", root=folder, allow_download=False, options={"use_ood_val": False})
    assert id_val.rows.tolist() == truth["rows"]["id_val"]


def test_the_fold_follows_the_run_seed_unless_pinned(tmp_path):
    folder = tmp_path / "poverty_v1.1"
    truth = write_sample(folder, n_train=2, fold="C")
    train, *_ , info = build_splits("poverty", root=folder, split_seed=7, allow_download=False)  # 7 % 5 = 2: C
    assert "fold:C" in info.source and train.rows.tolist() == truth["rows"]["train"]
    # pinned to A, the same table splits by fold A's countries (too few in-country rows for A in this sample)
    with pytest.raises(ReproError, match="fold A leaves the train split empty"):
        build_splits("poverty", root=folder, split_seed=7, allow_download=False, options={"fold": "A"})


def test_missing_folder_is_one_line_naming_the_path_and_the_download(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_DATA_DIR", str(tmp_path))
    with pytest.raises(ReproError) as err:
        build_splits("poverty", allow_download=False)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "wilds" / "poverty_v1.1" / "dhs_metadata.csv") in message
    assert poverty.WILDS_URL in message


def test_bad_files_are_clear_errors(tmp_path):
    folder = tmp_path / "poverty_v1.1"
    truth = write_sample(folder, n_train=2)
    train = build_splits("poverty", root=folder, allow_download=False)[0]
    path = train.image_path(0)
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(ReproError, match="corrupt"):
        train[0]
    np.savez(path, x=np.zeros((3, 224, 224), np.float32))
    with pytest.raises(ReproError, match=r"\(3, 224, 224\), expected \(8, 224, 224\)"):
        train[0]
    np.savez(path, y=np.zeros((8, 224, 224), np.float32))
    with pytest.raises(ReproError, match="holding 'x'"):
        train[0]
    path.unlink()
    with pytest.raises(ReproError, match="is missing"):
        train[0]
    text = (folder / "dhs_metadata.csv").read_text()
    (folder / "dhs_metadata.csv").write_text(text.replace("wealthpooled", "wealth", 1))
    with pytest.raises(ReproError, match="lacks the columns"):
        build_splits("poverty", root=folder, allow_download=False)
    (folder / "dhs_metadata.csv").write_text(text.replace(truth["countries"][5], "atlantis", 1))
    with pytest.raises(ReproError, match="atlantis"):
        build_splits("poverty", root=folder, allow_download=False)


# ----------------------------------------------------------------------------------------------- metric
def test_avg_and_worst_group_r_against_numpy():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(40, generator=g)
    urban = torch.tensor([0, 1] * 20)
    pred = true + 0.3 * torch.randn(40, generator=g)
    pred[urban == 1] = -0.5 * true[urban == 1] + torch.randn(20, generator=g)  # urban r negative
    out = regression_metrics(pred[:, None], true[:, None], domains=urban)
    p, t, u = pred.numpy().astype(np.float64), true.numpy().astype(np.float64), urban.numpy()
    r_all = np.corrcoef(p, t)[0, 1]
    r_groups = [np.corrcoef(p[u == k], t[u == k])[0, 1] for k in (0, 1)]
    assert out["r"] == pytest.approx(r_all, abs=1e-9)
    assert out["r_worst_group"] == pytest.approx(min(r_groups), abs=1e-9) and out["r_worst_group"] < 0
    assert out["r_worst_domain"] == pytest.approx(min(r_groups, key=abs), abs=1e-9)  # DTI's rule differs here
    if importlib.util.find_spec("scipy"):  # WILDS' PearsonCorrelation calls scipy.stats.pearsonr
        from scipy.stats import pearsonr

        assert out["r"] == pytest.approx(pearsonr(p, t)[0], abs=1e-9)
    single = regression_metrics(pred[:, None], true[:, None], domains=torch.zeros(40, dtype=torch.int64))
    assert single["r_worst_group"] == pytest.approx(r_all, abs=1e-9)


# --------------------------------------------------------------------------------------- partner draw
def test_partner_draw_excludes_self_and_follows_the_kernel_written_out():
    g = torch.Generator().manual_seed(2)
    labels = torch.randn(50, generator=g).double()
    anchors = torch.tensor([0, 7, 7, 49, 13, 25])
    u = torch.rand(len(anchors), generator=g, dtype=torch.float64)
    u[1] = 0.0  # the first candidate that is not the anchor
    rows = torch.exp(-(labels[anchors, None] - labels[None, :]) ** 2 / (2 * 0.5**2))
    rows = rows / rows.sum(1, keepdim=True)
    got = partners_excluding_self(rows, anchors, 50, u)
    for b, i in enumerate(anchors.tolist()):
        weights = [0.0 if j == i else float(np.exp(-(float(labels[i]) - float(labels[j])) ** 2 / 0.5))
                   for j in range(50)]
        cdf = np.cumsum(weights) / sum(weights)
        assert got[b].item() == int(np.searchsorted(cdf, u[b].item(), side="right")) != i
    assert got[1].item() == (1 if anchors[1] == 0 else 0)
    uniform = partners_excluding_self(None, anchors, 50, u)
    for b, i in enumerate(anchors.tolist()):
        others = [j for j in range(50) if j != i]
        assert uniform[b].item() == others[int(np.floor(u[b].item() * 49))]


def test_kernel_rows_are_the_official_kernel_density_law():
    sklearn = pytest.importorskip("sklearn.neighbors")
    from papers.cmixup.method import pair_probability_rows

    labels = torch.randn(30, generator=torch.Generator().manual_seed(4)).float()
    for i in (0, 17):  # Poverty_Batched_Dataset.get_sample: KernelDensity fitted on [[y1]], scored on every label
        kde = sklearn.KernelDensity(kernel="gaussian", bandwidth=0.5).fit([[labels[i].item()]])
        rate = np.exp(kde.score_samples(labels[:, None].numpy()))
        rate /= rate.sum()
        assert np.allclose(pair_probability_rows(labels[i:i + 1], labels, 0.5)[0].numpy(), rate, rtol=1e-9)


def test_exclude_self_law_is_the_rejection_law():
    """Redrawing while idx == prev_idx (the official loop) gives the row without self, renormalised: checked by
    enumerating the inverse-CDF draws on a fine grid of uniforms."""
    row = torch.tensor([[0.1, 0.4, 0.2, 0.3]], dtype=torch.float64)
    grid = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    draws = partners_excluding_self(row.expand(len(grid), 4), torch.full((len(grid),), 1), 4, grid)
    freq = torch.bincount(draws, minlength=4).double() / len(grid)
    assert torch.allclose(freq, torch.tensor([0.1, 0.0, 0.2, 0.3], dtype=torch.float64) / 0.6, atol=1e-3)
    assert torch.equal(sample_partners(row.expand(len(grid), 4), grid).bincount(minlength=4) > 0,
                       torch.tensor([True] * 4))


# ------------------------------------------------------------------------------------- per-row mixing
class Recorder(torch.nn.Module):
    """A model that records its input and answers with a fixed linear function of it."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.25))
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.w * x.flatten(1).sum(1, keepdim=True)


class TinyRows(torch.utils.data.Dataset):
    def __init__(self, features, targets):
        self.features, self.targets = features, targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.features[i], self.targets[i]


@pytest.mark.parametrize("name, bandwidth", [("cmixup", 0.5), ("mixup_regression", None)])
def test_step_mixes_each_row_with_its_own_lambda_in_both_directions(name, bandwidth):
    g = torch.Generator().manual_seed(5)
    n, b = 12, 4
    x = torch.randn(n, 2, 3, 3, generator=g)
    y = torch.randn(n, 1, generator=g)
    options = {"name": name, "alpha": 2.0, "lam_per_sample": True, "exclude_self": True, "both_directions": True,
               "anchors_per_batch": b}
    if bandwidth:
        options["bandwidth"] = bandwidth
    method = build_method(options, num_classes=1, task="regression")
    info = types.SimpleNamespace(task="regression", name="tiny")
    train = TinyRows(x, y)
    method.prepare(train, info)
    view = method.train_dataset(train, info, None)
    assert isinstance(view, IndexedTargets) and view[5][1].tolist() == [float(y[5, 0]), 5.0]
    assert [p.batch_size for p in method.passes(3, 64)] == [b, b, b]
    anchors = torch.tensor([3, 0, 11, 6])
    batch = (x[anchors], torch.stack([view[int(i)][1] for i in anchors]))
    model = Recorder()
    out = method.step(model, batch, StepContext(epoch=0, step=0, progress=0.0,
                                                generator=torch.Generator().manual_seed(9)))
    # the same draws by hand: partner uniforms, then l1 (B), then l2 (B)
    ref = torch.Generator().manual_seed(9)
    u = torch.rand(b, generator=ref, dtype=torch.float64)
    l1, l2 = sample_beta(2.0, b, ref), sample_beta(2.0, b, ref)
    partners = []
    for k, i in enumerate(anchors.tolist()):
        if bandwidth:
            w = [0.0 if j == i else float(np.exp(-(float(y[i]) - float(y[j])) ** 2 / (2 * bandwidth**2)))
                 for j in range(n)]
            cdf = np.cumsum(w) / sum(w)
            partners.append(int(np.searchsorted(cdf, u[k].item(), side="right")))
        else:
            partners.append([j for j in range(n) if j != i][int(np.floor(u[k].item() * (n - 1)))])
    assert all(p != i for p, i in zip(partners, anchors.tolist(), strict=True))
    rows, targets = [], []
    for k, (i, j) in enumerate(zip(anchors.tolist(), partners, strict=True)):  # mix_up(x1, x2), then mix_up(x2, x1)
        rows.append(np.float32(l1[k]) * x[i] + np.float32(1 - l1[k]) * x[j])
        targets.append(np.float32(l1[k]) * y[i] + np.float32(1 - l1[k]) * y[j])
    for k, (i, j) in enumerate(zip(anchors.tolist(), partners, strict=True)):
        rows.append(np.float32(l2[k]) * x[j] + np.float32(1 - l2[k]) * x[i])
        targets.append(np.float32(l2[k]) * y[j] + np.float32(1 - l2[k]) * y[i])
    assert model.seen.shape == (2 * b, 2, 3, 3)
    assert torch.equal(model.seen, torch.stack(rows))
    pred = 0.25 * torch.stack(rows).flatten(1).sum(1, keepdim=True)
    assert out["loss"].item() == pytest.approx(F.mse_loss(pred, torch.stack(targets)).item(), rel=1e-6)
    assert out["lam"] == pytest.approx(float(np.mean(np.concatenate([l1, l2]))))


def test_option_misuse_is_refused():
    with pytest.raises(ReproError, match="exclude_self"):
        build_method({"name": "cmixup_batch", "exclude_self": True}, num_classes=1, task="regression")
    with pytest.raises(ReproError, match="lam_per_sample=true"):
        build_method({"name": "cmixup", "both_directions": True}, num_classes=1, task="regression")
    method = build_method({"name": "cmixup", "exclude_self": True}, num_classes=1, task="regression")
    method.prepare(TinyRows(torch.zeros(4, 2), torch.zeros(4, 1)), types.SimpleNamespace(task="regression"))
    ctx = StepContext(epoch=0, step=0, progress=0.0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ReproError, match="device_cache=false"):  # batches without the appended index
        method.step(Recorder(), (torch.zeros(2, 2), torch.zeros(2, 1)), ctx)


# ---------------------------------------------------------------------------------------------- model
def longhand_layers():
    """The official ResNet18(num_classes=1, num_channels=8), layer by layer: (name, in, out, kernel, stride)."""
    layers = [("conv1", 8, 64, 7, 2)]
    inplanes = 64
    for stage, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            stride = 2 if stage > 1 and block == 0 else 1
            layers.append((f"layer{stage}.{block}.conv1", inplanes, planes, 3, stride))
            layers.append((f"layer{stage}.{block}.conv2", planes, planes, 3, 1))
            if stride != 1 or inplanes != planes:
                layers.append((f"layer{stage}.{block}.downsample.0", inplanes, planes, 1, stride))
            inplanes = planes
    return layers


def longhand_forward(model, x):
    """The official forward with the model's own weights, written with torch.nn.functional (eval mode)."""
    sd = model.state_dict()

    def bn(h, name):
        return F.batch_norm(h, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], False, 0.0, 1e-5)

    h = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    h = F.max_pool2d(h, 3, 2, 1)
    for stage in range(1, 5):
        for block in range(2):
            p = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            out = F.relu(bn(F.conv2d(h, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
            out = bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            short = bn(F.conv2d(h, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1") \
                if f"{p}.downsample.0.weight" in sd else h
            h = F.relu(out + short)
    return F.linear(h.mean(dim=(2, 3)), sd["fc.weight"], sd["fc.bias"])


def test_model_is_the_official_multispectral_resnet18_layer_by_layer():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18_poverty")
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    layers = longhand_layers()
    assert list(convs) == [name for name, *_ in layers]  # nothing more, nothing less, in order
    for name, cin, cout, k, stride in layers:
        conv = convs[name]
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (cin, cout, (k, k),
                                                                                        (stride, stride)), name
        assert conv.padding == ((k - 1) // 2,) * 2 and conv.bias is None and conv.dilation == (1, 1), name
    pool = model.maxpool
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    assert model.fc.in_features == 512 and model.fc.out_features == 1
    # parameter and buffer names and shapes: torchvision's names, as the official module (`enc.` stripped)
    expected = {"conv1.weight": (64, 8, 7, 7), "fc.weight": (1, 512), "fc.bias": (1,)}
    bns = ["bn1"] + [f"layer{s}.{b}.{n}" for s in range(1, 5) for b in range(2) for n in ("bn1", "bn2")] + \
        [f"layer{s}.0.downsample.1" for s in (2, 3, 4)]
    for name, _, cout, k, _ in layers[1:]:
        expected[f"{name}.weight"] = (cout, convs[name].in_channels, k, k)
    for name in bns:
        width = 64 if name == "bn1" else model.get_submodule(name).num_features
        expected.update({f"{name}.{t}": (width,) for t in ("weight", "bias", "running_mean", "running_var")})
        expected[f"{name}.num_batches_tracked"] = ()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    # zero_init_residual=False: every BN starts at weight 1 (timm's default would zero each block's bn2)
    assert all(torch.equal(model.get_submodule(n).weight, torch.ones_like(model.get_submodule(n).weight))
               for n in bns)
    model.eval()
    with torch.no_grad():  # random BN statistics, so a wrong wiring shows
        for name in bns:
            bn = model.get_submodule(name)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
        x = torch.randn(2, 8, 64, 64)
        out = model(x)
    assert out.shape == (2, 1)
    assert torch.allclose(out, longhand_forward(model, x), atol=1e-5)
    with pytest.raises(RuntimeError, match="8 channels"):  # the stem takes 8 bands, not 3
        model(torch.randn(1, 3, 64, 64))


def official_resnet_module():
    """`PovertyMap/models/resnet_multispectral.py` of the official repository, if a copy is at hand (it needs only
    torch); run beside ours, never copied."""
    if not (OFFICIAL_REPO / "HEAD").exists() and not (OFFICIAL_REPO / ".git").exists():
        pytest.skip(f"official C-Mixup repository not at {OFFICIAL_REPO} (set CMIXUP_OFFICIAL_REPO)")
    source = subprocess.run(["git", "-C", str(OFFICIAL_REPO), "show", "HEAD:PovertyMap/models/resnet_multispectral.py"],
                            check=False, capture_output=True, text=True)
    if source.returncode != 0:
        pytest.skip(f"cannot read the official file: {source.stderr.strip()}")
    module = types.ModuleType("official_resnet_multispectral")
    exec(compile(source.stdout, "resnet_multispectral.py", "exec"), module.__dict__)  # noqa: S102
    return module


def test_model_equals_the_official_resnet18_on_the_same_weights():
    import timm

    official = official_resnet_module().ResNet18(num_classes=1, num_channels=8)
    ours = timm.create_model("resnet18_poverty")
    ours.load_state_dict(official.state_dict(), strict=True)  # every name and shape agrees
    x = torch.randn(3, 8, 64, 64, generator=torch.Generator().manual_seed(1))
    for mode in (True, False):  # batch statistics, then the running ones the training pass moved
        official.train(mode)
        ours.train(mode)
        with torch.no_grad():
            assert torch.allclose(official(x), ours(x), atol=1e-5), f"train={mode}"
    torch.manual_seed(7)
    a = official_resnet_module().ResNet18(num_classes=1, num_channels=8)
    init = {k: v for k, v in a.state_dict().items()}
    assert all(torch.equal(init[k], torch.ones_like(init[k])) for k in init if k.endswith("bn2.weight"))


# ------------------------------------------------------------------------------------ config, training
def test_paper_config_runs_the_official_schedule_and_grid():
    from common.train import build_scheduler
    from common.workflow import runs

    cfg = load_config(CONFIG, method_label="cmixup")
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=cfg.optim.lr)
    scheduler = build_scheduler(optimizer, cfg, 150)
    lrs = []
    for epoch in range(cfg.train.epochs):  # the trainer sets the lr at every epoch start
        scheduler.step(epoch)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([1e-3 * 0.96**e for e in range(50)], rel=1e-9)  # StepLR(1, 0.96) after each epoch
    assert cfg.train.select_metric == "r_worst_group" and cfg.data.split_seed is None
    grid = [(r.method, r.seed) for r in runs("cmixup", "paper") if r.experiment == "poverty"]
    assert sorted(grid) == sorted((m, s) for m in ("erm", "mixup", "cmixup") for s in range(5))
    for scale in ("smoke", "proxy"):  # GPU only: not in the CPU scales
        assert all(r.experiment != "poverty" for r in runs("cmixup", scale))


@pytest.mark.parametrize("label", ["erm", "cmixup"])
def test_a_training_step_through_the_trainer(sample, tmp_path, label):
    from common.train import main

    folder, _ = sample
    out = tmp_path / label
    overrides = [f"data.root={folder}", "data.num_workers=0", "train.epochs=1", "train.max_steps_per_epoch=1",
                 "train.batch_size=4", "train.eval_batch_size=8", "resources.gpus=0"]
    if label == "cmixup":
        overrides.append("method.anchors_per_batch=2")
    assert main(["--config", str(CONFIG), "--method", label, "--output", str(out), *overrides]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    chosen = metrics["selected"]
    assert chosen["metric"] == "val_r_worst_group"
    assert {"r", "r_worst_group", "rmse"} <= set(chosen["test"])
    row = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(row["train_loss"]) and row["lr"] == pytest.approx(1e-3)


def test_rows_say_data_not_available_until_a_run_exists(tmp_path):
    from common.report import build_table

    for table, setting in (("ood_r", "PovertyMap avg"), ("ood_r_worst_group", "PovertyMap worst")):
        rows = {(r["setting"], r["method"]): r for r in build_table("cmixup", "paper", table, tmp_path)[2]}
        for method in ("erm", "mixup", "cmixup"):
            row = rows[(setting, method)]
            assert row["ours"] == "data not available ($REPRO_DATA_DIR/wilds/poverty_v1.1/)", row
            assert row["n"] == "0/5"
        assert rows[(setting, "cmixup")]["verdict"] == "data not available"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
