"""The two benchmarks a GPU slice runs beside `bench.trainer_vs_plain` and `bench.data_path`, sized for a slice.

    python -m bench.slice_bench overhead                 # step overhead over ERM, each method on the model it needs
    python -m bench.slice_bench overhead --small         # CPU sizes (tests)
    python -m bench.slice_bench epoch-time --packs 1 4   # device-cache epoch time of the ResNet-18 proxy, 1 and 4 packed

`overhead` is `bench.method_overhead` over explicit (model, method) cases, so every method runs on the model it
was made for (MixPro/MaskMix on DeiT-S with 14-px patches as the paper, SMMix on DeiT-S with its token head,
TransMix on DeiT-S/16), each against ERM on the same model, in alternating blocks. `epoch-time` is
`bench.epoch_time` restricted to the device-cache path (the one proxy configs use). Both write their JSON after
every row, so a slice that stops them at its time cap keeps what they measured.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import device_name, interleaved, print_table, write_json

# case: (model, model kwargs, image size, batch, [(method label, method options)])
OVERHEAD_CASES = {
    "resnet18_cifar_32": ("resnet18_cifar", {}, 32, 128, [
        ("mixup", {}), ("cutmix", {}), ("mixup_cutmix", {}), ("resizemix", {}), ("decouple_mixup", {}),
        ("mrl", {}), ("mndcg", {})]),
    "deit_s16_224": ("deit_small_patch16_224", {}, 224, 128, [("mixup_cutmix", {}), ("transmix", {})]),
    "deit_s14_224": ("deit_small_patch16_224", {"patch_size": 14}, 224, 128, [("maskmix", {}), ("mixpro", {})]),
    "smmix_deit_s16_224": ("smmix_deit_small_patch16_224", {}, 224, 128, [("smmix", {})]),
}
SMALL_CASES = {  # the methods that need their own model or options (bench.method_overhead --small covers the rest)
    "vit_depth1_32": ("vit_tiny_patch4_32", {"depth": 1}, 32, 16, [("mixpro", {"mask_size": 8, "patch_size": 4})]),
    "smmix_vit_depth1_32": ("smmix_vit_tiny_patch4_32", {"depth": 1}, 32, 16, [("smmix", {})]),
}
EPOCH_CONFIG = "papers/resizemix/configs/proxy/cifar10_resnet18_200ep.yaml"
SMOKE_CONFIG = "papers/mixup/configs/smoke/cifar10_preactresnet18.yaml"


def overhead(argv=None) -> dict:
    from accelerate import Accelerator

    from bench.method_overhead import step_fn

    parser = argparse.ArgumentParser(prog="python -m bench.slice_bench overhead")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/results/method_overhead_slice.json")
    args = parser.parse_args(argv)
    precision = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=precision)
    payload = {"benchmark": "method_overhead", "device": device_name(accelerator.device), "precision": precision,
               "steps": args.steps, "rows": []}
    for case, (model, kwargs, size, batch, methods) in (SMALL_CASES if args.small else OVERHEAD_CASES).items():
        for label, options in methods:
            try:
                steps = {"method": step_fn(label, model, kwargs, size, batch, accelerator, options),
                         "erm": step_fn("erm", model, kwargs, size, batch, accelerator)}
                timed = interleaved(steps, accelerator.device, batch, args.steps, args.warmup, args.rounds)
            except Exception as exc:  # noqa: BLE001  (one method failing must not cost the slice the others)
                payload["rows"].append({"case": case, "model": model, "method": label,
                                        "skipped": f"{type(exc).__name__}: {str(exc)[:160]}"})
                continue
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            result, base = timed["method"], timed["erm"]
            payload["rows"].append({
                "case": case, "model": model, "model_kwargs": kwargs, "batch": batch, "method": label,
                "options": options, "erm_s_step": base["s_per_step"], "method_s_step": result["s_per_step"],
                "overhead_pct": 100 * (result["s_per_step"] / base["s_per_step"] - 1),
                "erm_peak_mib": base["peak_mem_mib"], "method_peak_mib": result["peak_mem_mib"]})
            write_json(args.out, payload)
    print_table(f"method step overhead over ERM on {payload['device']} ({precision})", payload["rows"],
                ["case", "method", "erm_s_step", "method_s_step", "overhead_pct", "method_peak_mib", "skipped"])
    write_json(args.out, payload)
    return payload


def epoch_time_cached(argv=None) -> dict:
    from bench.epoch_time import REPO, epoch_seconds, launch
    from common.config import load_config
    from common.data import build_splits

    parser = argparse.ArgumentParser(prog="python -m bench.slice_bench epoch-time")
    parser.add_argument("--config", default=EPOCH_CONFIG)
    parser.add_argument("--method", default="erm")
    parser.add_argument("--small", action="store_true", help="the smoke config at width 8 (CPU test)")
    parser.add_argument("--steps", type=int, default=50, help="batches timed per epoch")
    parser.add_argument("--packs", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--out", default="bench/results/epoch_time_slice.json")
    args = parser.parse_args(argv)
    config, overrides = (SMOKE_CONFIG, ["model.kwargs.width=8", "data.num_workers=0"]) if args.small else \
        (args.config, [])
    cfg = load_config(REPO / config, overrides, method_label=args.method)
    n_train = len(build_splits(cfg.data.name, root=cfg.data.root, allow_download=False,
                               val_split=cfg.data.val_split, split_seed=cfg.data.split_seed or 0)[0])
    full_steps = n_train // cfg.train.batch_size
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    payload = {"benchmark": "epoch_time", "device": device, "steps_timed": args.steps, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.packs:
            outs = [Path(tmp) / f"pack{k}-{j}" for j in range(k)]
            start = time.perf_counter()
            procs = [launch(REPO / config, args.method, overrides, o, args.steps, True) for o in outs]
            errors = [p.communicate()[1] for p in procs]
            wall = time.perf_counter() - start
            if any(p.returncode for p in procs):
                raise SystemExit("a benchmark run failed:\n" + "\n".join(e[-2000:] for e in errors))
            per_epoch = max(epoch_seconds(o) for o in outs) * full_steps / args.steps
            payload["rows"].append({"config": config, "overrides": overrides, "method": args.method, "fast_path": True,
                                    "packed": k,
                                    "steps_per_epoch": full_steps, "epochs": cfg.train.epochs,
                                    "s_per_epoch": per_epoch, "min_per_run": per_epoch * cfg.train.epochs / 60,
                                    "device_min_per_run": per_epoch * cfg.train.epochs / 60 / k, "wall_s_all": wall})
            write_json(args.out, payload)
    print_table(f"device-cache seconds per epoch on {device} ({args.steps} steps timed, scaled to an epoch)",
                payload["rows"], ["config", "packed", "s_per_epoch", "min_per_run", "device_min_per_run"])
    return payload


def main(argv=None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    commands = {"overhead": overhead, "epoch-time": epoch_time_cached}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m bench.slice_bench {{{','.join(commands)}}} [options]", file=sys.stderr)
        return 2
    commands[argv[0]](argv[1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
