"""Turn a short GPU window into committed results: ``python -m bench.slice --minutes 9``.

    python -m bench.slice prepare-carry          # here: .data/ (CIFAR-10, commit stamp), prints the device call
    python -m bench.slice --dry-run              # here: the plan, what would run, estimated minutes each, total
    python -m bench.slice --minutes 9            # on the GPU machine, from the repository root
    python -m bench.slice merge DIR              # here: unpack the archive the device returned, update RESULTS.md

Within the minutes given, on a machine holding only the working tree and the carried folder (no snakemake, no
`datasets`), the slice
1. runs the benchmarks of `bench/slice_plan.yaml` that no committed slice has measured on this device kind,
   within `bench_share` of the time (each capped, each stopped at its cap);
2. trains proxy runs from the plan's priority list (one seed of every arm of every comparison before a second
   seed of any), `pack` at a time on the GPU, each started only if it and the runs going all fit before the
   deadline (estimates: `bench.slice_plan`), stopping a run early when its own epochs say it cannot finish and
   every run still going at the deadline (checkpoints kept in the work folder, never in the output);
3. writes ONE archive `slice-<date>-<commit>.tar.gz` in the repository layout (`results/.../seed<k>/` with
   metrics, log, resolved config and provenance; `bench/slices/<id>/` with the benchmark JSON, the record and
   the measured seconds per epoch the next plan reads), plus `summary.md` and `slice.log`, into `--out` (default
   `$OUT`), rebuilt after every finished step. Runs are launched exactly as the workflow's train rule would
   (`python -m common.train --config ... --method ... seed=K`), so their config hash is the grid's and the
   workflow treats them as finished.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

from bench import slice_io
from bench import slice_plan as sp
from bench import slice_run as sr
from common import workflow as grid
from common.errors import ReproError


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.slice", description=__doc__.splitlines()[0],
                                     epilog="Subcommands: prepare-carry, merge SRC, results-md.")
    parser.add_argument("--minutes", type=float, default=9.0, help="the command returns within this many minutes")
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else runs/slice/out)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; needs no GPU and no data")
    parser.add_argument("--plan", default=str(sp.PLAN_FILE))
    parser.add_argument("--pack", type=int, default=None, help="runs at once on the GPU (default: the plan's)")
    parser.add_argument("--workdir", default="runs/slice", help="where runs train and checkpoints stay (git-ignored)")
    parser.add_argument("--device-kind", default=None, help="plan for this kind (h100, h200, ...): dry runs only")
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmarks, all time to proxy runs")
    parser.add_argument("--force-bench", action="store_true", help="run benchmarks even if measured on this kind")
    parser.add_argument("--bench-share", type=float, default=None, help="share of the minutes for benchmarks")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (tests, smoke-scale plans)")
    parser.add_argument("--stamp", default=f"{slice_io.CARRY}/{slice_io.STAMP}",
                        help="commit stamp written by prepare-carry (read when the copy has no git history)")
    return parser.parse_args(argv)


def device_info(allow_cpu: bool, dry_run: bool, kind_arg: str | None) -> tuple[str, str]:
    import torch

    if kind_arg:
        if not dry_run:
            raise ReproError("--device-kind only plans (with --dry-run); a slice measures its own device.")
        return f"planned for {kind_arg}", kind_arg
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return name, sp.device_kind(name)
    if dry_run:
        return "no GPU here: planned for h100 (pass --device-kind)", "h100"
    if not allow_cpu:
        raise ReproError("no CUDA device: a slice needs a GPU. Use --dry-run to see the plan here, or --allow-cpu "
                         "for a smoke-scale test plan.")
    from bench.harness import device_name

    return device_name(torch.device("cpu")), "cpu"


def queue_for(plan: sp.Plan, root: Path, results_root: Path) -> tuple[list[sp.PlannedRun], list[sp.PlannedRun]]:
    """(runs to train, runs `results_root` already holds finished with the grid's config hash)."""
    runs = sp.expand(plan, root)
    done = [r for r in runs if sp.is_finished(r.run, results_root, root)]
    return [r for r in runs if r not in done], done


def bench_budget(plan: sp.Plan, args, root: Path, kind: str) -> tuple[float, list[str]]:
    """Seconds set aside for benchmarks and the names that would run (those not yet measured on `kind`)."""
    if args.no_bench or not plan.benchmarks:
        return 0.0, []
    done = {} if args.force_bench else sr.measured_benchmarks(root, kind)
    todo = [b["name"] for b in plan.benchmarks if b["name"] not in done]
    share = plan.bench_share if args.bench_share is None else args.bench_share
    return (args.minutes * 60 * float(share) if todo else 0.0), todo


def check_data(queue: list[sp.PlannedRun], root: Path) -> None:
    """Every dataset the queued runs read must be on this machine (nothing can be downloaded on the device)."""
    base = os.environ.get("REPRO_DATA_DIR")
    names = set()
    for planned in queue:
        r = planned.run
        data = grid.load_experiment(r.paper, r.scale, r.experiment, root).get("data") or {}
        names.add((data.get("name", "cifar10-mini"), data.get("root")))
    for name, data_root in sorted(names, key=str):
        if name.endswith("-mini") or data_root:
            continue
        if not base or not (Path(base) / name).is_dir():
            raise ReproError(f"dataset {name} not found: REPRO_DATA_DIR={base!r} has no {name}/ folder. On the "
                             f"device run with REPRO_DATA_DIR={slice_io.CARRY} and carry {slice_io.CARRY} "
                             "(python -m bench.slice prepare-carry builds it).")


def run(args, root: Path = sp.REPO, results_root: Path | None = None, command_for=None, clock=time.monotonic,
        sleep=time.sleep, poll_s: float = 2.0) -> int:
    """The slice (or its plan with args.dry_run). `results_root` is the checkout whose finished runs are skipped
    (default `root`); `command_for(run, folder, root)` replaces the trainer command (tests)."""
    started = clock()
    plan = sp.load_plan(args.plan)
    if args.pack is not None:
        plan.raw["pack"] = args.pack
    device, kind = device_info(args.allow_cpu, args.dry_run, args.device_kind)
    queue, done = queue_for(plan, root, results_root or root)
    estimator = sp.Estimator(plan, kind, sp.Measurements.load(root), root)
    budget, todo = bench_budget(plan, args, root, kind)
    total = args.minutes * 60
    stop = total - float(plan.reserve_s)
    if args.dry_run:
        print(f"slice plan for {args.minutes:g} min on {device} (kind {kind}); pack {plan.pack}, fit margin "
              f"x{plan.fit_margin}; {len(done)} planned run(s) already finished in the checkout")
        if todo:
            print(f"benchmarks first, {budget / 60:.1f} min: {', '.join(todo)}")
        else:
            print("benchmarks: none left to measure on this kind")
        lines = sp.schedule(queue, estimator, budget, stop, int(plan.pack), float(plan.fit_margin),
                            bool(plan.probe), 2 * float(plan.startup_s))
        print(sp.format_plan(lines, f"proxy runs from {budget / 60:.1f} to {stop / 60:.1f} min "
                                    f"({args.minutes:g} min less {plan.reserve_s:g} s kept to stop runs and pack):"))
        return 0

    import torch

    missing = slice_io.check_imports()
    if missing:
        raise ReproError(f"this interpreter lacks {', '.join(missing)}: carry wheels "
                         "(python -m bench.slice prepare-carry --wheel NAME==VERSION) and install them first.")
    check_data(queue, root)
    out = Path(args.out or os.environ.get("OUT") or "runs/slice/out").resolve()
    sr.check_out_dir(out)
    git_state = slice_io.slice_git_state(root, (root / args.stamp) if args.stamp else None)
    now = dt.datetime.now(dt.UTC)
    slice_id = f"{now:%Y%m%dT%H%MZ}-{str(git_state['git_commit'])[:7]}"
    ctx = sr.SliceContext(root=root, out=out, workdir=(root / args.workdir).resolve(), slice_id=slice_id, plan=plan,
                          device=device, kind=kind, git=git_state, date=now.strftime("%Y-%m-%dT%H:%MZ"),
                          started=started, deadline=started + total, clock=clock, sleep=sleep, poll_s=poll_s,
                          env={"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // max(1, int(plan.pack))))})
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    record = {"slice": slice_id, "date": ctx.date, "device": device, "device_kind": kind, **git_state,
              "minutes": args.minutes, "pack": int(plan.pack), "scale": plan.scale, "torch": torch.__version__,
              "benchmarks": [], "runs": [], "_factor": estimator.pack_factor}
    ctx.log(f"slice {slice_id}: {args.minutes:g} min on {device}; commit {git_state['git_commit']} "
            f"({git_state['git_source']}); {len(queue)} run(s) planned, {len(done)} already finished")
    sr.write_outputs(ctx, record)
    if todo:
        sr.run_benchmarks(ctx, record, started + budget, force=args.force_bench)
    # this slice's own measurements (e.g. the packing factor from epoch_time) now count for the runs
    measured = sp.Measurements.load(root)
    own = sp.Measurements.load(ctx.stage)
    estimator = sp.Estimator(plan, kind, sp.Measurements(own.runs + measured.runs,
                                                         own.pack_factors + measured.pack_factors), root)
    record["_factor"] = estimator.pack_factor
    for planned in list(queue):  # finished on this machine by an earlier slice: stage without training
        if sp.is_finished(planned.run, ctx.workdir, root):
            sr.stage_run(ctx, ctx.workdir / planned.run.folder, planned.run)
            record["runs"].append({"run": planned.key, "status": "finished", "start_s": round(ctx.elapsed(), 1),
                                   "end_s": round(ctx.elapsed(), 1), "epochs": planned.epochs,
                                   "epochs_done": planned.epochs, "estimate_s": 0.0,
                                   "reason": "finished earlier on this machine", "estimate_from": "-"})
            queue.remove(planned)
    t_runs = ctx.elapsed()
    lines = sp.schedule(queue, estimator, t_runs, stop, int(plan.pack), float(plan.fit_margin),
                        bool(plan.probe), 2 * float(plan.startup_s))
    record["plan"] = [{"run": ln.run.key, "start_s": round(ln.start, 1), "end_s": round(ln.end, 1),
                       "probe": ln.probe, "estimate_from": ln.estimate.source} for ln in lines if ln.start is not None]
    ctx.log("plan for the runs:\n" + sp.format_plan(lines, f"from {t_runs / 60:.1f} to {stop / 60:.1f} min"))
    kwargs = {"command_for": command_for} if command_for else {}
    sr.run_proxies(ctx, record, queue, estimator, started + stop, **kwargs)
    sr.write_outputs(ctx, record)
    finished = sum(r["status"] == "finished" for r in record["runs"])
    ctx.log(f"done: {finished} run(s) finished; {ctx.archive.name}, summary.md and slice.log in {out}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["prepare-carry"]:
            return slice_io.prepare_carry(argv[1:])
        if argv[:1] == ["merge"]:
            return slice_io.merge(argv[1:])
        if argv[:1] == ["results-md"]:
            slice_io.write_results_md()
            print(f"{slice_io.RESULTS_MD}: measured section rebuilt")
            return 0
        return run(parse_args(argv))
    except ReproError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
