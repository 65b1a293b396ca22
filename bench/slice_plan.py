"""Planning for `python -m bench.slice`: which proxy runs a GPU slice trains, in what order, and which fit.

The priority list is `bench/slice_plan.yaml`: comparisons (paper, experiment, methods) in the order their claims
matter, expanded seed by seed, so one seed of every arm of every comparison comes before a second seed of any.
Runs already finished in the checkout (metrics.json whose provenance carries the grid's config hash) are dropped.

Time per run = start-up + epochs x seconds per epoch x packing factor. Seconds per epoch come, best first, from
a slice's measurement of the same (paper, experiment, method) on the same device kind, then on another GPU
kind, then from the plan's priors (guesses, labelled so, used until a slice has measured the config). A
packing factor f(k) >= 1 says how much slower each of k runs sharing one GPU goes than a run alone.

One simulator serves the dry run and the live scheduler: runs in their start-up phase go at wall speed, runs in
their epoch phase share the GPU (each at 1 / f(k)); a run is admitted only if it, and every run already going,
still ends before the deadline.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common import workflow as grid
from common.errors import ReproError

REPO = Path(__file__).resolve().parents[1]
PLAN_FILE = REPO / "bench" / "slice_plan.yaml"
SLICES_DIR = "bench/slices"  # committed: one folder per slice (its benchmark JSON, measurements and record)
PLAN_KEYS = {"scale", "pack", "probe", "allow_cpu_experiments", "bench_share", "reserve_s", "fit_margin", "kill_grace_s", "startup_s",
             "pack_factor_prior", "prior_s_per_epoch", "method_cost_prior", "comparisons", "seeds", "benchmarks"}
KNOWN_KINDS = ("h200", "h100", "a100", "a10g", "l40s", "l40", "l4", "v100", "t4")


# ---------------------------------------------------------------------------------------------- plan file
@dataclass(frozen=True)
class PlannedRun:
    """One grid entry the slice may train, with its place in the priority order."""

    run: grid.Run
    epochs: int
    priority: int

    @property
    def key(self) -> str:
        r = self.run
        return f"{r.paper}/{r.experiment}/{r.method}/seed{r.seed}"


@dataclass
class Plan:
    raw: dict
    path: Path

    def __getattr__(self, name):
        try:
            return self.raw[name]
        except KeyError:
            raise AttributeError(name) from None


def load_plan(path: str | Path = PLAN_FILE) -> Plan:
    """Read and check a slice plan (unknown keys are errors naming the closest valid one)."""
    from common.errors import closest

    path = Path(path)
    if not path.is_file():
        raise ReproError(f"slice plan {path} does not exist; pass --plan bench/slice_plan.yaml.")
    raw = yaml.safe_load(path.read_text()) or {}
    for key in raw:
        if key not in PLAN_KEYS:
            raise ReproError(f"unknown key {key!r} in {path}.{closest(key, PLAN_KEYS)} Valid: {', '.join(sorted(PLAN_KEYS))}.")
    defaults = {"scale": "proxy", "pack": 4, "probe": True, "allow_cpu_experiments": False, "bench_share": 0.33, "reserve_s": 25.0, "fit_margin": 1.15,
                "kill_grace_s": 10.0, "startup_s": 45.0, "pack_factor_prior": {1: 1.0},
                "prior_s_per_epoch": {}, "method_cost_prior": {}, "comparisons": [], "seeds": None,
                "benchmarks": []}
    raw = {**defaults, **raw}
    if int(raw["pack"]) < 1:
        raise ReproError(f"pack in {path} must be >= 1 (runs sharing the GPU), got {raw['pack']}.")
    if not 0 <= float(raw["bench_share"]) < 1:
        raise ReproError(f"bench_share in {path} must lie in [0, 1), got {raw['bench_share']}.")
    raw["pack_factor_prior"] = {int(k): float(v) for k, v in raw["pack_factor_prior"].items()}
    return Plan(raw, path)


def expand(plan: Plan, root: Path = REPO) -> list[PlannedRun]:
    """The plan's runs in priority order: seed by seed, each seed through every comparison and every arm.

    Raises ReproError for an entry the workflow's grid does not hold (the slice's results would never be
    picked up), or for an experiment that asks no GPU."""
    scale = plan.scale
    per_seed: dict[int, list[tuple[grid.Run, int]]] = {}
    seen = set()
    for index, comp in enumerate(plan.comparisons):
        where = f"comparison {index + 1} of {plan.path}"
        missing = {"paper", "experiment", "methods"} - set(comp)
        if missing:
            raise ReproError(f"{where} lacks {', '.join(sorted(missing))}: write it as "
                             "{paper: P, experiment: E, methods: [M1, M2]}.")
        paper, experiment = comp["paper"], comp["experiment"]
        if not grid.config_path(paper, scale, experiment, root).is_file():
            known = [f"{p}/{e}" for p in grid.papers(root) for e in grid.experiments(p, scale, root)]
            from common.errors import closest

            raise ReproError(f"{where}: no {scale} experiment {paper}/{experiment}.{closest(f'{paper}/{experiment}', known)}")
        exp = grid.load_experiment(paper, scale, experiment, root)
        gpus = grid.resources(paper, scale, experiment, root)["gpus"]
        if gpus != 1 and not plan.raw.get("allow_cpu_experiments"):
            raise ReproError(f"{where}: {paper}/{experiment} asks {gpus} GPUs (resources.gpus); a slice trains "
                             "one-GPU experiments (one process each, so the config hash is the workflow's). "
                             + ("Train it with the workflow on a CPU instead." if gpus == 0 else
                                "Train it with the workflow's local-gpu or slurm profile."))
        arms = list(comp["methods"])
        bad = [m for m in arms if m not in (exp.get("methods") or {})]
        if bad:
            raise ReproError(f"{where}: method(s) {', '.join(bad)} not in {paper}/{experiment}'s methods "
                             f"({', '.join(exp.get('methods') or {})}).")
        config_seeds = [int(s) for s in exp.get("seeds", [0])]
        seeds = [int(s) for s in comp.get("seeds", plan.seeds if plan.seeds is not None else config_seeds)]
        outside = [s for s in seeds if s not in config_seeds]
        if outside:
            raise ReproError(f"{where}: seed(s) {outside} are not in {paper}/{experiment}'s seeds {config_seeds}; "
                             "the workflow would never read those runs.")
        epochs = int((exp.get("train") or {}).get("epochs", 200))
        for seed in seeds:
            for method in arms:
                run = grid.Run(paper, scale, experiment, method, seed)
                if run not in seen:
                    seen.add(run)
                    per_seed.setdefault(seed, []).append((run, epochs))
    ordered = [item for seed in sorted(per_seed) for item in per_seed[seed]]
    return [PlannedRun(run, epochs, i) for i, (run, epochs) in enumerate(ordered)]


def finished_hash(folder: Path) -> str | None:
    """Config hash of a finished run folder (metrics.json present), else None."""
    if not (folder / "metrics.json").is_file():
        return None
    try:
        return json.loads((folder / "provenance.json").read_text()).get("config_hash")
    except (OSError, ValueError):
        return None


def is_finished(run: grid.Run, results_root: Path, root: Path = REPO) -> bool:
    """True if `results_root/<run folder>` holds this run finished with the grid's current config hash."""
    done = finished_hash(results_root / run.folder)
    return done is not None and done == grid.run_config_hash(run.paper, run.scale, run.experiment, run.method,
                                                             run.seed, root)


# -------------------------------------------------------------------------------------------- estimates
def device_kind(name: str) -> str:
    """A short kind for a device name: 'NVIDIA H100 80GB HBM3' -> 'h100'; CPUs -> 'cpu'."""
    low = name.lower()
    if low.startswith("cpu"):
        return "cpu"
    for kind in KNOWN_KINDS:
        if re.search(rf"(^|[^a-z0-9]){kind}([^a-z0-9]|$)", low):
            return kind
    return re.sub(r"[^a-z0-9]+", "-", low).strip("-") or "unknown"


@dataclass
class Estimate:
    """Seconds a run needs: `startup_s` at wall speed, then `s_per_epoch` (one run alone on the device) per epoch."""

    startup_s: float
    s_per_epoch: float
    source: str

    def work(self, epochs_left: int) -> float:
        return epochs_left * self.s_per_epoch


@dataclass
class Measurements:
    """Every slice's measurements, read from `bench/slices/*/estimates.json` (newest first per key)."""

    runs: list[dict] = field(default_factory=list)  # per (paper, experiment, method, device_kind)
    pack_factors: list[dict] = field(default_factory=list)  # per (device_kind, packed)

    @classmethod
    def load(cls, root: Path = REPO) -> Measurements:
        found = cls()
        for path in sorted((root / SLICES_DIR).glob("*/estimates.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ReproError(f"{path} is not valid JSON ({exc}); restore it from git.") from None
            found.runs += data.get("runs", [])
            found.pack_factors += data.get("pack_factors", [])
        found.runs.sort(key=lambda r: r.get("date", ""), reverse=True)
        found.pack_factors.sort(key=lambda r: r.get("date", ""), reverse=True)
        return found


class Estimator:
    """Per-run time estimates and the packing factor for one device kind."""

    def __init__(self, plan: Plan, kind: str, measurements: Measurements | None = None, root: Path = REPO):
        self.plan, self.kind, self.root = plan, kind, root
        self.measured = measurements or Measurements()
        self.live: dict[str, dict] = {}  # this slice's runs, measured while they train (newest first)

    def add_live(self, key: str, row: dict) -> None:
        """A measurement of a run still training (or just stopped): it counts at once for the runs waiting."""
        self.live.pop(key, None)
        self.live = {key: row, **self.live}

    def pack_factor(self, k: float) -> float:
        """Slow-down of each of k runs sharing the device, interpolated linearly between known points."""
        if k <= 1:
            return 1.0
        points = dict(self.plan.pack_factor_prior)
        for row in reversed(self.measured.pack_factors):  # oldest first, so the newest measurement wins
            if row["device_kind"] == self.kind:
                points[int(row["packed"])] = float(row["factor"])
        points[1] = 1.0
        xs = sorted(points)
        if k >= xs[-1]:  # beyond the last point: extend the last segment's slope
            if len(xs) == 1:
                return float(k)
            x0, x1 = xs[-2], xs[-1]
            slope = (points[x1] - points[x0]) / (x1 - x0)
            return points[x1] + slope * (k - x1)
        for x0, x1 in itertools.pairwise(xs):
            if x0 <= k <= x1:
                return points[x0] + (points[x1] - points[x0]) * (k - x0) / (x1 - x0)
        return 1.0  # not reached

    def cost(self, method: str) -> float:
        return float(self.plan.method_cost_prior.get(method, 1.0))

    def estimate(self, run: grid.Run) -> Estimate:
        """Best available estimate, in this order: measured for this method on this kind; measured for another
        method of the experiment on this kind, scaled by the plan's method costs; measured for this method on
        another GPU kind; the plan's prior (a guess) times the method's cost."""
        rows = [r for r in [*self.live.values(), *self.measured.runs]
                if (r["paper"], r["experiment"], r.get("scale", "proxy")) == (run.paper, run.experiment, run.scale)]
        here = [r for r in rows if r["device_kind"] == self.kind]
        exact = [r for r in here if r["method"] == run.method]
        other_gpu = [r for r in rows if r["method"] == run.method and r["device_kind"] not in ("cpu", self.kind)]
        if exact:
            row, scale, label = exact[0], 1.0, "measured"
        elif here:
            row = here[0]
            scale = self.cost(run.method) / self.cost(row["method"])
            label = f"measured for {row['method']} x method cost {scale:.2g}"
        elif other_gpu:
            row, scale, label = other_gpu[0], 1.0, f"measured on {other_gpu[0]['device_kind']}"
        else:
            priors = self.plan.prior_s_per_epoch
            name = f"{run.paper}/{run.experiment}"
            if name not in priors:
                raise ReproError(f"no measurement and no prior for {name} on {self.kind}: add "
                                 f"'{name}: <seconds per epoch>' under prior_s_per_epoch in {self.plan.path}.")
            return Estimate(float(self.plan.startup_s), float(priors[name]) * self.cost(run.method), "prior (guess)")
        startup = row.get("startup_s")
        return Estimate(float(self.plan.startup_s if startup is None else startup),
                        float(row["s_per_epoch_alone"]) * scale, f"{label} (slice {row.get('slice', '?')})")


# ------------------------------------------------------------------------------------------- simulation
@dataclass
class Job:
    """A run in the simulator: start-up wall seconds left, then epoch work left (seconds alone on the device)."""

    key: str
    startup_left: float
    work_left: float
    must_end: bool = True  # False for a probe: it runs to the deadline by design

    def copy(self) -> Job:
        return Job(self.key, self.startup_left, self.work_left, self.must_end)


def simulate(now: float, jobs: list[Job], factor) -> dict[str, float]:
    """End time of every job if nothing else starts; jobs in their epoch phase share the device."""
    jobs = [j.copy() for j in jobs]
    ends: dict[str, float] = {}
    t = now
    for _ in range(10 * len(jobs) + 10):
        live = [j for j in jobs if j.key not in ends]
        if not live:
            break
        working = [j for j in live if j.startup_left <= 0]
        f = factor(len(working)) if working else 1.0
        steps = [j.startup_left for j in live if j.startup_left > 0] + [j.work_left * f for j in working]
        dt = max(0.0, min(steps))
        t += dt
        for j in live:
            if j.startup_left > 0:
                j.startup_left -= dt
                if j.startup_left <= 1e-9:
                    j.startup_left = 0.0
                    if j.work_left <= 1e-9:
                        ends[j.key] = t
            else:
                j.work_left -= dt / f
                if j.work_left <= 1e-9:
                    ends[j.key] = t
    return ends


def fits(now: float, running: list[Job], candidate: Job, stop: float, factor, margin: float) -> bool:
    """True if `candidate` (its time scaled by `margin`) and every running job that must end all end by `stop`
    together (probes share the device but may run past it)."""
    padded = Job(candidate.key, candidate.startup_left * margin, candidate.work_left * margin)
    jobs = [*running, padded]
    ends = simulate(now, jobs, factor)
    return all(ends.get(j.key, float("inf")) <= stop + 1e-6 for j in jobs if j.must_end)


def probes(waiting: list, estimate_of, pack: int) -> list:
    """Runs to start as probes when nothing fits and the device is idle: the highest-priority run of each experiment
    that has no measurement yet (its prior may be wrong either way), at most `pack`. A probe trains until it ends
    or the deadline stops it; its epochs give the next plan a measured time."""
    chosen, experiments = [], set()
    for item in waiting:
        planned = item.run if isinstance(item, Planned) else item
        exp = (planned.run.paper, planned.run.experiment)
        if exp in experiments or not estimate_of(item).source.startswith("prior"):
            continue
        experiments.add(exp)
        chosen.append(item)
        if len(chosen) == pack:
            break
    return chosen


@dataclass
class Planned:
    """One line of a plan: the run, its estimate, and its simulated start and end (seconds from the slice start)."""

    run: PlannedRun
    estimate: Estimate
    start: float | None = None
    end: float | None = None
    probe: bool = False


def schedule(runs: list[PlannedRun], estimator: Estimator, start: float, stop: float, pack: int,
             margin: float, probe: bool = False, min_probe_s: float = 120.0) -> list[Planned]:
    """Simulate the live policy from `start` to `stop`: every time a slot is free, start the first run in priority
    order that fits; with `probe`, when nothing fits and nothing runs, start probes (`probes`) that run to `stop`.
    Returns every run, with start/end set for those that would run."""
    lines = [Planned(r, estimator.estimate(r.run)) for r in runs]
    waiting = list(lines)
    active: dict[str, tuple[Planned, Job]] = {}
    now = start
    for _ in range(4 * len(lines) + 4):
        admitted = True
        while admitted and len(active) < pack:
            admitted = False
            jobs = [job for _, job in active.values()]
            for line in waiting:
                job = Job(line.run.key, line.estimate.startup_s, line.estimate.work(line.run.epochs))
                if fits(now, jobs, job, stop, estimator.pack_factor, margin):
                    line.start = now
                    active[job.key] = (line, job)
                    waiting.remove(line)
                    admitted = True
                    break
        if not active:
            if probe and waiting and stop - now >= min_probe_s:
                for line in probes(waiting, lambda ln: ln.estimate, pack):
                    line.start, line.end, line.probe = now, stop, True
                    waiting.remove(line)
            break
        ends = simulate(now, [job for _, job in active.values()], estimator.pack_factor)
        first_key = min(ends, key=ends.get)
        t_next = ends[first_key]
        # advance every active job to t_next
        _advance(active, now, t_next, estimator.pack_factor)
        line, _ = active.pop(first_key)
        line.end = t_next
        now = t_next
    return lines


def _advance(active: dict, now: float, until: float, factor) -> None:
    """Move the jobs in `active` forward from `now` to `until` (no job ends strictly inside the interval)."""
    t = now
    while t < until - 1e-9:
        jobs = [job for _, job in active.values()]
        working = [j for j in jobs if j.startup_left <= 0 and j.work_left > 1e-9]
        f = factor(len(working)) if working else 1.0
        starting = [j.startup_left for j in jobs if j.startup_left > 0]
        dt = min([until - t, *starting])
        for j in jobs:
            if j.startup_left > 0:
                j.startup_left = max(0.0, j.startup_left - dt)
            elif j.work_left > 0:
                j.work_left = max(0.0, j.work_left - dt / f)
        t += dt


def format_plan(lines: list[Planned], header: str) -> str:
    """The dry-run table: what would run, when, estimated minutes each, and the total."""
    out = [header, "", f"{'start':>6} {'end':>6} {'est min':>7}  {'run':<58} estimate from",
           f"{'-' * 6} {'-' * 6} {'-' * 7}  {'-' * 58} {'-' * 24}"]
    chosen = sorted((ln for ln in lines if ln.start is not None), key=lambda ln: (ln.start, ln.run.priority))
    for ln in chosen:
        note = "; PROBE: no measurement yet, trains until stopped at the deadline" if ln.probe else ""
        out.append(f"{ln.start / 60:>6.1f} {ln.end / 60:>6.1f} {(ln.end - ln.start) / 60:>7.1f}  {ln.run.key:<58} "
                   f"{ln.estimate.source}{note}")
    left = [ln for ln in lines if ln.start is None]
    total = sum((ln.end - ln.start) for ln in chosen)
    n_probe = sum(ln.probe for ln in chosen)
    out.append("")
    out.append(f"total: {len(chosen) - n_probe} run(s) expected to finish"
               + (f" and {n_probe} probe(s)" if n_probe else "") + f", {total / 60:.1f} run-minutes, last ends at "
               f"{max((ln.end for ln in chosen), default=0) / 60:.1f} min")
    if left:
        out.append(f"not started (does not fit the time left): {len(left)} run(s), first "
                   + ", ".join(f"{ln.run.key} (~{(ln.estimate.startup_s + ln.estimate.work(ln.run.epochs)) / 60:.0f} min alone)"
                               for ln in left[:4]))
    return "\n".join(out)
