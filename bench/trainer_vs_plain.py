"""Images/s of our trainer's step vs a minimal hand-written timm loop: same model, batch, precision, optimiser.

    python -m bench.trainer_vs_plain                 # GPU: DeiT-S/16 at 224 and the CIFAR ResNet-18 at 32
    python -m bench.trainer_vs_plain --small         # CPU-sized models, a few steps (what the test runs)

The ratio trainer/plain is the figure of merit (>= 1.0 means the trainer adds nothing). Both sides run in
this process on the same device, in alternating blocks (`bench.harness.interleaved`, median of the blocks),
so clocks and thermals are shared.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from bench.harness import device_name, interleaved, print_table, write_json
from common.methods import StepContext, build_method
from common.models import build_model
from common.train import optimisation_step

CASES = {  # name: (model, kwargs, image size, batch)
    "deit_s16_224": ("deit_small_patch16_224", {}, 224, 128),
    "resnet18_cifar_32": ("resnet18_cifar", {}, 32, 128),
}
SMALL = {
    "vit_tiny_depth1_32": ("vit_tiny_patch4_32", {"depth": 1}, 32, 16),
    "preact_resnet18_w8_32": ("preact_resnet18_cifar", {"width": 8}, 32, 16),
}


def run_case(name, model_name, kwargs, size, batch, steps, warmup, rounds, precision, accelerator):
    device = accelerator.device
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    torch.manual_seed(0)
    plain_model = build_model(model_name, num_classes=10, **kwargs).to(device)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-4)

    def plain_step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(plain_model(x), y)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10, **kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    method = build_method({"name": "erm"}, num_classes=10)
    ctx = StepContext(epoch=0, step=0, progress=0.0, generator=torch.Generator().manual_seed(0))

    def trainer_step():
        optimisation_step(accelerator, model, optimizer, method, (x, y), ctx)

    timed = interleaved({"plain": plain_step, "trainer": trainer_step}, device, batch, steps, warmup, rounds)
    plain, ours = timed["plain"], timed["trainer"]
    return {"case": name, "model": model_name, "batch": batch, "image": size, "precision": precision,
            "plain_img_s": plain["images_per_s"], "trainer_img_s": ours["images_per_s"],
            "ratio": ours["images_per_s"] / plain["images_per_s"],
            "plain_peak_mib": plain["peak_mem_mib"], "trainer_peak_mib": ours["peak_mem_mib"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized models (for tests and laptops)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="alternating blocks the steps are split into")
    parser.add_argument("--precision", default=None, help="no | bf16 (default: bf16 on GPU, no on CPU)")
    parser.add_argument("--out", default="bench/results/trainer_vs_plain.json")
    args = parser.parse_args(argv)
    precision = args.precision or ("bf16" if torch.cuda.is_available() else "no")
    accelerator = Accelerator(mixed_precision=precision)
    rows = [run_case(name, *case, args.steps, args.warmup, args.rounds, precision, accelerator)
            for name, case in (SMALL if args.small else CASES).items()]
    print_table(f"trainer step vs plain timm loop on {device_name(accelerator.device)}", rows,
                ["case", "batch", "precision", "plain_img_s", "trainer_img_s", "ratio", "plain_peak_mib",
                 "trainer_peak_mib"])
    payload = {"benchmark": "trainer_vs_plain", "device": device_name(accelerator.device), "rows": rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
