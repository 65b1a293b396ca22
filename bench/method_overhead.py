"""Overhead of each method's training step over plain (ERM) training on the same model, and peak memory.

    python -m bench.method_overhead            # GPU sizes: CIFAR ResNet-18 at 32 (batch 128), DeiT-S at 224
    python -m bench.method_overhead --small    # CPU sizes, a few steps

Every registered method is measured on the models it can run on (TransMix needs a ViT with a class token;
regression methods are skipped). Overhead = step time / ERM step time - 1, measured in the same process with
the method and a fresh ERM model in alternating blocks (`bench.harness.interleaved`), so drift cancels.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator

from bench.harness import device_name, interleaved, print_table, write_json
from common.errors import ReproError
from common.methods import StepContext, build_method, list_methods
from common.models import build_model
from common.train import optimisation_step

MODELS = {"resnet18_cifar_32": ("resnet18_cifar", {}, 32, 128), "deit_s16_224": ("deit_small_patch16_224", {}, 224, 128)}
SMALL = {"preact_w8_32": ("preact_resnet18_cifar", {"width": 8}, 32, 16),
         "vit_depth1_32": ("vit_tiny_patch4_32", {"depth": 1}, 32, 16)}


def step_fn(method_name, model_name, kwargs, size, batch, accelerator, options=None):
    """A closure running one training step of `method_name` (with method `options`, default none) on its own
    model, optimiser and fixed batch."""
    device = accelerator.device
    method = build_method({"name": method_name, **(options or {})}, num_classes=10, label_smoothing=0.1)
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10, **kwargs)
    method.check_model(model)
    owned = method.attach(model)  # modules the method owns (AdAutoMix's generator and k), optimised as in the trainer
    params = [*model.parameters(), *(q for m in owned.values() for q in m.parameters() if q.requires_grad)]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    ctx = StepContext(epoch=0, step=0, progress=0.0, generator=torch.Generator().manual_seed(0))
    return lambda: optimisation_step(accelerator, model, optimizer, method, (x, y), ctx)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="alternating blocks the steps are split into")
    parser.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    parser.add_argument("--out", default="bench/results/method_overhead.json")
    args = parser.parse_args(argv)
    precision = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=precision)
    rows = []
    for case, (model_name, kwargs, size, batch) in (SMALL if args.small else MODELS).items():
        for name in args.methods or list_methods():
            if name == "erm":
                continue
            try:
                steps = {"method": step_fn(name, model_name, kwargs, size, batch, accelerator),
                         "erm": step_fn("erm", model_name, kwargs, size, batch, accelerator)}
                timed = interleaved(steps, accelerator.device, batch, args.steps, args.warmup, args.rounds)
                result, base = timed["method"], timed["erm"]
            except (ReproError, RuntimeError, AttributeError, ValueError, IndexError) as exc:
                # e.g. TransMix on a CNN, regression methods on images, methods that need prepare() or their own
                # batches (ICM's [cl, y, cluster] targets)
                rows.append({"case": case, "method": name, "skipped": str(exc).split(";")[0][:80]})
                continue
            rows.append({"case": case, "method": name, "erm_s_step": base["s_per_step"],
                         "method_s_step": result["s_per_step"],
                         "overhead_pct": 100 * (result["s_per_step"] / base["s_per_step"] - 1),
                         "erm_peak_mib": base["peak_mem_mib"], "method_peak_mib": result["peak_mem_mib"]})
    print_table(f"method step overhead over ERM on {device_name(accelerator.device)} ({precision})", rows,
                ["case", "method", "erm_s_step", "method_s_step", "overhead_pct", "method_peak_mib", "skipped"])
    payload = {"benchmark": "method_overhead", "device": device_name(accelerator.device), "rows": rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
