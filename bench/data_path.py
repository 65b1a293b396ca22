"""Images/s of producing augmented training batches, no model: the standard DataLoader path vs the
device-resident fast path (`data.device_cache`), on the same data, device and batch size.

    python -m bench.data_path                                  # full CIFAR-10 on the GPU if there is one
    python -m bench.data_path --dataset cifar10-mini --batches 5 --workers 0   # what the test runs

The standard path decodes JPEG/PNG and crops/flips with PIL in DataLoader workers, then copies the batch to
the device; the fast path indexes a resident uint8 tensor and crops/flips on the device. A training step
cannot go faster than its data, so the ratio says how much headroom each path leaves the model.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from bench.harness import device_name, print_table, synchronize, write_json
from common.data import build_splits
from common.fastdata import DeviceLoader


def time_batches(batches, device: torch.device, count: int, warmup: int) -> float:
    """Seconds per batch over `count` batches after `warmup`, each batch moved to (and ready on) `device`."""
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)[0].to(device, non_blocking=True)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(count):
        x, y = next(iterator)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    synchronize(device)
    return (time.perf_counter() - start) / count


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=100, help="batches timed per path")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="*", default=[4, 8], help="DataLoader worker counts")
    parser.add_argument("--out", default="bench/results/data_path.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train, _, _, info = build_splits(args.dataset, recipe=args.recipe, allow_download=False)
    needed = (args.batches + args.warmup) * args.batch_size
    if needed > len(train):
        raise SystemExit(f"{args.dataset} has {len(train)} training images; --batches {args.batches} with "
                         f"--warmup {args.warmup} at batch {args.batch_size} needs {needed}. Ask for fewer.")
    rows = []
    for workers in args.workers:
        loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, num_workers=workers, drop_last=True,
                            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
        s = time_batches(loader, device, args.batches, args.warmup)
        rows.append({"path": f"DataLoader, {workers} workers", "s_per_batch": s, "images_per_s": args.batch_size / s})
    start = time.perf_counter()
    fast = DeviceLoader(train, info, args.batch_size, device)  # decodes once (or reads the disk cache)
    setup = time.perf_counter() - start
    s = time_batches(fast.epoch(torch.Generator().manual_seed(0)), device, args.batches, args.warmup)
    rows.append({"path": "device cache", "s_per_batch": s, "images_per_s": args.batch_size / s,
                 "setup_s": setup})
    reference = rows[0]["images_per_s"]
    for row in rows:
        row["vs_first"] = row["images_per_s"] / reference
    print_table(f"augmented {args.dataset} batches of {args.batch_size} on {device_name(device)}", rows,
                ["path", "s_per_batch", "images_per_s", "vs_first", "setup_s"])
    payload = {"benchmark": "data_path", "device": device_name(device), "dataset": args.dataset,
               "batch_size": args.batch_size, "rows": rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
