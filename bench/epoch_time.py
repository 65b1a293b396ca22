"""Seconds per epoch and GPU-minutes per 200-epoch run of proxy configs: standard data path vs the
device-resident fast path, and 1, 2, 4 runs packed on one device at once.

    python -m bench.epoch_time                                   # the CIFAR-10 ResNet-18 proxy (GPU)
    python -m bench.epoch_time --small                           # smoke config, a few steps (CPU test)

Each measurement runs the real trainer (`python -m common.train`) for two epochs of `--steps` batches and
times the second (the first pays start-up, cuDNN autotuning, compilation); the per-epoch time is scaled from
`--steps` to a full epoch. Packed runs start k identical trainers together; their wall time per run is the
figure (k runs finishing in less than k times one run's time means packing helps).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import print_table, write_json

REPO = Path(__file__).resolve().parents[1]
PROXY = (REPO / "papers/resizemix/configs/proxy/cifar10_resnet18_200ep.yaml", "erm", [])
FALLBACK = (REPO / "papers/mixup/configs/proxy/cifar10_preactresnet18.yaml", "erm", ["model.name=resnet18_cifar"])
SMOKE = (REPO / "papers/mixup/configs/smoke/cifar10_preactresnet18.yaml", "erm",
         ["model.kwargs.width=8", "data.num_workers=0"])


def launch(config, method, overrides, out, steps, device_cache):
    args = [sys.executable, "-m", "common.train", "--config", str(config), "--method", method,
            "--output", str(out), "train.epochs=2", f"train.max_steps_per_epoch={steps}",
            f"data.device_cache={'true' if device_cache else 'false'}", "train.eval_every=1000", *overrides]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def epoch_seconds(out: Path) -> float:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return rows[-1]["epoch_time_s"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--steps", type=int, default=100, help="batches timed per epoch")
    parser.add_argument("--packs", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--epochs-per-run", type=int, default=200)
    parser.add_argument("--out", default="bench/results/epoch_time.json")
    args = parser.parse_args(argv)
    if args.small:
        config, method, overrides = SMOKE
    else:
        config, method, overrides = PROXY if PROXY[0].exists() else FALLBACK
    import yaml

    from common.config import load_config
    from common.data import build_splits

    cfg = load_config(config, overrides, method_label=method)
    n_train = len(build_splits(cfg.data.name, root=cfg.data.root, allow_download=False)[0])
    full_steps = n_train // cfg.train.batch_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for device_cache in (False, True):
            for k in args.packs:
                outs = [Path(tmp) / f"cache{int(device_cache)}-pack{k}-{j}" for j in range(k)]
                start = time.perf_counter()
                procs = [launch(config, method, overrides, o, args.steps, device_cache) for o in outs]
                errors = [p.communicate()[1] for p in procs]
                wall = time.perf_counter() - start
                if any(p.returncode for p in procs):
                    raise SystemExit("a benchmark run failed:\n" + "\n".join(e[-2000:] for e in errors))
                per_epoch = max(epoch_seconds(o) for o in outs) * full_steps / args.steps
                rows.append({"fast_path": device_cache, "packed": k, "s_per_epoch": per_epoch,
                             "min_per_run": per_epoch * args.epochs_per_run / 60,
                             "device_min_per_run": per_epoch * args.epochs_per_run / 60 / k,
                             "wall_s_all": wall})
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print_table(f"{config.relative_to(REPO)} ({method}) on {device}: {full_steps} steps/epoch, "
                f"{args.epochs_per_run}-epoch runs", rows,
                ["fast_path", "packed", "s_per_epoch", "min_per_run", "device_min_per_run", "wall_s_all"])
    payload = {"benchmark": "epoch_time", "device": device, "config": str(config.relative_to(REPO)),
               "overrides": overrides, "steps_timed": args.steps, "full_steps": full_steps, "rows": rows,
               "yaml": yaml.safe_load(config.read_text()).get("experiment")}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
