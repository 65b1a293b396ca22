"""The method contract, for every registered method (a new method is covered as soon as it registers):
finite scalar loss, logits of the right shape, gradients reach the model, the same generator gives the
same step, a different generator a different one for mixing methods, and options are validated."""

import numpy as np
import pytest
import torch

from common.data import DataInfo, TabularDataset
from common.errors import ReproError
from common.methods import METHODS, StepContext, build_method, list_methods
from common.models import build_model

K = 10
# what a method needs beyond its defaults to run on the test's 32-px, 4-px-patch ViT: options sized for it
# (MixPro's defaults are ImageNet's 56-px cells on 14-px patches) or its own model (SMMix's token head)
SMALL_IMAGE_OPTIONS = {"maskmix": {"mask_size": 8, "patch_size": 4}, "mixpro": {"mask_size": 8, "patch_size": 4}}
IMAGE_MODEL = {"smmix": "smmix_vit_tiny_patch4_32"}
# methods that train on stored data of their own (FKD's region labels, (B, n, C, H, W) batches) bring a setup
# returning (method, model, batch): module and keyword arguments of its contract_setup (ICM's complementary-label
# arms need their [cl, y, cluster] batches)
OWN_SETUP = {"fkd": ("papers.ferkd.testing", {}), "adautomix": ("papers.adautomix.testing", {}),
             "mealv2": ("papers.mealv2.testing", {}),
             **{name: ("papers.icm.testing", {"method": name})
                for name in ("cll_none", "cll_mixup", "icm_official", "icm_mix")}}


def classification_setup(name=None):
    torch.manual_seed(0)
    model_name = IMAGE_MODEL.get(name, "vit_tiny_patch4_32")
    model = build_model(model_name, num_classes=K, depth=1).eval()  # eval: no dropout noise
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, K, (8,), generator=g))
    info = DataInfo(name="toy-images", task="classification", num_classes=K, image_size=32, mean=None, std=None,
                    source="test")
    return model, batch, None, info


def regression_setup(name=None):
    rs = np.random.RandomState(0)
    features, targets = rs.randn(64, 5), rs.randn(64) * 3 + 10
    dataset = TabularDataset(features, targets, np.zeros(5), np.ones(5))
    torch.manual_seed(0)
    model = build_model("mlp_regression", num_classes=1, in_features=5)
    batch = (dataset.features[:8], dataset.targets[:8])
    info = DataInfo(name="toy-table", task="regression", num_classes=1, image_size=None, mean=None, std=None,
                    source="test")
    return model, batch, dataset, info


def prepared(name):
    """Build `name` for the task it supports (classification first, else regression)."""
    if name in OWN_SETUP:
        import importlib

        module, kwargs = OWN_SETUP[name]
        return importlib.import_module(module).contract_setup(K, **kwargs)
    for setup in (classification_setup, regression_setup):
        model, batch, dataset, info = setup(name)
        options = {"name": name, **(SMALL_IMAGE_OPTIONS.get(name, {}) if info.task == "classification" else {})}
        # label smoothing where the method takes it; some refuse it (DecoupleMix's loss is defined without)
        for smoothing in ((0.1, 0.0) if info.task == "classification" else (0.0,)):
            try:
                method = build_method(options, num_classes=info.num_classes, label_smoothing=smoothing,
                                      task=info.task)
                method.prepare(dataset, info)
                method.check_model(model)
            except ReproError:
                continue
            return method, model, batch
    pytest.fail(f"method {name!r} works neither on images with a ViT nor on a table with an MLP")


def run_step(method, model, batch, seed):
    ctx = StepContext(epoch=0, step=0, progress=0.0, generator=torch.Generator().manual_seed(seed))
    model.zero_grad(set_to_none=True)
    out = method.step(model, batch, ctx)
    out["loss"].backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return out, grads


@pytest.mark.parametrize("name", list_methods())
def test_step_contract(name):
    method, model, batch = prepared(name)
    out, grads = run_step(method, model, batch, seed=1)
    loss = out["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert out["logits"].shape[0] == batch[0].shape[0] or out["logits"].shape[0] % batch[0].shape[0] == 0
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    for key, value in out.items():
        if key not in ("loss", "logits"):
            assert np.isfinite(float(value)), key
    again, grads_again = run_step(method, model, batch, seed=1)
    assert torch.equal(again["loss"], loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_again, strict=True))


@pytest.mark.parametrize("name", [n for n in list_methods() if n != "erm"])
def test_randomness_comes_from_the_generator(name):
    method, model, batch = prepared(name)
    losses = {float(run_step(method, model, batch, seed)[0]["loss"].detach()) for seed in range(6)}
    assert len(losses) > 1, "six generator seeds gave the same loss: the method ignores ctx.generator"


@pytest.mark.parametrize("name", list_methods())
def test_unknown_option_is_rejected_with_a_hint(name):
    fields = list(METHODS[name].Params.__dataclass_fields__)
    if not fields:
        pytest.skip("no options")
    typo = fields[0] + "x"
    with pytest.raises(ReproError, match=fields[0]):
        build_method({"name": name, typo: 1}, num_classes=K)
