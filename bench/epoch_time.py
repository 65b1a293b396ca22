"""Seconds per epoch and GPU-minutes per 200-epoch run of proxy configs: standard data path vs the
device-resident fast path, and 1, 2, 4 runs packed on one device at once.

    python -m bench.epoch_time                                   # the CIFAR-10 ResNet-18 proxy (GPU)
    python -m bench.epoch_time --all-proxy --packs 1             # every paper's CIFAR proxy config
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


def proxy_cases() -> list[tuple[Path, str, list[str]]]:
    """Every image-classification proxy config of every paper, each with its first (baseline) method."""
    import yaml

    cases = []
    for config in sorted(REPO.glob("papers/*/configs/proxy/*.yaml")):
        raw = yaml.safe_load(config.read_text())
        if str(raw.get("data", {}).get("name", "")).startswith(("cifar", "tiny-imagenet")):
            cases.append((config, next(iter(raw["methods"])), []))
    return cases


def measure_config(config: Path, method: str, overrides: list[str], args, tmp: Path) -> list[dict]:
    """Seconds per epoch of one config, standard path vs device cache, for each packing level."""
    from common.config import load_config
    from common.data import build_splits

    cfg = load_config(config, overrides, method_label=method)
    n_train = len(build_splits(cfg.data.name, root=cfg.data.root, allow_download=False,
                               val_split=cfg.data.val_split, split_seed=cfg.data.split_seed or 0)[0])
    full_steps = n_train // cfg.train.batch_size
    epochs = args.epochs_per_run or cfg.train.epochs
    rows = []
    for device_cache in (False, True):
        for k in args.packs:
            outs = [tmp / f"{config.parent.parent.parent.name}-{config.stem}-cache{int(device_cache)}-pack{k}-{j}"
                    for j in range(k)]
            start = time.perf_counter()
            procs = [launch(config, method, overrides, o, args.steps, device_cache) for o in outs]
            errors = [p.communicate()[1] for p in procs]
            wall = time.perf_counter() - start
            if any(p.returncode for p in procs):
                raise SystemExit("a benchmark run failed:\n" + "\n".join(e[-2000:] for e in errors))
            per_epoch = max(epoch_seconds(o) for o in outs) * full_steps / args.steps
            rows.append({"config": str(config.relative_to(REPO)), "method": method, "fast_path": device_cache,
                         "packed": k, "steps_per_epoch": full_steps, "epochs": epochs, "s_per_epoch": per_epoch,
                         "min_per_run": per_epoch * epochs / 60, "device_min_per_run": per_epoch * epochs / 60 / k,
                         "wall_s_all": wall})
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--all-proxy", action="store_true",
                        help="every paper's CIFAR proxy config (its baseline method) instead of the ResNet-18 one")
    parser.add_argument("--steps", type=int, default=100, help="batches timed per epoch")
    parser.add_argument("--packs", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--epochs-per-run", type=int, default=200,
                        help="epochs a run is costed at (0: each config's own train.epochs)")
    parser.add_argument("--out", default="bench/results/epoch_time.json")
    args = parser.parse_args(argv)
    if args.small:
        cases = [SMOKE]
    elif args.all_proxy:
        cases = proxy_cases()
    else:
        cases = [PROXY if PROXY[0].exists() else FALLBACK]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config, method, overrides in cases:
            rows += measure_config(config, method, overrides, args, Path(tmp))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print_table(f"seconds per epoch and minutes per run on {device} ({args.steps} steps timed, scaled to an epoch)",
                rows, ["config", "method", "fast_path", "packed", "s_per_epoch", "epochs", "min_per_run",
                       "device_min_per_run", "wall_s_all"])
    payload = {"benchmark": "epoch_time", "device": device, "steps_timed": args.steps, "rows": rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
