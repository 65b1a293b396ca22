"""FKD / FerKD (spec ferkd.md §5): the official functions reproduced on fixed inputs, safe loading of label files,
region rebuild, crop-major layout, loss, epoch accounting, FerKD adaptation, SelfMix, restartable shards."""

from __future__ import annotations

import math
import os
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from common.errors import ReproError
from common.methods import StepContext, build_method
from papers.ferkd.adapt import GROUPS, adapt_region_labels, region_scores, softened_ground_truth
from papers.ferkd.labels import (
    RegionLabels,
    quantize_soft_labels,
    read_official_file,
    recover_soft_labels,
    write_manifest,
    write_official_file,
)
from papers.ferkd.method import (
    FKDMixDraws,
    RegionDataset,
    fkd_mixup_cutmix,
    fkd_passes,
    rebuild_region,
    selfmix_partners,
)
from papers.ferkd.regions import draw_regions, random_resized_crop_params


# ------------------------------------------------------------------ official code, transcribed for comparison
def official_label_quantization(full_label, label_type):
    """FKD_SLG/generate_soft_label.py label_quantization (per-row loop)."""
    out = []
    for p in full_label:
        if label_type == "hard":
            out.append(torch.argmax(p))
        elif label_type == "smoothing":
            output = torch.argmax(p)
            out.append(torch.stack([output, p[output]], dim=0))
        else:
            k = 10 if label_type.endswith("k10") else 5
            output = torch.argsort(p, descending=True)
            out.append(torch.stack([output[:k], p[output[:k]]], dim=0))
    return torch.stack(out, dim=0).detach().numpy()


def official_recover(label, label_type, n_classes):
    """FKD/utils_FKD.py Recover_soft_label."""
    if label_type == "hard":
        return torch.zeros(label.size(0), n_classes).scatter_(1, label.view(-1, 1), 1)
    if label_type == "smoothing":
        index, value = label[:, 0].to(dtype=int), label[:, 1]
        minor = ((torch.ones_like(value) - value) / (n_classes - 1)).reshape(-1, 1).repeat_interleave(n_classes, 1)
        return (minor * torch.ones(index.size(0), n_classes)).scatter_(1, index.view(-1, 1), value.view(-1, 1))
    if label_type == "marginal_renorm":
        index, value = label[:, 0, :].to(dtype=int), label[:, 1, :]
        return F.normalize(torch.zeros(index.size(0), n_classes).scatter_(1, index, value), p=1.0, dim=1, eps=1e-12)
    k = 10 if label_type.endswith("k10") else 5
    index, value = label[:, 0, :].to(dtype=int), label[:, 1, :]
    minor = (torch.ones(label.size(0), 1) - torch.sum(value, dim=1, keepdim=True)) / (n_classes - k)
    minor = minor.reshape(-1, 1).repeat_interleave(n_classes, dim=1)
    return (minor * torch.ones(index.size(0), n_classes)).scatter_(1, index, value)


def official_soft_cross_entropy(model_output, soft_output):
    """FKD/utils_FKD.py Soft_CrossEntropy."""
    log_prob = F.log_softmax(model_output, dim=1).unsqueeze(2)
    return (-torch.bmm(soft_output.unsqueeze(1), log_prob)).mean()


def official_mixup_cutmix(images, soft_label, mixup, cutmix, prob, switch):
    """FKD/utils_FKD.py mixup_cutmix on NumPy's and torch's global RNGs (CPU, np.int -> int)."""
    if np.random.rand(1) < prob:
        if np.random.rand(1) < switch:
            lam = np.random.beta(mixup, mixup)
            rand_index = torch.randperm(images.size()[0])
            return lam * images + (1 - lam) * images[rand_index], soft_label * lam + soft_label[rand_index] * (1 - lam)
        lam = np.random.beta(cutmix, cutmix)
        rand_index = torch.randperm(images.size()[0])
        W, H = images.size(2), images.size(3)
        cut_rat = np.sqrt(1.0 - lam)
        cut_w, cut_h = int(W * cut_rat), int(H * cut_rat)
        cx, cy = np.random.randint(W), np.random.randint(H)
        bbx1, bby1 = np.clip(cx - cut_w // 2, 0, W), np.clip(cy - cut_h // 2, 0, H)
        bbx2, bby2 = np.clip(cx + cut_w // 2, 0, W), np.clip(cy + cut_h // 2, 0, H)
        images = images.clone()
        images[:, :, bbx1:bbx2, bby1:bby2] = images[rand_index, :, bbx1:bbx2, bby1:bby2]
        lam = 1 - ((bbx2 - bbx1) * (bby2 - bby1) / (images.size()[-1] * images.size()[-2]))
        return images, soft_label * lam + soft_label[rand_index] * (1 - lam)
    return images, soft_label


def distinct_probs(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, k, generator=g) * 3, dim=1)


# ------------------------------------------------------------------------------ quantise / recover (§5.1-2, 9)
@pytest.mark.parametrize("label_type", ["hard", "smoothing", "marginal_smoothing_k5", "marginal_renorm_k5",
                                        "marginal_smoothing_k10"])
def test_quantize_matches_official_label_quantization(label_type):
    p = distinct_probs(64, 20)
    ours = quantize_soft_labels(p, label_type)
    official = official_label_quantization(p, label_type)
    assert ours.dtype == official.dtype and ours.shape == official.shape
    assert np.array_equal(ours, official)


def test_quantize_stores_topk_descending_with_values():
    p = distinct_probs(32, 12, seed=1)
    q = quantize_soft_labels(p, "marginal_smoothing_k5")
    assert q.shape == (32, 2, 5) and q.dtype == np.float32
    ids = q[:, 0].astype(np.int64)
    assert np.array_equal(ids, torch.topk(p, 5, dim=1).indices.numpy())
    assert np.array_equal(q[:, 1], np.take_along_axis(p.numpy(), ids, axis=1))
    assert np.all(np.diff(q[:, 1], axis=1) <= 0)
    # float16 storage (official --use_fp16) keeps class ids <= 2048 exact
    assert np.array_equal(q[:, 0].astype(np.float16).astype(np.int64), ids)


@pytest.mark.parametrize("label_type,official_name", [("hard", "hard"), ("smoothing", "smoothing"),
                                                      ("marginal_smoothing_k5", "marginal_smoothing_k5"),
                                                      ("marginal_smoothing_k10", "marginal_smoothing_k10"),
                                                      ("marginal_renorm", "marginal_renorm"),
                                                      ("marginal_renorm_k5", "marginal_renorm")])
def test_recover_matches_official_recover_soft_label(label_type, official_name):
    p = distinct_probs(50, 17, seed=2)
    stored = quantize_soft_labels(p, label_type)
    ours = recover_soft_labels(stored, label_type, 17)
    official = official_recover(torch.from_numpy(stored), official_name, 17)
    assert torch.allclose(ours, official, atol=1e-7, rtol=0)


def test_recover_sums_to_one_and_spreads_the_marginal():
    p = distinct_probs(40, 10, seed=3)
    stored = quantize_soft_labels(p, "marginal_smoothing_k5")
    t = recover_soft_labels(stored, "marginal_smoothing_k5", 10)
    assert torch.allclose(t.sum(1), torch.ones(40), atol=1e-6)
    ids = torch.from_numpy(stored[:, 0]).long()
    assert torch.equal(t.gather(1, ids), torch.from_numpy(stored[:, 1]))
    rest = torch.ones_like(t, dtype=torch.bool).scatter_(1, ids, False)
    marginal = (1 - torch.from_numpy(stored[:, 1]).sum(1)) / 5
    assert torch.allclose(t[rest].view(40, 5), marginal.view(-1, 1).expand(40, 5), atol=1e-7)
    hard = recover_soft_labels(quantize_soft_labels(p, "hard"), "hard", 10)
    assert torch.equal(hard, F.one_hot(p.argmax(1), 10).float())


def test_round_trip_is_exact_when_mass_lies_on_k_classes():
    g = torch.Generator().manual_seed(4)
    p = torch.zeros(30, 100)
    for row in range(30):
        ids = torch.randperm(100, generator=g)[:5]
        p[row, ids] = torch.softmax(torch.randn(5, generator=g), 0)
    t = recover_soft_labels(quantize_soft_labels(p, "marginal_smoothing_k5"), "marginal_smoothing_k5", 100)
    assert torch.allclose(t, p, atol=1e-7)
    # K = k: every class stored, nothing spread (the official division by zero is overwritten)
    p10 = distinct_probs(8, 10)
    t10 = recover_soft_labels(quantize_soft_labels(p10, "marginal_smoothing_k10"), "marginal_smoothing_k10", 10)
    assert torch.allclose(t10, p10, atol=1e-7)


def test_unknown_label_type_is_rejected_with_the_valid_names():
    with pytest.raises(ReproError, match="marginal_renorm"):
        recover_soft_labels(np.zeros((1, 2, 5), np.float32), "marginal_renorm_k7", 10)


# --------------------------------------------------------------------------------- safe loading of label files
def test_official_file_round_trip_and_legacy_numpy_names(tmp_path):
    boxes = np.random.default_rng(0).random((6, 4)).astype(np.float32)
    flips = np.array([1, 0, 1, 0, 0, 1], bool)
    labels = quantize_soft_labels(distinct_probs(6, 10), "marginal_smoothing_k5")
    path = tmp_path / "n01" / "img.tar"
    write_official_file(path, boxes, flips, labels)
    b, f, lab = read_official_file(path)
    assert np.array_equal(b, boxes) and np.array_equal(f, flips) and np.array_equal(lab, labels)
    # a file pickled by NumPy 1 names numpy.core.multiarray._reconstruct: accepted too
    legacy = tmp_path / "legacy.tar"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(legacy, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray\n_reconstruct", b"numpy.core.multiarray\n_reconstruct")
                assert b"numpy.core.multiarray" in data
            zout.writestr(info, data)
    assert np.array_equal(read_official_file(legacy)[2], labels)
    fp16 = tmp_path / "fp16.tar"
    write_official_file(fp16, boxes.astype(np.float16), flips, labels.astype(np.float16))
    assert read_official_file(fp16)[2].dtype == np.float16


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_label_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.tar"
    torch.save([np.zeros((2, 4), np.float32), _Payload(marker), np.zeros((2, 2, 5), np.float32)], evil)
    with pytest.raises(ReproError, match="refusing to load"):
        read_official_file(evil)
    assert not marker.exists()


# ------------------------------------------------------------------------------------- regions (§5.3, §5.4)
def test_region_params_match_torchvision_on_the_same_draws():
    from torchvision.transforms import RandomResizedCrop

    image = Image.new("RGB", (57, 41))
    for seed in range(20):
        torch.manual_seed(seed)
        expected = RandomResizedCrop.get_params(image, [0.08, 0.936], [3 / 4, 4 / 3])
        ours = random_resized_crop_params(41, 57, [0.08, 0.936], [3 / 4, 4 / 3], torch.Generator().manual_seed(seed))
        assert ours == expected


@pytest.mark.parametrize("size,dtype,exact", [((500, 375), np.float32, True), ((2000, 1600), np.float32, True),
                                              ((800, 600), np.float16, True), ((4000, 3000), np.float16, False)])
def test_rebuilt_boxes_equal_the_generation_boxes(size, dtype, exact):
    width, height = size
    boxes, fractions, _ = draw_regions(height, width, 300, [0.08, 0.936], [3 / 4, 4 / 3],
                                       torch.Generator().manual_seed(0))
    stored = fractions.astype(dtype)
    # what Pillow's crop computes from the official float arguments: round(left), round(top), round(left + w) ...
    rebuilt = []
    for top, left, h, w in stored.astype(np.float64):
        t, lft = float(top) * height, float(left) * width
        rebuilt.append((round(t), round(lft), round(t + float(h) * height) - round(t),
                        round(lft + float(w) * width) - round(lft)))
    rebuilt = np.asarray(rebuilt)
    if exact:
        assert np.array_equal(rebuilt, boxes)
    else:  # float16 fractions drift by up to ~0.5 px at 4000 px: some boxes move by one pixel, never more
        assert np.abs(rebuilt - boxes).max() <= 1 and not np.array_equal(rebuilt, boxes)


def test_rebuild_region_is_the_official_crop_of_the_generation_box():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    boxes, fractions, flips = draw_regions(48, 64, 10, [0.08, 1.0], [3 / 4, 4 / 3], torch.Generator().manual_seed(1))
    for (i, j, h, w), frac, flip in zip(boxes, fractions, flips, strict=True):
        expected = TF.resized_crop(image, int(i), int(j), int(h), int(w), [32, 32], InterpolationMode.BILINEAR)
        expected = TF.hflip(expected) if flip else expected
        assert np.array_equal(np.asarray(rebuild_region(image, frac, bool(flip), 32)), np.asarray(expected))


def make_label_set(n_images=6, regions=7, k=5, num_classes=10, seed=0, encode_region=False):
    """A RegionLabels over `n_images` images; with encode_region, region r's top class id is r % num_classes."""
    rng = np.random.default_rng(seed)
    p = torch.softmax(torch.from_numpy(rng.normal(size=(n_images * regions, num_classes))).float() * 3, dim=1)
    labels = quantize_soft_labels(p, f"marginal_smoothing_k{k}")
    region = np.tile(np.arange(regions, dtype=np.int32), n_images)
    if encode_region:
        labels[:, 0, 0] = region % num_classes
    _, fractions, flips = draw_regions(32, 32, n_images * regions, [0.2, 1.0], [3 / 4, 4 / 3],
                                       torch.Generator().manual_seed(seed))
    return RegionLabels(np.arange(n_images, dtype=np.int64), rng.integers(0, num_classes, n_images).astype(np.int64),
                        np.arange(n_images + 1, dtype=np.int64) * regions, fractions, flips, labels, region)


class _Images:
    def __init__(self, targets):
        rng = np.random.default_rng(5)
        self.items = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in targets]
        self.targets = np.asarray(targets)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i], int(self.targets[i])


def test_region_dataset_yields_distinct_stored_regions_with_their_labels():
    labels = make_label_set(encode_region=True)
    images = _Images(labels.target)
    ds = RegionDataset(images, labels, crops=4, size=16, mean=(0.5,) * 3, std=(0.5,) * 3,
                       generator=torch.Generator().manual_seed(0))
    for index in range(len(ds)):
        crops, targets = ds[index]
        assert crops.shape == (4, 3, 16, 16) and targets.shape == (4, 2 + 10)
        region = targets[:, 1].long()
        assert len(set(region.tolist())) == 4  # distinct within a load
        assert torch.all(targets[:, 0] == labels.target[index])
        rows = labels.offsets[index] + region.numpy()
        assert np.array_equal(targets[:, 2:].numpy().reshape(4, 2, 5), labels.labels[rows])
        image, _ = images[index]
        for c, r in enumerate(rows):
            crop = rebuild_region(image, labels.boxes[r], bool(labels.flips[r]), 16)
            assert torch.equal(crops[c], TF.normalize(TF.to_tensor(crop), [0.5] * 3, [0.5] * 3))
    with pytest.raises(ReproError, match="fewer than 8"):
        RegionDataset(images, labels, crops=8, size=16, mean=(0.5,) * 3, std=(0.5,) * 3)


def fkd_method(tmp_path, labels, **options):
    folder = tmp_path / "labels"
    labels.save(folder / "shard_00000.npz")
    write_manifest(folder, [folder / "shard_00000.npz"], {"label_type": "marginal_smoothing_k5", "num_classes": 10,
                                                          "dataset": "toy", "num_images": len(labels.image)})
    method = build_method({"name": "fkd", "labels": str(folder / "manifest.json"), "n_crops": 2, **options},
                          num_classes=10)
    images = _Images(labels.target)
    train_ds = SimpleNamespace(base=images)
    info = SimpleNamespace(num_classes=10, name="toy", image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    method.prepare(train_ds, info)
    return method, train_ds, info


class _Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 16 * 16, 10)
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.linear(x.flatten(1))


def test_fkd_step_is_crop_major_and_matches_a_straightforward_computation(tmp_path):
    """Quantise -> store -> load -> recover -> loss, against the official path written out by hand."""
    labels = make_label_set(n_images=6, regions=5, encode_region=True)
    method, train_ds, info = fkd_method(tmp_path, labels, temperature=2.0)
    ds = method.train_dataset(train_ds, info, fkd_passes(4, 2, 8)[0])
    torch.manual_seed(0)
    items = [ds[i] for i in range(4)]
    crops = torch.stack([c for c, _ in items])  # (B, n, C, H, W) as the DataLoader collates
    targets = torch.stack([t for _, t in items])
    model = _Recorder()
    ctx = StepContext(epoch=0, step=0, progress=0.0, generator=torch.Generator().manual_seed(0))
    out = method.step(model, (crops, targets), ctx)
    # official: images = torch.cat(list of per-crop batches): crop 0 of every image first
    official_images = torch.cat([crops[:, k] for k in range(2)])
    assert torch.equal(model.seen, official_images)
    soft = torch.cat([targets[:, k, 2:] for k in range(2)]).view(8, 2, 5)
    # row (k, i) carries the label of the region rebuilt in that row (labels encode the region index)
    region = torch.cat([targets[:, k, 1] for k in range(2)]).long()
    assert torch.equal(soft[:, 0, 0].long(), region % 10)
    expected = official_soft_cross_entropy(out["logits"].detach() / 2.0, official_recover(soft, "marginal_smoothing_k5",
                                                                                          10))
    assert torch.allclose(out["loss"].detach(), expected, atol=1e-6)


def test_loss_is_cross_entropy_with_one_hot_targets(tmp_path):
    labels = make_label_set(n_images=4, regions=4)
    method, train_ds, info = fkd_method(tmp_path, labels, target="ground_truth")
    ds = method.train_dataset(train_ds, info, fkd_passes(4, 2, 8)[0])
    items = [ds[i] for i in range(4)]
    crops, targets = torch.stack([c for c, _ in items]), torch.stack([t for _, t in items])
    model = _Recorder()
    out = method.step(model, (crops, targets),
                      StepContext(epoch=0, step=0, progress=0.0, generator=torch.Generator().manual_seed(0)))
    gt = torch.cat([targets[:, k, 0] for k in range(2)]).long()
    assert torch.allclose(out["loss"].detach(), F.cross_entropy(out["logits"].detach(), gt), atol=1e-6)


def test_label_set_version_is_checked_on_resume(tmp_path):
    method, _, _ = fkd_method(tmp_path, make_label_set())
    method.load_state_dict(method.state_dict())
    with pytest.raises(ReproError, match="another version"):
        method.load_state_dict({"label_set": "0000000000000000"})


# --------------------------------------------------------------------------------------- epoch plan (§5.6)
def test_epoch_plan_follows_the_official_loop():
    plan = fkd_passes(300, 4, 1024)
    multi = [p for p in plan if p.options["crops"] == 4]
    single = [p for p in plan if p.options["crops"] == 1]
    assert [p.epoch for p in multi] == list(range(0, 296, 4)) and len(multi) == 74
    assert [p.epoch for p in single] == [296, 297, 298, 299]
    assert all(p.batch_size == 256 for p in multi) and all(p.batch_size == 1024 for p in single)
    assert sum(p.epochs for p in plan) == 300
    # the official loop on other (E, n): for epoch in range(0, E, n), single-crop from the first >= E - n
    for epochs, n in [(10, 4), (7, 3), (2, 4), (100, 4), (9, 1)]:
        expected, epoch = [], 0
        for epoch in range(0, epochs, n):
            if epoch >= epochs - n:
                expected += [(e, 1) for e in range(epoch, epochs)]
                break
            expected.append((epoch, n))
        assert [(p.epoch, p.options["crops"]) for p in fkd_passes(epochs, n, 8)] == expected


def test_trainer_sets_the_lr_once_per_pass_at_the_cosine_of_its_first_epoch(tmp_path):
    from common.config import load_config
    from common.train import build_optimizer, build_scheduler

    cfg = load_config(None, ["train.epochs=12", "schedule.per=epoch", "optim.lr=0.1"])
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, 5)
    for p in fkd_passes(12, 4, 8):
        scheduler.step(p.epoch)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * (1 + math.cos(math.pi * p.epoch / 12)))


# ------------------------------------------------------------------------------------ mixing (§5.8, §5.9)
def test_fkd_mixup_cutmix_matches_the_official_function_on_the_same_draws():
    images = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    soft = torch.softmax(torch.randn(8, 10, generator=torch.Generator().manual_seed(1)), dim=1)
    for seed in range(12):
        np.random.seed(seed)
        torch.manual_seed(seed)
        expected_x, expected_t = official_mixup_cutmix(images.clone(), soft, 0.8, 1.0, 0.9, 0.5)
        # the same draws, in the official order: rand, rand, beta, randperm, randint, randint
        np.random.seed(seed)
        torch.manual_seed(seed)
        gate, switch = float(np.random.rand(1)[0]), None
        row = col = 0
        lam, partner = 1.0, torch.arange(8)
        if gate < 0.9:
            switch = float(np.random.rand(1)[0])
            lam = float(np.random.beta(0.8, 0.8) if switch < 0.5 else np.random.beta(1.0, 1.0))
            partner = torch.randperm(8)
            if switch >= 0.5:
                row, col = int(np.random.randint(12)), int(np.random.randint(12))
        draws = FKDMixDraws(gate, switch if switch is not None else 1.0, lam, partner, row, col)
        x, t, _ = fkd_mixup_cutmix(images, soft, draws, 0.9, 0.5)
        assert torch.equal(x, expected_x)
        assert torch.allclose(t, expected_t, atol=1e-7)


def test_selfmix_partners_are_other_crops_of_the_same_image(tmp_path):
    n, b = 4, 5
    partner = selfmix_partners(n, b)
    rows = torch.arange(n * b)
    assert torch.equal(partner, ((rows // b + 1) % n) * b + rows % b)
    assert torch.equal(partner % b, rows % b) and torch.all(partner != rows)
    labels = make_label_set(n_images=4, regions=4)
    method, train_ds, info = fkd_method(tmp_path, labels, selfmix=True, selfmix_prob=1.0)
    ds = method.train_dataset(train_ds, info, fkd_passes(4, 2, 8)[0])
    items = [ds[i] for i in range(4)]
    crops, targets = torch.stack([c for c, _ in items]), torch.stack([t for _, t in items])
    images = torch.cat([crops[:, k] for k in range(2)])
    soft = recover_soft_labels(torch.cat([targets[:, k, 2:] for k in range(2)]).view(8, 2, 5),
                               "marginal_smoothing_k5", 10)
    x, t, lam = method.selfmix(images, soft, 2, 4, torch.Generator().manual_seed(3))
    partner = selfmix_partners(2, 4)
    assert lam < 1 and not torch.equal(x, images)
    assert torch.all((x == images) | (x == images[partner]))  # every pixel from the crop or its partner
    assert torch.allclose(t, lam * soft + (1 - lam) * soft[partner], atol=1e-6)
    # lam = 1 (no box): the batch is unchanged
    method.params.selfmix_prob = 0.0
    x1, t1, lam1 = method.selfmix(images, soft, 2, 4, torch.Generator().manual_seed(3))
    assert lam1 == 1.0 and torch.equal(x1, images) and torch.equal(t1, soft)


# ------------------------------------------------------------------------------------- FerKD adaptation (§5.7)
def adaptation_case(seed=0, n_images=20, regions=12):
    labels = make_label_set(n_images=n_images, regions=regions, seed=seed)
    rows = labels.image_of_rows()
    return labels, labels.target[rows], rows


@pytest.mark.parametrize("mode,thresholds", [("absolute", (0.02, 0.1, 0.6)), ("per_image_quantile", (0.2, 0.5, 0.8))])
@pytest.mark.parametrize("score", ["gt_prob", "max_prob"])
def test_adaptation_groups_and_labels(mode, thresholds, score):
    labels, gt, image = adaptation_case()
    t_low, t_mid, t_high = thresholds
    keep, adapted, groups, restored = adapt_region_labels(
        labels.labels, gt, 10, t_low, t_mid, t_high, 0.1, score, mode, image=image, return_groups=True)
    q = region_scores(labels.labels, gt, 10, "marginal_smoothing_k5", score)
    if mode == "absolute":
        bounds = np.broadcast_to(np.array(thresholds), (len(q), 3))
    else:  # straightforward per-image quantiles
        bounds = np.stack([np.quantile(q[image == i], thresholds) for i in image])
    expected = np.where(q < bounds[:, 0], 0, np.where(q < bounds[:, 1], 1, np.where(q <= bounds[:, 2], 2, 3)))
    assert np.array_equal(groups, expected) and restored == 0
    assert np.array_equal(keep, np.isin(groups, [1, 2]))
    # hard positives keep their stored label bit for bit; context regions get the softened ground truth
    assert np.array_equal(adapted[groups == 2], labels.labels[groups == 2])
    soft = recover_soft_labels(adapted[groups == 1], "marginal_smoothing_k5", 10)
    target = torch.full((int((groups == 1).sum()), 10), 0.1 / 9).scatter_(
        1, torch.from_numpy(gt[groups == 1]).view(-1, 1), 0.9)
    assert torch.allclose(soft, target, atol=1e-7) and torch.allclose(soft.sum(1), torch.ones(len(soft)), atol=1e-6)


def test_softened_ground_truth_forms_recover_exactly():
    gt = np.array([0, 3, 9, 4])
    for form, (top, other) in {"uniform_others": (0.8, 0.2 / 9), "label_smoothing": (0.82, 0.02)}.items():
        for label_type in ("marginal_smoothing_k5", "marginal_smoothing_k10", "smoothing"):
            stored = softened_ground_truth(gt, 10, 0.2, label_type, form)
            t = recover_soft_labels(stored, label_type, 10)
            expected = torch.full((4, 10), other).scatter_(1, torch.from_numpy(gt).view(-1, 1), top)
            assert torch.allclose(t, expected, atol=1e-7), (form, label_type)
    with pytest.raises(ReproError, match="cannot be stored exactly"):
        softened_ground_truth(gt, 10, 0.1, "hard")


def test_all_teacher_actions_reproduce_fkd_exactly():
    labels, gt, image = adaptation_case(seed=1)
    keep, adapted = adapt_region_labels(labels.labels, gt, 10, 0.05, 0.2, 0.7, 0.1, image=image,
                                        actions={g: "teacher" for g in GROUPS})
    assert keep.all() and np.array_equal(adapted, labels.labels)


def test_every_image_keeps_n_crops_regions_or_a_clear_error():
    labels, gt, image = adaptation_case(seed=2)
    # thresholds that drop nearly everything
    with pytest.raises(ReproError, match="fewer than 4 regions"):
        adapt_region_labels(labels.labels, gt, 10, 0.5, 0.6, 0.61, 0.1, image=image, min_regions=4)
    keep, _, _groups, restored = adapt_region_labels(labels.labels, gt, 10, 0.5, 0.6, 0.61, 0.1, image=image,
                                                    min_regions=4, on_too_few="restore", return_groups=True)
    assert np.all(np.bincount(image, weights=keep) >= 4) and restored > 0
    subset = labels.select(keep)
    assert np.all(subset.counts >= 4) and subset.offsets[-1] == keep.sum()


# ----------------------------------------------------------------------------------- restartable shards
def test_label_shards_are_restartable_and_skip_finished_work(tmp_path, monkeypatch):
    from papers.ferkd import regions

    config = tmp_path / "labels.yaml"
    config.write_text(f"out_dir: {tmp_path / 'labels'}\ndata: {{name: cifar10-mini}}\nregions: {{count: 2, seed: 0}}\n"
                      "label_type: marginal_smoothing_k5\nshards: 12\nbatch_images: 50\n"
                      "teacher: {model: resnet20_cifar, checkpoint: unused, image_size: 32}\n")
    cfg = regions.load_labelset_config(config)
    calls = []

    def fake_teacher(cfg, num_classes):
        calls.append(1)
        torch.manual_seed(0)
        from common.models import build_model
        from common.teacher import Teacher, freeze

        return Teacher(freeze(build_model("resnet20_cifar", num_classes=num_classes)), 32, (0.5,) * 3, (0.5,) * 3,
                       "toy")

    monkeypatch.setattr(regions, "resolve_teacher", fake_teacher)
    first = regions.generate_shard(cfg, 1)
    part = RegionLabels.load(first)
    assert np.array_equal(part.image, np.arange(83, 166)) and part.offsets[-1] == 83 * 2
    before = first.stat().st_mtime_ns
    regions.generate_shard(cfg, 1)  # finished: skipped without loading the teacher
    assert len(calls) == 1 and first.stat().st_mtime_ns == before
    # regions depend on (seed, image) only: shard 1 is the same whichever shards ran before
    again = tmp_path / "again"
    cfg.out_dir = str(again)
    regions.generate_shard(cfg, 1)
    other = RegionLabels.load(regions.shard_path(cfg, 1))
    assert np.array_equal(other.boxes, part.boxes) and np.array_equal(other.labels, part.labels)
    with pytest.raises(ReproError, match="shards are missing"):
        regions.gather(cfg)


def test_trainer_runs_the_fkd_pass_plan_end_to_end(tmp_path, monkeypatch):
    """The shared trainer on stored regions: one log row per pass, ending at the pass's last epoch, with the lr of
    the cosine at the pass's first epoch; a finished run is left alone."""
    import json

    from common.config import load_config
    from common.models import build_model
    from common.teacher import Teacher, freeze
    from common.train import train
    from papers.ferkd import regions

    config = tmp_path / "labels.yaml"
    config.write_text(f"out_dir: {tmp_path / 'labels'}\ndata: {{name: cifar10-mini}}\nregions: {{count: 2}}\n"
                      "label_type: marginal_smoothing_k5\nshards: 1\nbatch_images: 250\n")
    cfg = regions.load_labelset_config(config)
    torch.manual_seed(0)
    teacher = Teacher(freeze(build_model("resnet20_cifar", num_classes=10)), 32, (0.5,) * 3, (0.5,) * 3, "toy")
    monkeypatch.setattr(regions, "resolve_teacher", lambda cfg, num_classes: teacher)
    regions.generate_shard(cfg, 0)
    regions.gather(cfg)
    run_cfg = load_config(None, [
        "data.name=cifar10-mini", "data.num_workers=0", "model.name=resnet20_cifar", "train.epochs=6",
        "train.batch_size=20", "train.max_steps_per_epoch=1", "train.eval_every=6", "schedule.per=epoch",
        "optim.lr=0.1",
        f"method={{name: fkd, n_crops: 2, labels: {tmp_path / 'labels' / 'teacher' / 'manifest.json'}}}"])
    out = tmp_path / "run"
    train(run_cfg, out, command="test")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [2, 4, 5, 6]
    assert [r.get("pass_epochs", 1) for r in rows] == [2, 2, 1, 1]
    for row, start in zip(rows, [0, 2, 4, 5], strict=True):
        assert row["lr"] == pytest.approx(0.05 * (1 + math.cos(math.pi * start / 6)))
    assert rows[0]["method_stats"]["label_set"]
    with pytest.raises(ReproError, match="schedule.per=epoch"):
        train(load_config(None, [*[o for o in [
            "data.name=cifar10-mini", "data.num_workers=0", "model.name=resnet20_cifar", "train.epochs=6",
            "train.batch_size=20", "schedule.per=step"]],
            f"method={{name: fkd, n_crops: 2, labels: {tmp_path / 'labels' / 'teacher' / 'manifest.json'}}}"]),
            tmp_path / "run2", command="test")


def test_published_per_image_files_import_into_shards(tmp_path):
    """The official layout <softlabel_path>/<split>/<class>/<stem>.tar, keyed by image path, read safely."""
    from papers.ferkd import regions
    from papers.ferkd.labels import load_label_set

    rng = np.random.default_rng(0)
    expected = {}
    for split in ("train", "val"):
        for wnid in ("n01", "n02"):
            folder = tmp_path / "imagenet" / split / wnid
            folder.mkdir(parents=True)
            for stem in ("a", "b"):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{stem}.JPEG")
                if split == "train":
                    boxes = rng.random((5, 4)).astype(np.float32)
                    labels = quantize_soft_labels(distinct_probs(5, 3, seed=len(expected)), "smoothing")
                    write_official_file(tmp_path / "soft" / "imagenet" / "train" / wnid / f"{stem}.tar", boxes,
                                        rng.random(5) < 0.5, labels)
                    expected[(wnid, stem)] = (boxes, labels)
    config = tmp_path / "paper.yaml"
    config.write_text(f"out_dir: {tmp_path / 'out'}\ndata: {{name: imagenet, root: {tmp_path / 'imagenet'}, "
                      f"allow_download: false}}\nsource: published\npublished: {tmp_path / 'soft' / 'imagenet'}\n"
                      "label_type: smoothing\nshards: 2\n")
    cfg = regions.load_labelset_config(config)
    for shard in range(2):
        regions.import_shard(cfg, shard)
    regions.gather(cfg)
    labels, manifest = load_label_set(tmp_path / "out" / "teacher" / "manifest.json")
    assert manifest["num_images"] == 4 and manifest["label_type"] == "smoothing"
    order = [("n01", "a"), ("n01", "b"), ("n02", "a"), ("n02", "b")]  # ImageFolder's order
    for row, key in enumerate(order):
        rows = slice(labels.offsets[row], labels.offsets[row + 1])
        assert np.array_equal(labels.boxes[rows], expected[key][0])
        assert np.array_equal(labels.labels[rows], expected[key][1])
    assert np.array_equal(labels.target, [0, 0, 1, 1])
    # a missing file names the path the official trainer would have looked for
    (tmp_path / "soft" / "imagenet" / "train" / "n02" / "b.tar").unlink()
    cfg.out_dir = str(tmp_path / "out2")
    with pytest.raises(ReproError, match=r"n02/b\.tar"):
        regions.import_shard(cfg, 1)


def test_adapt_job_writes_the_rewrite_and_its_group_fractions(tmp_path):
    from papers.ferkd import regions
    from papers.ferkd.labels import load_label_set

    labels = make_label_set(n_images=10, regions=8, seed=3)
    config = tmp_path / "labels.yaml"
    config.write_text(f"out_dir: {tmp_path}\ndata: {{name: cifar10-mini}}\nlabel_type: marginal_smoothing_k5\n"
                      "adapted:\n  rule: {t_low: 0.05, t_mid: 0.15, t_high: 0.5, eps: 0.2, min_regions: 2, "
                      "on_too_few: restore}\n")
    cfg = regions.load_labelset_config(config)
    labels.save(tmp_path / "teacher" / "shard_00000.npz")
    write_manifest(tmp_path / "teacher", [tmp_path / "teacher" / "shard_00000.npz"],
                   {"label_type": "marginal_smoothing_k5", "num_classes": 10, "dataset": "toy", "num_images": 10,
                    "regions": {}, "use_fp16": False})
    regions.adapt(cfg, "rule")
    adapted, manifest = load_label_set(tmp_path / "adapted" / "rule" / "manifest.json")
    rows = labels.image_of_rows()
    keep, expected, groups, restored = adapt_region_labels(
        labels.labels, labels.target[rows], 10, 0.05, 0.15, 0.5, 0.2, image=rows, min_regions=2,
        on_too_few="restore", return_groups=True)
    assert np.array_equal(adapted.labels, expected[keep]) and np.array_equal(adapted.region, labels.region[keep])
    stats = manifest["stats"]
    for i, group in enumerate(GROUPS):
        assert stats[group] == pytest.approx(np.mean(groups == i))
    assert stats["kept"] == pytest.approx(keep.mean()) and stats["restored"] == pytest.approx(restored / len(keep))
    assert manifest["source"]["teacher_set"]


def test_memory_mapped_label_set_reads_the_same_rows(tmp_path):
    """Training reads a label set memory-mapped across its shards; every row and index form must be the same as
    the in-memory concatenation."""
    from papers.ferkd.labels import load_label_set

    parts = [make_label_set(n_images=n, regions=r, seed=s) for n, r, s in ((3, 5, 0), (4, 5, 1), (2, 5, 2))]
    files = []
    start = 0
    for k, part in enumerate(parts):
        part.image = part.image + start
        start += len(part.image)
        files.append(tmp_path / f"shard_{k:05d}.npz")
        part.save(files[-1])
    write_manifest(tmp_path, files, {"label_type": "marginal_smoothing_k5", "num_classes": 10, "num_images": 9})
    memory, _ = load_label_set(tmp_path / "manifest.json")
    mapped, _ = load_label_set(tmp_path / "manifest.json", mmap=True)
    for name in ("image", "target", "offsets"):
        assert np.array_equal(getattr(memory, name), getattr(mapped, name))
    rows = np.array([0, 14, 15, 16, 44, 3])
    for name in ("boxes", "flips", "labels", "region"):
        full, view = getattr(memory, name), getattr(mapped, name)
        assert view.shape == full.shape and len(view) == len(full)
        assert all(np.array_equal(full[i], view[i]) for i in range(len(full)))
        assert np.array_equal(full[rows], view[rows]) and np.array_equal(full[10:31], view[10:31])
        assert np.array_equal(full[full.shape[0] - 1], view[-1])
    ds = RegionDataset(_Images(mapped.target), mapped, crops=3, size=8, mean=(0.5,) * 3, std=(0.5,) * 3,
                       generator=torch.Generator().manual_seed(0))
    reference = RegionDataset(_Images(memory.target), memory, crops=3, size=8, mean=(0.5,) * 3, std=(0.5,) * 3,
                              generator=torch.Generator().manual_seed(0))
    for i in range(9):
        assert all(torch.equal(a, b) for a, b in zip(ds[i], reference[i], strict=True))
    # a shard rewritten after the manifest is refused, in both modes
    make_label_set(n_images=2, regions=6, seed=9).save(files[2])
    with pytest.raises(ReproError, match="changed after"):
        load_label_set(tmp_path / "manifest.json", mmap=True)
