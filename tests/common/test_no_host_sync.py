"""No host synchronisation inside a step: every registered method's step is run with the tensors that depend on
the model (its output, and every module's output inside it) marked, and any conversion of a marked tensor to a
Python value or a CPU copy in the method's own code (outside the model's forward) raises.

On a GPU each such conversion (``float(t)``, ``t.item()``, ``bool(t)``, ``t.tolist()``, ``t.cpu()``) waits for the
device to finish the step so far; a step returns tensors instead, and the trainer sums them on the device and
reads them once per epoch or at its NaN-check interval.
"""

import pytest
import torch
from test_method_contract import prepared  # same folder: pytest puts it on sys.path

from common.methods import StepContext, list_methods

FORBIDDEN = {
    torch.Tensor.item: "t.item()", torch.Tensor.__float__: "float(t)", torch.Tensor.__int__: "int(t)",
    torch.Tensor.__bool__: "bool(t)", torch.Tensor.tolist: "t.tolist()", torch.Tensor.cpu: "t.cpu()",
    torch.Tensor.numpy: "t.numpy()", torch.Tensor.__index__: "an index from t",
}
# > 0 inside a module's forward (conversions inside the model are the model's business) or where reading is the
# point (epoch_stats, once per epoch)
_exempt = [0]


class HostSync(AssertionError):
    pass


class ModelDerived(torch.Tensor):
    """A tensor computed from a module's output; results of ops on it are ModelDerived too."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in FORBIDDEN and _exempt[0] == 0:
            raise HostSync(f"{FORBIDDEN[func]} on a tensor computed from the model's output: a host sync per step")
        return super().__torch_function__(func, types, args, kwargs or {})


def _mark(value):
    if isinstance(value, torch.Tensor) and not isinstance(value, ModelDerived):
        return value.as_subclass(ModelDerived)
    if isinstance(value, tuple):
        return tuple(_mark(v) for v in value)
    if isinstance(value, list):
        return [_mark(v) for v in value]
    return value


@pytest.fixture
def marked_outputs():
    def enter(module, inputs):
        _exempt[0] += 1

    def leave(module, inputs, output):
        _exempt[0] -= 1
        return _mark(output)

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
               torch.nn.modules.module.register_module_forward_hook(leave, always_call=True)]
    yield
    for handle in handles:
        handle.remove()
    _exempt[0] = 0


def test_the_detector_catches_a_sync_and_allows_tensors(marked_outputs):
    model = torch.nn.Linear(3, 2)
    out = model(torch.randn(4, 3))
    loss = out.float().softmax(-1).mean() * 2  # ops on it stay on the device and stay marked
    assert isinstance(loss, ModelDerived)
    for convert in (float, bool, lambda t: t.item(), lambda t: t.cpu(), lambda t: t.detach().tolist()):
        with pytest.raises(HostSync):
            convert(loss)
    float(torch.ones(()))  # a tensor that does not depend on the model converts freely


@pytest.mark.parametrize("name", list_methods())
def test_a_step_never_converts_what_the_model_computed(name, marked_outputs):
    method, model, batch = prepared(name)
    ctx = StepContext(epoch=0, step=0, progress=0.0, generator=torch.Generator().manual_seed(1))
    for seed in range(4):  # several draws: a method's branches (e.g. SMMix vs Mixup batches) all run
        ctx.generator.manual_seed(seed)
        out = method.step(model, batch, ctx)
        out["loss"].backward()
    _exempt[0] += 1
    method.epoch_stats()  # once per epoch: reading the device sums here is the point
