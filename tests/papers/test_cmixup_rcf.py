"""RCF-MNIST (papers/cmixup/rcf_mnist.py) and its ResNet-18 (papers/cmixup/resnet_rcf.py): idx files the tests
write themselves, the official generator written out image by image (torchvision transforms, PIL, the NumPy
colouring on NHWC arrays) on fixed draws, the colour / domain invariants, the model's manifold split against
`Learner_RCF_MNIST.forward_mixup`, and clear errors. No Fashion-MNIST package needed."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.models import resnet18

from common.data import build_splits
from common.errors import ReproError
from common.methods import StepContext, build_method
from papers.cmixup import rcf_mnist
from papers.cmixup.resnet_rcf import RCFResNet18, resnet18_rcf


def fake_images(n: int, seed: int = 0) -> np.ndarray:
    """`(n, 28, 28)` bytes with Fashion-MNIST's look: black background, a bright blob with texture."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[:28, :28]
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for k in range(n):
        cy, cx, r = rng.randint(9, 19), rng.randint(9, 19), rng.randint(5, 10)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        images[k][inside] = rng.randint(1, 256, size=inside.sum())  # values 1..255, some under the 5/255 bound
    return images


@pytest.fixture
def idx_folder(tmp_path):
    images = fake_images(36)
    rcf_mnist.write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    return tmp_path, images


# ------------------------------------------------------------------------------------------------ idx files
def test_idx_round_trip_gz_and_plain(tmp_path):
    images = fake_images(5)
    for name in ("a-idx3-ubyte.gz", "a-idx3-ubyte"):
        rcf_mnist.write_idx(tmp_path / name, images)
        np.testing.assert_array_equal(rcf_mnist.read_idx(tmp_path / name), images)
    raw = gzip.decompress((tmp_path / "a-idx3-ubyte.gz").read_bytes())
    assert raw[:4] == bytes([0, 0, 8, 3]) and int.from_bytes(raw[4:8], "big") == 5  # the idx header, by hand
    assert len(raw) == 16 + 5 * 28 * 28


def test_idx_errors_name_the_file(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ReproError, match="not an unsigned-byte idx"):
        rcf_mnist.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"abc")
    with pytest.raises(ReproError, match="truncated"):
        rcf_mnist.read_idx(tmp_path / "short")


def test_missing_fashion_mnist_is_one_line_naming_apt_get(tmp_path, monkeypatch):
    monkeypatch.setattr(rcf_mnist, "DEBIAN_FOLDER", tmp_path / "no-debian")
    monkeypatch.setenv("REPRO_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(ReproError) as err:
        build_splits("rcf_mnist", allow_download=False)
    message = str(err.value)
    assert "\n" not in message and "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "data" / "fashion_mnist" / "train-images-idx3-ubyte.gz") in message


def test_folder_order_root_then_env_then_debian(tmp_path, monkeypatch):
    for name in ("root", "env/fashion_mnist", "debian"):
        rcf_mnist.write_idx(tmp_path / name / "train-images-idx3-ubyte.gz", fake_images(6))
    monkeypatch.setattr(rcf_mnist, "DEBIAN_FOLDER", tmp_path / "debian")
    monkeypatch.setenv("REPRO_DATA_DIR", str(tmp_path / "env"))
    assert rcf_mnist.fashion_mnist_folder(tmp_path / "root")[0] == tmp_path / "root"
    assert rcf_mnist.fashion_mnist_folder(None)[0] == tmp_path / "env" / "fashion_mnist"
    monkeypatch.delenv("REPRO_DATA_DIR")
    assert rcf_mnist.fashion_mnist_folder(None)[0] == tmp_path / "debian"


# ------------------------------------------------------------------ the official generator, written out
OFFICIAL_TF = transforms.Compose([transforms.Grayscale(3), transforms.ToTensor(),
                                  transforms.Normalize([0.5] * 3, [0.5] * 3)])  # RCF_MNIST.py data_transforms


def official_rotate(img: torch.Tensor, degree: torch.Tensor) -> torch.Tensor:
    """`rotate_img`: unnormalise, ToPILImage, PIL rotate by the (1,) float32 tensor, ToTensor, normalise."""
    img = img / 2 + 0.5
    pil_img = transforms.ToPILImage()(img)
    r_img = pil_img.rotate(degree)
    r_img = transforms.ToTensor()(r_img)
    return (r_img - 0.5) * 2.0


def official_red_blue(imgt: np.ndarray, red_ratio) -> np.ndarray:
    """`red_blue_linear_map` on NHWC [0, 1] arrays, in place as the official code."""
    bound = 5 / 255
    imgt[..., 0] = np.where(imgt[..., 0] > bound, imgt[..., 0] * red_ratio, imgt[..., 0])
    imgt[..., 1] = np.where(imgt[..., 1] > bound, 0, imgt[..., 1])
    imgt[..., 2] = np.where(imgt[..., 2] > bound, imgt[..., 2] * (1 - red_ratio), imgt[..., 2])
    return imgt


def official_split(images: np.ndarray, degrees: torch.Tensor, kind: str, groups, val_ratio):
    """get_rotate_imgs + color_linear_red_blue + img_numpy2torch for one split, image by image."""
    r_imgs, labels = [], []
    for image, degree in zip(images, degrees, strict=True):
        tensor = OFFICIAL_TF(Image.fromarray(image, mode="L"))
        r_imgs.append(official_rotate(tensor, degree.reshape(1)).unsqueeze(0))
        labels.append(degree.reshape(1) / 360.0)
    x = (torch.cat(r_imgs) / 2 + 0.5).numpy().transpose(0, 2, 3, 1)  # img_torch2numpy
    y = torch.cat(labels)
    ratio_matric = np.expand_dims(np.expand_dims(y.numpy(), -1), -1)
    if kind == "valid":
        x = official_red_blue(x, np.expand_dims(np.expand_dims(val_ratio, -1), -1))
    else:
        normal, inverse = groups
        first, second = (1.0 - ratio_matric, ratio_matric) if kind == "test" else (ratio_matric, 1.0 - ratio_matric)
        x[normal] = official_red_blue(x[normal], first[normal])
        x[inverse] = official_red_blue(x[inverse], second[inverse])
    return (torch.tensor(np.transpose(x, (0, 3, 1, 2))) - 0.5) * 2, y


def test_build_equals_the_official_generator_on_the_same_draws():
    images, seed = fake_images(30, seed=3), 7
    ours = rcf_mnist.build_rcf_mnist(images, seed)
    # replay our draws, in their order, then build every image the official way
    generator, rng = torch.Generator().manual_seed(seed), np.random.RandomState(seed)
    order = torch.randperm(30, generator=generator)
    rows = {"train": order[:20], "valid": order[20:25], "test": order[25:]}
    rows["train"] = rows["train"][torch.randperm(20, generator=generator)]
    degrees = {k: torch.rand(len(v), generator=generator) * 360.0 for k, v in rows.items()}
    for kind in ("train", "valid", "test"):
        n = len(rows[kind])
        if kind == "valid":
            groups, val_ratio = None, rng.rand(n)
        else:
            normal = rng.choice(np.arange(n), size=int(n * 0.8), replace=False)
            groups, val_ratio = (normal, np.setdiff1d(np.arange(n), normal)), None
        x, y = official_split(images[rows[kind].numpy()], degrees[kind], kind, groups, val_ratio)
        assert torch.equal(ours[kind].features, x), kind  # bit for bit
        assert torch.equal(ours[kind].targets[:, 0], y), kind
        expected_domains = np.zeros(n, dtype=np.int64)
        if groups is not None:
            expected_domains[groups[1]] = 1
        np.testing.assert_array_equal(ours[kind].domains.numpy(), expected_domains)


def test_round_trip_truncation_is_the_official_one():
    """ToPILImage truncates `(x / 2 + .5) * 255`: some bytes come back one lower; ours must do the same."""
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    official = np.stack([np.asarray(transforms.ToPILImage()(OFFICIAL_TF(Image.fromarray(v, mode="L")) / 2 + 0.5))[..., 0]
                         for v in values])
    np.testing.assert_array_equal(rcf_mnist.official_round_trip(values), official)


def test_rotation_by_0_and_90_degrees():
    images = fake_images(3)
    np.testing.assert_array_equal(rcf_mnist.rotate(images, torch.zeros(3)), images)
    np.testing.assert_array_equal(rcf_mnist.rotate(images, torch.full((3,), 90.0)), np.rot90(images, 1, axes=(1, 2)))


# -------------------------------------------------------------------------------------------- invariants
def red_share(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the red share R / (R + B) over coloured pixels (green set to 0 there), and the mask."""
    unit = features / 2 + 0.5
    red, green, blue = unit[:, 0], unit[:, 1], unit[:, 2]
    coloured = (green == 0) & (red + blue > 0.05)
    share = torch.where(coloured, red / (red + blue).clamp_min(1e-12), torch.zeros_like(red))
    return share.sum((1, 2)) / coloured.sum((1, 2)).clamp_min(1), coloured


def test_colour_encodes_the_label_as_the_official_spurious_groups():
    splits = rcf_mnist.build_rcf_mnist(fake_images(60, seed=1), seed=0)
    assert [len(splits[k]) for k in ("train", "valid", "test")] == [40, 10, 10]
    for kind, flipped_domain in (("train", 1), ("test", 0)):
        split = splits[kind]
        label = split.targets[:, 0]
        share, _ = red_share(split.features)
        assert int((split.domains == 0).sum()) == int(len(split) * 0.8)
        expected = torch.where(split.domains == flipped_domain, 1 - label, label)
        torch.testing.assert_close(share, expected, atol=2e-3, rtol=0)
    assert (splits["valid"].domains == 0).all()
    assert ((splits["train"].targets >= 0) & (splits["train"].targets < 1)).all()
    for split in splits.values():  # pixels at or below 5/255 keep their grey value in all three channels
        unit = split.features / 2 + 0.5
        dark = unit[:, 1] > 0
        assert torch.equal(unit[:, 0][dark], unit[:, 1][dark]) and torch.equal(unit[:, 2][dark], unit[:, 1][dark])
        assert (unit[:, 1][dark] <= 5 / 255 + 1e-7).all()


def test_split_sizes():
    assert rcf_mnist.split_sizes(60000) == (40000, 10000, 10000)
    assert rcf_mnist.split_sizes(120) == (80, 20, 20)
    with pytest.raises(ReproError, match="too few"):
        rcf_mnist.split_sizes(5)


def test_registry_builds_from_a_folder_and_the_committed_sample(idx_folder):
    folder, images = idx_folder
    train, val, test, info = build_splits("rcf_mnist", root=folder, allow_download=False, split_seed=4)
    assert (len(train), len(val), len(test)) == (24, 6, 6) and info.task == "regression"
    assert train.features.shape == (24, 3, 28, 28) and test.domains.shape == (6,)
    assert str(folder) in info.source and "split_seed=4" in info.source
    torch.testing.assert_close(train.features, rcf_mnist.build_rcf_mnist(images, 4)["train"].features)
    mini = build_splits("rcf_mnist-mini", allow_download=False, split_seed=0)
    assert [len(s) for s in mini[:3]] == [80, 20, 20]


# --------------------------------------------------------------------------------------------------- model
def test_model_equals_learner_rcf_mnist_and_its_forward_mixup():
    torch.manual_seed(0)
    model = resnet18_rcf(num_classes=1).eval()
    ori = resnet18()  # Learner_RCF_MNIST written out: children[:-2], GAP, Linear(512, 1)
    feature_extractor = torch.nn.Sequential(*list(ori.children())[:-2])
    feature_extractor.load_state_dict(model.block_1.state_dict())
    fc = torch.nn.Linear(512, 1)
    fc.load_state_dict(model.head.state_dict())
    feature_extractor.eval()
    x1, x2, lam = torch.randn(4, 3, 28, 28), torch.randn(4, 3, 28, 28), 0.3
    official = fc(torch.nn.AdaptiveAvgPool2d(1)(feature_extractor(x1)).flatten(1))
    torch.testing.assert_close(model(x1), official)
    mixed = lam * feature_extractor(x1) + (1 - lam) * feature_extractor(x2)
    official_mix = fc(torch.nn.AdaptiveAvgPool2d(1)(mixed).flatten(1))
    ours_mix = model.forward_head(model.block_2(lam * model.block_1(x1) + (1 - lam) * model.block_1(x2)))
    torch.testing.assert_close(ours_mix, official_mix)
    assert model.block_1(x1).shape == (4, 512, 1, 1)  # 28x28 in: layer4's map is 1x1


def test_weights_file_loads_a_torchvision_state_dict(tmp_path):
    torch.manual_seed(1)
    donor = resnet18()
    torch.save(donor.state_dict(), tmp_path / "r18.pth")
    model = RCFResNet18(weights=str(tmp_path / "r18.pth"))
    torch.testing.assert_close(model.block_1[0].weight, donor.conv1.weight)
    torch.testing.assert_close(model.block_1[7][1].bn2.running_var, donor.layer4[1].bn2.running_var)
    with pytest.raises(ReproError, match="neither 'imagenet'"):
        RCFResNet18(weights=str(tmp_path / "absent.pth"))
    with pytest.raises(ReproError, match="weights=imagenet"):
        resnet18_rcf(pretrained=True)


def test_within_batch_cmixup_step_on_rcf_mnist(idx_folder):
    folder, _ = idx_folder
    train, _, _, info = build_splits("rcf_mnist", root=folder, allow_download=False)
    method = build_method({"name": "cmixup_batch", "alpha": 2.0, "bandwidth": 0.2, "manifold": True}, num_classes=1,
                          task="regression")
    method.prepare(train, info)
    model = resnet18_rcf(num_classes=1)
    method.check_model(model)
    batch = (train.features[:8], train.targets[:8])
    ctx = StepContext(epoch=0, step=0, progress=0.0, generator=torch.Generator().manual_seed(0))
    out = method.step(model, batch, ctx)
    assert torch.isfinite(out["loss"]) and out["logits"].shape == (8, 1)
    out["loss"].backward()
    assert model.block_1[0].weight.grad is not None and model.head.weight.grad.abs().sum() > 0


def test_imagenet_weights_offline_is_one_line_naming_the_cache_file(monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ReproError) as err:
        RCFResNet18(weights="imagenet")
    message = str(err.value)
    assert "\n" not in message and "resnet18-f37072fd.pth" in message and "hub/checkpoints" in message
