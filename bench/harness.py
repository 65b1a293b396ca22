"""Shared timing harness: warm-up, device synchronisation, images/s, peak memory, a table and JSON out."""

from __future__ import annotations

import json
import platform
import resource
import time
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, device: torch.device, batch_size: int, steps: int, warmup: int) -> dict:
    """Run `step()` warmup + steps times; return images/s and the peak memory of the timed steps."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # resident set size of the whole process: an upper bound, not per-step memory
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"images_per_s": steps * batch_size / seconds, "s_per_step": seconds / steps, "peak_mem_mib": peak}


def interleaved(steps: dict, device: torch.device, batch_size: int, steps_total: int, warmup: int,
                rounds: int = 5) -> dict[str, dict]:
    """Time several step functions in alternation so drift (clocks, thermals, other load) hits all alike.

    Each function is warmed up, then run in `rounds` blocks of `steps_total // rounds` steps, in forward
    order on even rounds and reversed on odd ones. Per function: the median images/s and s/step over the
    blocks, and the largest peak memory seen.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    per_block = max(1, steps_total // rounds)
    seen: dict[str, list[dict]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            seen[name].append(measure(steps[name], device, batch_size, per_block, warmup=0))
    out = {}
    for name, blocks in seen.items():
        s_per_step = sorted(b["s_per_step"] for b in blocks)[len(blocks) // 2]
        out[name] = {"images_per_s": batch_size / s_per_step, "s_per_step": s_per_step,
                     "peak_mem_mib": max(b["peak_mem_mib"] for b in blocks)}
    return out


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n{title}")
    print(" | ".join(columns))
    print(" | ".join("---" for _ in columns))
    for row in rows:
        cells = []
        for col in columns:
            value = row.get(col)
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        print(" | ".join(cells))


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")
