"""Execution of one GPU slice: the unmeasured benchmarks, then proxy runs packed on the device, within a deadline.

Everything a slice produces is staged in the repository layout under `<workdir>/stage-<id>/` and packed after
every finished benchmark or run into ONE archive in the output folder (`$OUT`), beside `summary.md` and
`slice.log`: the device tool brings back at most 8 files, two folders deep, so a tree cannot come back, and a
command killed by the tool's limit still returns what had finished. Checkpoints stay in the work folder (a
later slice on the same machine resumes them) and never enter the archive.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import slice_plan as sp
from common import workflow as grid
from common.errors import ReproError

RUN_FILES = ("metrics.json", "log.jsonl", "config.yaml", "provenance.json")  # evidence; never checkpoint/


@dataclass
class SliceContext:
    """Where a slice writes, what it runs on, and its clock (injectable for tests)."""

    root: Path
    out: Path
    workdir: Path
    slice_id: str
    plan: sp.Plan
    device: str
    kind: str
    git: dict  # git_commit, git_dirty, git_source
    date: str
    started: float  # clock() at the start of the slice
    deadline: float  # clock() by which the command returns
    clock: object = time.monotonic
    sleep: object = time.sleep
    poll_s: float = 2.0
    env: dict = field(default_factory=dict)  # extra environment for child processes

    @property
    def stage(self) -> Path:
        return self.workdir / f"stage-{self.slice_id}"

    @property
    def record_dir(self) -> Path:
        return self.stage / sp.SLICES_DIR / self.slice_id

    @property
    def archive(self) -> Path:
        return self.out / f"slice-{self.slice_id}.tar.gz"

    def elapsed(self) -> float:
        return self.clock() - self.started

    def log(self, message: str) -> None:
        line = f"[slice {self.elapsed() / 60:5.2f} min] {message}"
        print(line, flush=True)
        with open(self.out / "slice.log", "a") as fh:
            fh.write(line + "\n")

    def child_env(self) -> dict:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        # children run from the repository root: make `common`, `papers`, `bench` importable without an install
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.root), env.get("PYTHONPATH", "")) if p)
        if env.get("REPRO_DATA_DIR"):
            env["REPRO_DATA_DIR"] = str(Path(env["REPRO_DATA_DIR"]).resolve())
        return env


# ------------------------------------------------------------------------------------------ processes
def start(command: list[str], cwd: Path, env: dict, log_path: Path) -> subprocess.Popen:
    """Start a child in its own process group (so a kill reaches its data-loader workers too)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as fh:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGINT each process group (the trainer exits and keeps its last checkpoint), SIGKILL what is left."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        try:
            os.killpg(p.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    end = time.monotonic() + grace_s
    for p in live:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in live:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def log_tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------- benchmarks
def measured_benchmarks(root: Path, kind: str) -> dict[str, str]:
    """Benchmarks some committed slice already measured on this device kind: name -> slice id."""
    done = {}
    for record in sorted((root / sp.SLICES_DIR).glob("*/slice.json")):
        data = json.loads(record.read_text())
        if data.get("device_kind") != kind:
            continue
        for bench in data.get("benchmarks", []):
            if bench.get("status") == "ok":
                done.setdefault(bench["name"], data.get("slice", record.parent.name))
    return done


def run_benchmarks(ctx: SliceContext, record: dict, stop_at: float, force: bool = False) -> None:
    """Run each benchmark of the plan not yet measured on this kind, each within its cap and the bench budget."""
    done = {} if force else measured_benchmarks(ctx.root, ctx.kind)
    ctx.record_dir.mkdir(parents=True, exist_ok=True)
    for bench in ctx.plan.benchmarks:
        name, cap = bench["name"], float(bench.get("cap_s", 60))
        entry = {"name": name, "json": f"{name}.json"}
        record["benchmarks"].append(entry)
        if name in done:
            entry.update(status="skipped", reason=f"measured on {ctx.kind} in slice {done[name]}")
            ctx.log(f"benchmark {name}: skipped, {entry['reason']}")
            continue
        limit = min(cap, stop_at - ctx.clock())
        if limit < float(bench.get("min_s", 15)):
            entry.update(status="skipped", reason=f"no time left in the benchmark budget ({limit:.0f} s)")
            ctx.log(f"benchmark {name}: skipped, {entry['reason']}")
            continue
        out_json = ctx.record_dir / f"{name}.json"
        command = [sys.executable, *[str(a) for a in bench["args"]], "--out", str(out_json)]
        ctx.log(f"benchmark {name}: {' '.join(command[1:])} (at most {limit:.0f} s)")
        log_path = ctx.workdir / "logs" / f"bench-{name}.log"
        t0 = ctx.clock()
        proc = start(command, ctx.root, ctx.child_env(), log_path)
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            stop([proc], ctx.plan.kill_grace_s)
        entry["seconds"] = round(ctx.clock() - t0, 1)
        if proc.returncode == 0 and out_json.is_file():
            entry["status"] = "ok"
        elif out_json.is_file():  # stopped, but wrote what it had measured (bench.slice_bench writes as it goes)
            entry.update(status="partial", reason=f"stopped after {limit:.0f} s", log_tail=log_tail(log_path, 600))
        else:
            why = f"stopped after {limit:.0f} s" if proc.returncode in (-2, -9, 130) else f"exit {proc.returncode}"
            entry.update(status="failed", reason=why, log_tail=log_tail(log_path, 1200))
        ctx.log(f"benchmark {name}: {entry['status']} in {entry['seconds']} s" +
                (f" ({entry['reason']})" if "reason" in entry else "") +
                (f"; the end of its log:\n{log_tail(log_path, 800)}" if entry["status"] == "failed" else ""))
        write_outputs(ctx, record)


def pack_factors_from_epoch_time(ctx: SliceContext) -> tuple[list[dict], list[dict]]:
    """Packing factors and alone-per-epoch times from this slice's epoch_time benchmark, if it ran."""
    path = ctx.record_dir / "epoch_time.json"
    if not path.is_file():
        return [], []
    rows = [r for r in json.loads(path.read_text()).get("rows", []) if r.get("fast_path", True)]
    stamp = {"device_kind": ctx.kind, "device": ctx.device, "slice": ctx.slice_id, "date": ctx.date,
             "commit": ctx.git["git_commit"]}
    factors, runs = [], []
    by_config: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_config.setdefault(r["config"], {})[int(r["packed"])] = r
    for config, packs in by_config.items():
        if 1 not in packs:
            continue
        alone = packs[1]["s_per_epoch"]
        for k, r in sorted(packs.items()):
            if k > 1:
                factors.append({**stamp, "packed": k, "factor": round(r["s_per_epoch"] / alone, 4), "config": config,
                                "from": "epoch_time bench"})
        if packs[1].get("overrides"):  # a changed config (the CPU test's narrow net) times no grid experiment
            continue
        parts = Path(config).parts  # papers/<paper>/configs/<scale>/<experiment>.yaml
        runs.append({**stamp, "paper": parts[1], "scale": parts[3], "experiment": Path(config).stem,
                     "method": packs[1]["method"], "s_per_epoch_alone": round(alone, 4), "startup_s": None,
                     "from": "epoch_time bench (training loop only, no evaluation)"})
    return factors, runs


# --------------------------------------------------------------------------------------------- runs
@dataclass
class Active:
    planned: sp.PlannedRun
    estimate: sp.Estimate
    proc: subprocess.Popen
    folder: Path
    log_path: Path
    launched: float
    epochs_before: int  # epochs a resumed checkpoint already held
    seen: dict = field(default_factory=dict)  # epoch -> clock time its log line was first seen
    packed: list = field(default_factory=list)  # (clock time, runs alive) at each poll
    entry: dict = field(default_factory=dict)
    probe: bool = False  # started though it did not fit, to measure its epochs (no plan had a measurement)

    def read_log(self, now: float, alive: int) -> None:
        self.packed.append((now, alive))
        try:
            lines = (self.folder / "log.jsonl").read_text().splitlines()
        except OSError:
            return
        for line in lines:
            try:
                epoch = int(json.loads(line)["epoch"])
            except (ValueError, KeyError, TypeError):
                continue  # a line being written
            if epoch > self.epochs_before and epoch not in self.seen:
                self.seen[epoch] = now

    @property
    def epochs_done(self) -> int:
        return max(self.seen, default=self.epochs_before)

    def measured(self, factor) -> dict | None:
        """Wall seconds per epoch between the first and last epoch seen, and the same normalised to one run alone."""
        if len(self.seen) < 2:
            return None
        e0, e1 = min(self.seen), max(self.seen)
        t0, t1 = self.seen[e0], self.seen[e1]
        if t1 <= t0:
            return None
        wall = (t1 - t0) / (e1 - e0)
        ks = [k for t, k in self.packed if t0 <= t <= t1] or [k for _, k in self.packed[-1:]]
        mean_k = statistics.fmean(ks)
        return {"s_per_epoch_wall": wall, "mean_packed": mean_k, "s_per_epoch_alone": wall / factor(mean_k),
                "startup_s": max(0.0, t0 - self.launched - wall), "epochs_seen": e1 - self.epochs_before}

    def job(self, now: float, factor, alive: int) -> sp.Job:
        left = self.planned.epochs - self.epochs_done
        m = self.measured(factor)
        if m is None:
            startup_left = max(0.0, self.estimate.startup_s - (now - self.launched)) if not self.seen else 0.0
            return sp.Job(self.planned.key, startup_left, left * self.estimate.s_per_epoch, not self.probe)
        since = (now - self.seen[max(self.seen)]) / factor(alive)  # progress inside the current epoch
        work = max(0.1 * m["s_per_epoch_alone"], left * m["s_per_epoch_alone"] - since) if left else 0.0
        return sp.Job(self.planned.key, 0.0, work, not self.probe)


def train_command(run: grid.Run, folder: Path, root: Path) -> list[str]:
    """What the workflow's train rule runs for this grid entry (same config file, method label, seed, no
    other override), so the resolved config and its hash are the workflow's; only the output folder differs."""
    config = grid.config_path(run.paper, run.scale, run.experiment, root).relative_to(root)
    return [sys.executable, "-m", "common.train", "--config", str(config), "--method", run.method,
            "--output", str(folder), "--on-config-change", "restart", f"seed={run.seed}"]


def count_epochs(folder: Path) -> int:
    """Epochs a resumable run folder already holds (0 without a checkpoint)."""
    if not (folder / "checkpoint" / "last.pt").is_file() or not (folder / "log.jsonl").is_file():
        return 0
    return sum(1 for line in (folder / "log.jsonl").read_text().splitlines() if line.strip())


def run_proxies(ctx: SliceContext, record: dict, queue: list[sp.PlannedRun], estimator: sp.Estimator,
                stop_at: float, command_for=train_command) -> None:
    """Train runs from `queue` (priority order), at most plan.pack at once, each started only if it and the runs
    already going all fit before `stop_at`; a run whose measured epochs say it cannot finish is stopped early,
    and everything still going at `stop_at` is stopped (checkpoints kept in the work folder)."""
    pack, margin, grace = int(ctx.plan.pack), float(ctx.plan.fit_margin), float(ctx.plan.kill_grace_s)
    factor = estimator.pack_factor
    waiting = list(queue)
    active: list[Active] = []
    estimates = {p.key: estimator.estimate(p.run) for p in waiting}
    while True:
        now = ctx.clock()
        for a in active:
            a.read_log(now, len(active))
            m = a.measured(factor)
            if m:  # the run's own epochs now time every waiting run of its experiment
                r = a.planned.run
                estimator.add_live(a.planned.key, {
                    "paper": r.paper, "experiment": r.experiment, "scale": r.scale, "method": r.method,
                    "device_kind": ctx.kind, "s_per_epoch_alone": m["s_per_epoch_alone"],
                    "startup_s": m["startup_s"], "slice": ctx.slice_id})
                estimates = {p.key: estimator.estimate(p.run) for p in waiting}
        for a in [a for a in active if a.proc.poll() is not None]:
            active.remove(a)
            finish(ctx, record, a, now)
        if now >= stop_at:
            if active:
                ctx.log(f"deadline: stopping {len(active)} run(s); their checkpoints stay in {ctx.workdir}")
                stop([a.proc for a in active], grace)
                for a in active:
                    a.read_log(ctx.clock(), len(active))
                    close(ctx, record, a, "probe: measured its epochs, stopped at the deadline" if a.probe
                          else "stopped at the deadline", "killed_deadline")
            break
        # early stop: a run whose own epochs project past the deadline (lowest priority first, one per poll)
        jobs = [a.job(now, factor, len(active)) for a in active]
        ends = sp.simulate(now, jobs, factor)
        late = [a for a in active if not a.probe and a.measured(factor) and ends.get(a.planned.key, now) > stop_at]
        if late:
            victim = max(late, key=lambda a: a.planned.priority)
            ctx.log(f"{victim.planned.key}: its measured epochs project an end {(ends[victim.planned.key] - ctx.started) / 60:.2f}"
                    f" min into the slice, past the deadline at {(stop_at - ctx.started) / 60:.2f} min: stopping it")
            stop([victim.proc], grace)
            active.remove(victim)
            victim.read_log(ctx.clock(), len(active) + 1)
            close(ctx, record, victim, "could not finish before the deadline (measured epochs)", "killed_projection")
            continue
        # admit: first run in priority order that fits together with the ones going
        started_one = False
        if len(active) < pack:
            jobs = [a.job(now, factor, len(active)) for a in active]
            for planned in list(waiting):
                est = estimates[planned.key]
                folder = ctx.workdir / planned.run.folder
                before = count_epochs(folder)
                cand = sp.Job(planned.key, est.startup_s, est.work(planned.epochs - before))
                if sp.fits(now, jobs, cand, stop_at, factor, margin):
                    waiting.remove(planned)
                    active.append(launch(ctx, record, planned, est, folder, before, command_for))
                    started_one = True
                    break
        min_probe = 2 * float(ctx.plan.startup_s)
        if not active and not started_one and ctx.plan.probe and waiting and stop_at - now >= min_probe:
            chosen = sp.probes(waiting, estimates_of(estimates), pack)
            if chosen:
                ctx.log(f"nothing fits the {(stop_at - now) / 60:.1f} min left; {len(chosen)} probe(s) of experiments "
                        "without a measurement train until the deadline, so the next plan knows their time")
            for planned in chosen:
                waiting.remove(planned)
                folder = ctx.workdir / planned.run.folder
                a = launch(ctx, record, planned, estimates[planned.key], folder, count_epochs(folder), command_for)
                a.probe = a.entry["probe"] = True
                active.append(a)
                started_one = True
        if not active and not started_one:
            left = len(waiting)
            ctx.log(f"no run going and none of the {left} left fits the {(stop_at - now) / 60:.1f} min that remain"
                    if left else "every planned run is done")
            break
        if not started_one:
            ctx.sleep(ctx.poll_s)
    for planned in waiting:
        est = estimates[planned.key]
        record["runs"].append({"run": planned.key, "status": "not_started", "estimate_s": round(
            est.startup_s + est.work(planned.epochs), 1), "estimate_from": est.source})


def estimates_of(estimates: dict):
    return lambda planned: estimates[planned.key]


def launch(ctx, record, planned, est, folder, before, command_for) -> Active:
    command = command_for(planned.run, folder.relative_to(ctx.root) if folder.is_relative_to(ctx.root) else folder,
                          ctx.root)
    log_path = ctx.workdir / "logs" / (planned.key.replace("/", "__") + ".log")
    resumed = f", resuming at epoch {before}" if before else ""
    est_s = est.startup_s + est.work(planned.epochs - before)
    ctx.log(f"start {planned.key} ({planned.epochs} epochs{resumed}; estimate {est_s / 60:.1f} min alone, "
            f"{est.source})")
    proc = start(command, ctx.root, ctx.child_env(), log_path)
    entry = {"run": planned.key, "status": "running", "start_s": round(ctx.elapsed(), 1),
             "epochs": planned.epochs, "epochs_before": before, "estimate_s": round(est_s, 1),
             "estimate_from": est.source, "command": " ".join(command[1:])}
    record["runs"].append(entry)
    return Active(planned, est, proc, folder, log_path, ctx.clock(), before, entry=entry)


def finish(ctx: SliceContext, record: dict, a: Active, now: float) -> None:
    """A run's process ended on its own: stage it if it finished with the grid's config hash."""
    run = a.planned.run
    done = sp.finished_hash(a.folder)
    want = grid.run_config_hash(run.paper, run.scale, run.experiment, run.method, run.seed, ctx.root)
    if a.proc.returncode == 0 and done == want:
        stage_run(ctx, a.folder, run)
        close(ctx, record, a, None, "finished")
    else:
        why = (f"exit {a.proc.returncode}" if a.proc.returncode else
               f"finished with config hash {done}, not the grid's {want}")
        a.entry["log_tail"] = log_tail(a.log_path)
        ctx.log(f"{a.planned.key} failed; the end of its log:\n{log_tail(a.log_path, 800)}")
        close(ctx, record, a, why, "failed")


def close(ctx: SliceContext, record: dict, a: Active, reason: str | None, status: str) -> None:
    m = a.measured(lambda k: 1.0)  # raw wall numbers; normalised below with the factor in force
    a.entry.update(status=status, end_s=round(ctx.elapsed(), 1), epochs_done=a.epochs_done)
    if reason:
        a.entry["reason"] = reason
    if m:
        a.entry.update({k: round(v, 3) for k, v in m.items() if k != "s_per_epoch_alone"})
    ctx.log(f"{status.replace('_', ' ')}: {a.planned.key} after {(ctx.clock() - a.launched) / 60:.1f} min, "
            f"epoch {a.epochs_done}/{a.planned.epochs}" + (f" ({reason})" if reason else ""))
    write_outputs(ctx, record)


def stage_run(ctx: SliceContext, folder: Path, run: grid.Run) -> None:
    """Copy a finished run's evidence (never its checkpoint) into the staging tree; fill in the commit when the
    device copy had no git history (provenance says 'unknown')."""
    dest = ctx.stage / run.folder
    dest.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        shutil.copy2(folder / name, dest / name)
    prov_path = dest / "provenance.json"
    prov = json.loads(prov_path.read_text())
    if prov.get("git_commit") in (None, "unknown") and ctx.git.get("git_commit") not in (None, "unknown"):
        prov.update(git_commit=ctx.git["git_commit"], git_dirty=ctx.git["git_dirty"],
                    git_source=ctx.git["git_source"])
        prov_path.write_text(json.dumps(prov, indent=2) + "\n")


# ------------------------------------------------------------------------------------------- outputs
def measurements(ctx: SliceContext, record: dict, factor) -> dict:
    """This slice's estimates.json: per-run seconds per epoch (normalised to one run alone) and packing factors."""
    stamp = {"device_kind": ctx.kind, "device": ctx.device, "slice": ctx.slice_id, "date": ctx.date,
             "commit": ctx.git["git_commit"]}
    factors, bench_runs = pack_factors_from_epoch_time(ctx)
    runs = []  # the runs' own measurements first: for the same slice they win over the benchmark's
    for entry in record["runs"]:
        if "s_per_epoch_wall" not in entry:
            continue
        paper, experiment, method, _ = entry["run"].split("/")
        runs.append({**stamp, "paper": paper, "scale": record["scale"], "experiment": experiment, "method": method,
                     "s_per_epoch_wall": entry["s_per_epoch_wall"], "mean_packed": entry["mean_packed"],
                     "s_per_epoch_alone": round(entry["s_per_epoch_wall"] / factor(entry["mean_packed"]), 4),
                     "startup_s": entry["startup_s"], "epochs_seen": entry["epochs_seen"],
                     "finished": entry["status"] == "finished", "from": "run (wall time incl. evaluation)"})
    return {**stamp, "runs": runs + bench_runs, "pack_factors": factors}


def write_outputs(ctx: SliceContext, record: dict) -> None:
    """Write slice.json, estimates.json and summary.md into the stage and rebuild the archive in the output folder
    (atomically: a command killed mid-write still leaves the previous complete archive)."""
    ctx.record_dir.mkdir(parents=True, exist_ok=True)
    record["elapsed_s"] = round(ctx.elapsed(), 1)
    factor = record.get("_factor") or (lambda k: 1.0)
    clean = {k: v for k, v in record.items() if not k.startswith("_")}
    (ctx.record_dir / "slice.json").write_text(json.dumps(clean, indent=2) + "\n")
    (ctx.record_dir / "estimates.json").write_text(json.dumps(measurements(ctx, record, factor), indent=2) + "\n")
    summary = summary_md(clean)
    (ctx.record_dir / "summary.md").write_text(summary)
    (ctx.out / "summary.md").write_text(summary)
    tmp = ctx.out / f".slice-{ctx.slice_id}.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(ctx.stage.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(ctx.stage)))
    os.replace(tmp, ctx.archive)


def summary_md(record: dict) -> str:
    lines = [f"# GPU slice {record['slice']}", "",
             (f"device {record['device']} ({record['device_kind']}), commit {record['git_commit']}"
             f"{' (dirty)' if record.get('git_dirty') else ''} [{record.get('git_source', 'git')}], {record['date']}, "
             f"{record['minutes']} min asked, {record.get('elapsed_s', 0) / 60:.1f} min used, pack {record['pack']}"), ""]
    if record["benchmarks"]:
        lines += ["| benchmark | status | seconds | note |", "|---|---|---|---|"]
        for b in record["benchmarks"]:
            lines.append(f"| {b['name']} | {b['status']} | {b.get('seconds', '')} | {b.get('reason', '')} |")
        lines.append("")
    ran = [r for r in record["runs"] if r["status"] != "not_started"]
    if ran:
        lines += ["| run | status | epochs | minutes | est. minutes alone | s/epoch (wall, x runs packed) | note |",
                  "|---|---|---|---|---|---|---|"]
        for r in ran:
            minutes = (r.get("end_s", record.get("elapsed_s", 0)) - r["start_s"]) / 60
            spe = f"{r['s_per_epoch_wall']:.2f} (x{r['mean_packed']:.1f})" if "s_per_epoch_wall" in r else ""
            lines.append(f"| {r['run']} | {r['status']} | {r.get('epochs_done', 0)}/{r['epochs']} | {minutes:.1f} | "
                         f"{r['estimate_s'] / 60:.1f} | {spe} | {r.get('reason', '')} |")
        lines.append("")
    waiting = [r for r in record["runs"] if r["status"] == "not_started"]
    if waiting:
        lines.append(f"{len(waiting)} planned run(s) not started (did not fit), first: "
                     + ", ".join(r["run"] for r in waiting[:5]))
        lines.append("")
    lines.append("Merge into the checkout: `python -m bench.slice merge <folder or archive>`, then commit.")
    return "\n".join(lines) + "\n"


def check_out_dir(out: Path) -> None:
    """The device tool returns at most 8 files from $OUT: refuse a folder already holding other files."""
    out.mkdir(parents=True, exist_ok=True)
    others = [p.name for p in out.iterdir() if not (p.name.startswith(("slice-", ".slice-"))
                                                    or p.name in ("summary.md", "slice.log"))]
    if others:
        raise ReproError(f"output folder {out} already holds {', '.join(sorted(others)[:5])}; the device tool "
                         "brings back only 8 files from $OUT: pass an empty --out folder.")
