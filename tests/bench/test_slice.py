"""`python -m bench.slice`: planning order and fitting, packing, deadlines, the output layout, config-hash
equality with the workflow's grid, merge, carry preparation and the dry run. CPU only, tiny sizes."""

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from bench import slice as bslice
from bench import slice_io, slice_run
from bench import slice_plan as sp
from common import workflow as grid
from common.errors import ReproError

REPO = Path(__file__).resolve().parents[2]


def write_plan(path: Path, **fields) -> Path:
    plan = {"scale": "smoke", "pack": 2, "allow_cpu_experiments": True, "reserve_s": 4, "kill_grace_s": 2,
            "fit_margin": 1.0, "startup_s": 1.0, "probe": False, "benchmarks": [],
            "prior_s_per_epoch": {"cmixup/airfoil": 0.01, "mixup/cifar10_preactresnet18": 0.01},
            "comparisons": [{"paper": "cmixup", "experiment": "airfoil", "methods": ["erm"]}]}
    plan.update(fields)
    path.write_text(yaml.safe_dump(plan))
    return path


def args_for(plan: Path, tmp_path: Path, *extra: str):
    return bslice.parse_args(["--plan", str(plan), "--out", str(tmp_path / "out"), "--workdir",
                              str(tmp_path / "work"), "--allow-cpu", *extra])


# ------------------------------------------------------------------------------------------------- plan
def test_committed_plan_expands_seed_by_seed_over_the_proxy_grid():
    plan = sp.load_plan()
    runs = sp.expand(plan)
    proxy = {r for paper in grid.papers() for r in grid.runs(paper, "proxy")}
    assert runs and all(p.run in proxy for p in runs)  # every planned run is a grid entry the workflow reads
    assert [p.priority for p in runs] == list(range(len(runs)))
    seeds = [p.run.seed for p in runs]
    assert seeds == sorted(seeds)  # no second seed of any arm before the first seed of every arm
    arms = [(c["paper"], c["experiment"], m) for c in plan.comparisons for m in c["methods"]]
    assert [(p.run.paper, p.run.experiment, p.run.method) for p in runs[:len(arms)]] == arms
    for p in runs:  # every planned experiment has a prior, so a first slice can plan it
        assert f"{p.run.paper}/{p.run.experiment}" in plan.prior_s_per_epoch
        assert p.epochs == grid.load_experiment(p.run.paper, "proxy", p.run.experiment)["train"]["epochs"]


@pytest.mark.parametrize("comparison, message", [
    ({"paper": "mixup", "experiment": "cifar10_preactresnet18", "methods": ["mixupp"]}, "mixupp"),
    ({"paper": "cmixup", "experiment": "airfoil", "methods": ["erm"]}, "asks 0 GPUs"),
    ({"paper": "mixup", "experiment": "cifar10_preactresnt18", "methods": ["erm"]}, "cifar10_preactresnet18"),
    ({"paper": "mixup", "experiment": "cifar10_preactresnet18", "methods": ["erm"], "seeds": [7]}, "seed(s) [7]"),
])
def test_plan_entries_outside_the_grid_are_refused(tmp_path, comparison, message):
    plan = write_plan(tmp_path / "p.yaml", scale="proxy", allow_cpu_experiments=False, comparisons=[comparison])
    with pytest.raises(ReproError, match=re.escape(message)):
        sp.expand(sp.load_plan(plan))


def test_unknown_plan_key_names_the_closest(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("pakc: 4\n")
    with pytest.raises(ReproError, match="Did you mean 'pack'"):
        sp.load_plan(path)


def test_runs_finished_with_the_grid_hash_are_skipped(tmp_path):
    run = grid.Run("cmixup", "smoke", "airfoil", "erm", 0)
    folder = tmp_path / run.folder
    folder.mkdir(parents=True)
    assert not sp.is_finished(run, tmp_path)
    (folder / "metrics.json").write_text("{}")
    (folder / "provenance.json").write_text(json.dumps({"config_hash": "0" * 16}))
    assert not sp.is_finished(run, tmp_path)  # finished under another config: the slice retrains it
    want = grid.run_config_hash(*[getattr(run, k) for k in ("paper", "scale", "experiment", "method", "seed")])
    (folder / "provenance.json").write_text(json.dumps({"config_hash": want}))
    assert sp.is_finished(run, tmp_path)
    plan = sp.load_plan(write_plan(tmp_path / "p.yaml", comparisons=[
        {"paper": "cmixup", "experiment": "airfoil", "methods": ["erm", "mixup"]}]))
    queue, done = bslice.queue_for(plan, REPO, tmp_path)
    assert [p.key for p in done] == ["cmixup/airfoil/erm/seed0"]
    assert [p.key for p in queue] == ["cmixup/airfoil/mixup/seed0"]


# ------------------------------------------------------------------------------------------- estimates
def test_device_kind():
    assert sp.device_kind("NVIDIA H100 80GB HBM3") == "h100"
    assert sp.device_kind("NVIDIA H200") == "h200"
    assert sp.device_kind("NVIDIA A100-SXM4-40GB") == "a100"
    assert sp.device_kind("cpu (x86_64, 2 threads)") == "cpu"


def test_estimates_prefer_this_kind_then_another_gpu_then_the_prior(tmp_path):
    plan = sp.load_plan(write_plan(tmp_path / "p.yaml", method_cost_prior={"mixup": 3.0},
                                   pack_factor_prior={1: 1.0, 2: 1.5, 4: 2.5}))
    run = grid.Run("cmixup", "smoke", "airfoil", "erm", 0)
    est = sp.Estimator(plan, "h100")
    assert est.estimate(run).s_per_epoch == pytest.approx(0.01) and est.estimate(run).source == "prior (guess)"
    assert est.estimate(grid.Run("cmixup", "smoke", "airfoil", "mixup", 0)).s_per_epoch == pytest.approx(0.03)
    row = {"paper": "cmixup", "scale": "smoke", "experiment": "airfoil", "method": "erm", "startup_s": 3.0}
    older = sp.Measurements(runs=[{**row, "device_kind": "a100", "s_per_epoch_alone": 9.0, "date": "2026-01"}])
    assert sp.Estimator(plan, "h100", older).estimate(run).s_per_epoch == 9.0
    assert "a100" in sp.Estimator(plan, "h100", older).estimate(run).source
    both = sp.Measurements(runs=[{**row, "device_kind": "h100", "s_per_epoch_alone": 2.0, "date": "2025-01"},
                                 *older.runs])
    assert sp.Estimator(plan, "h100", both).estimate(run).s_per_epoch == 2.0  # same kind beats a newer other kind
    assert sp.Estimator(plan, "h100", both).estimate(run).startup_s == 3.0
    # packing factor: prior interpolated, the kind's measurement wins, extrapolated past the last point
    assert est.pack_factor(1) == 1.0 and est.pack_factor(3) == pytest.approx(2.0)
    assert est.pack_factor(6) == pytest.approx(3.5)
    measured = sp.Measurements(pack_factors=[{"device_kind": "h100", "packed": 4, "factor": 1.9, "date": "x"}])
    assert sp.Estimator(plan, "h100", measured).pack_factor(4) == pytest.approx(1.9)
    assert sp.Estimator(plan, "h200", measured).pack_factor(4) == pytest.approx(2.5)
    with pytest.raises(ReproError, match="prior_s_per_epoch"):
        sp.Estimator(plan, "h100").estimate(grid.Run("mixpro", "smoke", "cifar10_vit", "mixpro", 0))


# ------------------------------------------------------------------------------------------- simulation
def factor(k):
    return {1: 1.0, 2: 1.5, 3: 2.0}.get(k, 2.0 + 0.5 * (k - 3))


def test_simulate_shares_the_device_among_running_jobs():
    ends = sp.simulate(0.0, [sp.Job("a", 0.0, 10.0), sp.Job("b", 0.0, 10.0)], factor)
    assert ends == pytest.approx({"a": 15.0, "b": 15.0})
    # a starts up for 5 s while b runs alone (5 s of work done), then both share: b's 5 s take 7.5 s, a has done
    # 5 of its 10 by then and finishes the rest alone
    ends = sp.simulate(100.0, [sp.Job("a", 5.0, 10.0), sp.Job("b", 0.0, 10.0)], factor)
    assert ends == pytest.approx({"b": 112.5, "a": 117.5})


class FixedEstimator:
    def __init__(self, seconds):
        self.seconds = seconds  # key -> (startup, s_per_epoch, source)

    def estimate(self, run):
        key = f"{run.paper}/{run.experiment}/{run.method}/seed{run.seed}"
        startup, spe, source = self.seconds[key]
        return sp.Estimate(startup, spe, source)

    pack_factor = staticmethod(factor)


def planned(names, epochs=10):
    return [sp.PlannedRun(grid.Run("p", "proxy", "e", name, 0), epochs, i) for i, name in enumerate(names)]


def test_schedule_starts_in_priority_order_what_fits_and_packs_up_to_the_limit():
    runs = planned(["huge", "a", "b", "c"])
    est = FixedEstimator({"p/e/huge/seed0": (0, 50, "prior"), "p/e/a/seed0": (0, 2, "prior"),
                          "p/e/b/seed0": (0, 2, "prior"), "p/e/c/seed0": (0, 2, "prior")})
    lines = {ln.run.run.method: ln for ln in sp.schedule(runs, est, 0.0, 100.0, pack=2, margin=1.0)}
    assert lines["huge"].start is None  # 500 s alone: never fits 100 s
    assert lines["a"].start == 0 and lines["b"].start == 0  # two at once: 20 s of work each at factor 1.5
    assert lines["a"].end == pytest.approx(30.0) and lines["b"].end == pytest.approx(30.0)
    assert lines["c"].start == pytest.approx(30.0) and lines["c"].end == pytest.approx(50.0)  # then c, alone


def test_a_run_that_would_push_a_running_one_past_the_deadline_is_not_added():
    runs = planned(["long", "short"])
    est = FixedEstimator({"p/e/long/seed0": (0, 8, "prior"), "p/e/short/seed0": (0, 1, "prior")})
    # long alone ends at 80 <= 100; with short beside it (factor 1.5 for 15 s) it would end at 85: still fits
    lines = {ln.run.run.method: ln for ln in sp.schedule(runs, est, 0.0, 100.0, pack=2, margin=1.0)}
    assert lines["short"].start == 0
    # with a deadline of 82 the pair no longer fits: short waits until long is done, and then has no time
    lines = {ln.run.run.method: ln for ln in sp.schedule(runs, est, 0.0, 82.0, pack=2, margin=1.0)}
    assert lines["long"].start == 0 and lines["short"].start is None
    # the margin pads the candidate's own estimate: 80 x 1.1 = 88 > 85
    assert sp.schedule(runs[:1], est, 0.0, 85.0, pack=2, margin=1.1)[0].start is None


def test_probes_start_one_run_per_unmeasured_experiment_only_when_nothing_fits():
    runs = [sp.PlannedRun(grid.Run("p", "proxy", exp, m, 0), 10, i)
            for i, (exp, m) in enumerate([("e1", "a"), ("e1", "b"), ("e2", "a"), ("e3", "a")])]
    est = FixedEstimator({"p/e1/a/seed0": (0, 50, "prior (guess)"), "p/e1/b/seed0": (0, 50, "prior (guess)"),
                          "p/e2/a/seed0": (0, 50, "measured (slice x)"), "p/e3/a/seed0": (0, 50, "prior (guess)")})
    lines = sp.schedule(runs, est, 0.0, 300.0, pack=4, margin=1.0, probe=True, min_probe_s=60)
    probed = [ln.run.key for ln in lines if ln.probe]
    assert probed == ["p/e1/a/seed0", "p/e3/a/seed0"]  # one per experiment, measured ones never probed
    assert all(ln.end == 300.0 for ln in lines if ln.probe)
    assert not any(ln.probe for ln in sp.schedule(runs, est, 0.0, 30.0, pack=4, margin=1.0, probe=True,
                                                  min_probe_s=60))  # too little time left to measure anything


# ------------------------------------------------------------------------------------------ live slices
FAKE_TRAINER = """
import json, sys, time
from pathlib import Path
folder, every, epochs = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
folder.mkdir(parents=True, exist_ok=True)
for epoch in range(1, epochs + 1):
    time.sleep(every)
    with open(folder / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": epoch, "epoch_time_s": every}) + "\\n")
time.sleep(600)  # never writes metrics.json: only a deadline or a projection stops it
"""


def fake_command(every, epochs):
    def command_for(run, folder, root):
        return [sys.executable, "-c", FAKE_TRAINER, str(folder), str(every), str(epochs)]

    return command_for


def read_record(out: Path) -> tuple[dict, list[str]]:
    (archive,) = out.glob("slice-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        record = json.loads(tar.extractfile(next(n for n in names if n.endswith("slice.json"))).read())
    return record, names


def test_a_run_still_going_at_the_deadline_is_stopped_and_the_command_returns_in_time(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_DATA_DIR", str(tmp_path))
    plan = write_plan(tmp_path / "p.yaml")
    t0 = time.monotonic()
    assert bslice.run(args_for(plan, tmp_path, "--minutes", "0.2"), REPO, tmp_path, command_for=fake_command(60, 3),
                      poll_s=0.2) == 0
    took = time.monotonic() - t0
    assert took <= 0.2 * 60 + 1.0  # the deadline holds (4 s reserve covers the 2 s grace and the archive)
    record, names = read_record(tmp_path / "out")
    (entry,) = record["runs"]
    assert entry["status"] == "killed_deadline" and entry["epochs_done"] == 0
    assert not [n for n in names if n.startswith("results/")]  # an unfinished run never reaches the archive
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [Path(f"slice-{record['slice']}.tar.gz").name,
                                                                    "slice.log", "summary.md"]


def test_a_run_whose_epochs_cannot_finish_is_stopped_early_and_its_time_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_DATA_DIR", str(tmp_path))
    (tmp_path / "airfoil").mkdir()  # the full Airfoil's folder (the fake trainer never reads it)
    # proxy airfoil: 100 epochs; the prior (0.01 s/epoch) lets it start, its epochs (0.25 s) say 25 s > the deadline
    plan = write_plan(tmp_path / "p.yaml", scale="proxy", pack=1, prior_s_per_epoch={"cmixup/airfoil": 0.01})
    t0 = time.monotonic()
    bslice.run(args_for(plan, tmp_path, "--minutes", "0.25"), REPO, tmp_path, command_for=fake_command(0.25, 100),
               poll_s=0.1)
    record, _ = read_record(tmp_path / "out")
    entry = record["runs"][0]
    assert entry["status"] == "killed_projection", entry
    assert entry["end_s"] < 8  # stopped after its first few epochs, long before the deadline at 11 s
    assert entry["s_per_epoch_wall"] == pytest.approx(0.25, rel=0.6)
    assert time.monotonic() - t0 < 15
    estimates = json.loads((tmp_path / "work" / f"stage-{record['slice']}" / sp.SLICES_DIR / record["slice"]
                            / "estimates.json").read_text())
    (row,) = estimates["runs"]  # the next plan reads this measurement; the other seeds were never started
    assert {r["status"] for r in record["runs"][1:]} == {"not_started"}
    assert (row["paper"], row["experiment"], row["method"], row["device_kind"]) == ("cmixup", "airfoil", "erm", "cpu")
    assert not row["finished"]


@pytest.fixture(scope="module")
def real_slice(tmp_path_factory):
    """One real slice on the CPU: the C-Mixup smoke run (a 301-row sample, seconds) trained by common.train."""
    tmp = tmp_path_factory.mktemp("slice")
    plan = write_plan(tmp / "p.yaml")
    assert bslice.run(args_for(plan, tmp, "--minutes", "2"), REPO, tmp, poll_s=0.5) == 0
    return tmp


def test_a_real_run_lands_in_the_repository_layout_with_the_grids_config_hash(real_slice):
    out = real_slice / "out"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir())  # what the device tool brings back
    assert all(set(name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") for name in files)
    record, names = read_record(out)
    run_dir = "results/cmixup/smoke/airfoil/erm/seed0"
    assert sorted(n for n in names if n.startswith("results/")) == sorted(
        f"{run_dir}/{f}" for f in ("config.yaml", "log.jsonl", "metrics.json", "provenance.json"))
    assert not [n for n in names if "checkpoint" in n]
    record_dir = f"{sp.SLICES_DIR}/{record['slice']}"
    assert {f"{record_dir}/{f}" for f in ("slice.json", "estimates.json", "summary.md")} <= set(names)
    assert record["runs"][0]["status"] == "finished"
    with tarfile.open(next(out.glob("slice-*.tar.gz"))) as tar:
        prov = json.loads(tar.extractfile(f"{run_dir}/provenance.json").read())
    assert prov["config_hash"] == grid.run_config_hash("cmixup", "smoke", "airfoil", "erm", 0)
    assert re.fullmatch("[0-9a-f]{40}", prov["git_commit"])  # (another engineer may commit while it trains)
    assert (real_slice / "work" / run_dir / "checkpoint" / "last.pt").is_file()  # kept in the work folder only


def test_staging_fills_the_commit_a_copy_without_git_could_not_see(tmp_path):
    run = grid.Run("cmixup", "smoke", "airfoil", "erm", 0)
    src = tmp_path / "trained"
    src.mkdir()
    for name in slice_run.RUN_FILES:
        (src / name).write_text("{}")
    (src / "provenance.json").write_text(json.dumps({"git_commit": "unknown", "git_dirty": None, "config_hash": "h"}))
    (src / "checkpoint").mkdir()
    (src / "checkpoint" / "last.pt").write_text("x")
    plan = sp.load_plan(write_plan(tmp_path / "p.yaml"))
    git = {"git_commit": "c0ffee", "git_dirty": False, "git_source": "bench.slice stamp of d: every tracked file matches"}
    ctx = slice_run.SliceContext(root=REPO, out=tmp_path / "out", workdir=tmp_path / "work", slice_id="s", plan=plan,
                                 device="cpu", kind="cpu", git=git, date="d", started=0.0, deadline=1.0)
    slice_run.stage_run(ctx, src, run)
    staged = ctx.stage / run.folder
    assert sorted(p.name for p in staged.iterdir()) == sorted(slice_run.RUN_FILES)
    prov = json.loads((staged / "provenance.json").read_text())
    assert prov == {"config_hash": "h", **git}


@pytest.mark.slow  # a Snakemake dry run: ~7 s alone, more on a busy machine
def test_the_workflow_sees_a_merged_slice_run_as_finished(real_slice, tmp_path):
    with tarfile.open(next((real_slice / "out").glob("slice-*.tar.gz"))) as tar:
        tar.extractall(tmp_path, filter="data")
    target = "results/cmixup/smoke/airfoil/erm/seed0/metrics.json"
    res = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n",
                          target], capture_output=True, text=True, check=False, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Nothing to be done" in res.stdout + res.stderr


def test_merge_adds_runs_and_measurements_and_rebuilds_results_md(real_slice, tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / slice_io.RESULTS_MD).write_text(f"# head\n{slice_io.BEGIN}\nold\n{slice_io.END}\ntail\n")
    assert slice_io.merge([str(real_slice / "out")], root=tmp_path) == 0
    run_dir = tmp_path / "results/cmixup/smoke/airfoil/erm/seed0"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "log.jsonl", "metrics.json",
                                                         "provenance.json"]
    record, _ = read_record(real_slice / "out")
    text = (tmp_path / slice_io.RESULTS_MD).read_text()
    assert text.startswith("# head\n") and text.endswith("tail\n") and "old" not in text
    assert record["slice"] in text and record["git_commit"][:10] in text and record["date"][:10] in text
    # a second merge changes nothing; a finished run of another config is never overwritten
    before = (run_dir / "metrics.json").read_text()
    prov = json.loads((run_dir / "provenance.json").read_text())
    (run_dir / "provenance.json").write_text(json.dumps({**prov, "config_hash": "other"}))
    slice_io.merge([str(real_slice / "out")], root=tmp_path)
    assert (run_dir / "metrics.json").read_text() == before
    assert json.loads((run_dir / "provenance.json").read_text())["config_hash"] == "other"


def test_merge_refuses_members_outside_the_layout(tmp_path):
    archive = tmp_path / "slice-x.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"{}"
        info = tarfile.TarInfo("results/../../evil.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ReproError, match="not a plain relative file"):
        slice_io.merge([str(archive)], root=tmp_path / "checkout")
    assert not (tmp_path / "evil.json").exists()


def test_benchmarks_run_in_order_skip_the_measured_and_stop_at_their_cap(tmp_path):
    root = tmp_path / "root"
    done = root / sp.SLICES_DIR / "old"
    done.mkdir(parents=True)
    (done / "slice.json").write_text(json.dumps({"slice": "old", "device_kind": "cpu",
                                                  "benchmarks": [{"name": "measured", "status": "ok"}]}))
    write = "import json, sys; open(sys.argv[-1], 'w').write(json.dumps({'rows': [{'x': 1}]}))"
    plan = sp.load_plan(write_plan(tmp_path / "p.yaml", benchmarks=[
        {"name": "measured", "args": ["-c", write], "cap_s": 30},
        {"name": "quick", "args": ["-c", write], "cap_s": 30, "min_s": 1},
        {"name": "hangs", "args": ["-c", "import time; time.sleep(60)"], "cap_s": 1.5, "min_s": 1},
        {"name": "late", "args": ["-c", write], "cap_s": 30, "min_s": 3}]))  # ~2 s of the budget left for it
    t0 = time.monotonic()
    ctx = slice_run.SliceContext(root=root, out=tmp_path / "out", workdir=tmp_path / "work", slice_id="s1", plan=plan,
                                 device="cpu", kind="cpu", git={"git_commit": "abc", "git_dirty": False,
                                                                "git_source": "test"},
                                 date="2026-01-01T00:00Z", started=t0, deadline=t0 + 60)
    ctx.out.mkdir()
    record = {"slice": "s1", "date": ctx.date, "device": "cpu", "device_kind": "cpu", "git_commit": "abc",
              "minutes": 1, "pack": 1, "scale": "smoke", "benchmarks": [], "runs": []}
    slice_run.run_benchmarks(ctx, record, stop_at=t0 + 4.0)
    status = {b["name"]: b["status"] for b in record["benchmarks"]}
    assert status == {"measured": "skipped", "quick": "ok", "hangs": "failed", "late": "skipped"}
    assert time.monotonic() - t0 < 8
    assert (ctx.record_dir / "quick.json").is_file() and not (ctx.record_dir / "measured.json").exists()


def test_slice_bench_overhead_times_each_method_on_its_own_model(tmp_path):
    from bench import slice_bench

    payload = slice_bench.overhead(["--small", "--steps", "1", "--warmup", "1", "--rounds", "1", "--out",
                                    str(tmp_path / "o.json")])
    timed = {(r["case"], r["method"]) for r in payload["rows"] if "overhead_pct" in r}
    assert timed == {("vit_depth1_32", "mixpro"), ("smmix_vit_depth1_32", "smmix")}
    assert json.loads((tmp_path / "o.json").read_text())["rows"] == payload["rows"]


# ---------------------------------------------------------------------------------------- dry run, carry
def test_dry_run_prints_the_plan_without_a_gpu(capsys):
    assert bslice.main(["--dry-run", "--minutes", "9", "--device-kind", "h100"]) == 0
    text = capsys.readouterr().out
    assert "benchmarks first, 3.0 min" in text and "trainer_vs_plain" in text
    assert "est min" in text and "total:" in text
    first = sp.expand(sp.load_plan())[0].key
    assert first in text


def test_dry_run_with_a_measurement_plans_whole_runs(tmp_path, capsys, monkeypatch):
    plan = write_plan(tmp_path / "p.yaml", scale="proxy", allow_cpu_experiments=False, pack=2, fit_margin=1.0,
                      startup_s=30, prior_s_per_epoch={"mixup/cifar10_preactresnet18": 1.0}, comparisons=[
                          {"paper": "mixup", "experiment": "cifar10_preactresnet18", "methods": ["erm", "mixup"]}])
    assert bslice.main(["--dry-run", "--plan", str(plan), "--minutes", "9", "--device-kind", "h100"]) == 0
    text = capsys.readouterr().out
    # 200 epochs x 1 s x 1.3 (two packed) + 30 s start-up = 290 s each; the pair fits 9 min, seed 1 does not
    assert "mixup/cifar10_preactresnet18/erm/seed0" in text.split("total:")[0]
    assert "mixup/cifar10_preactresnet18/mixup/seed0" in text.split("total:")[0]
    assert "total: 2 run(s) expected to finish" in text and "not started" in text


def test_blob_hash_is_gits_and_the_stamp_detects_a_changed_file(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n")
    oid = subprocess.run(["git", "hash-object", str(tmp_path / "a.txt")], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert slice_io.blob_hash(b"hello\n") == oid
    stamp = {"git_commit": "c0ffee", "date": "d", "files": {"a.txt": oid}}
    assert slice_io.verify_stamp(stamp, tmp_path)["git_dirty"] is False
    (tmp_path / "a.txt").write_text("changed\n")
    state = slice_io.verify_stamp(stamp, tmp_path)
    assert state["git_dirty"] is True and state["git_commit"] == "c0ffee" and "a.txt" in state["git_source"]


def test_prepare_carry_copies_the_data_stamps_the_commit_and_prints_the_device_call(tmp_path, capsys):
    repo = tmp_path / "repo"
    config = repo / "papers/demo/configs/proxy/exp.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(yaml.safe_dump({"data": {"name": "toyset"}, "methods": {"erm": {}}}))
    (repo / ".gitignore").write_text(".data/\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "x"]):
        subprocess.run(["git", *cmd], cwd=repo, env=env, check=True)
    src = tmp_path / "src" / "toyset"
    src.mkdir(parents=True)
    (src / "train.parquet").write_bytes(b"x" * 1000)
    plan = write_plan(tmp_path / "p.yaml", comparisons=[{"paper": "demo", "experiment": "exp", "methods": ["erm"]}],
                      scale="proxy")
    assert slice_io.prepare_carry(["--plan", str(plan), "--data-src", str(tmp_path / "src")], root=repo) == 0
    text = capsys.readouterr().out
    assert (repo / ".data/toyset/train.parquet").read_bytes() == b"x" * 1000
    stamp = json.loads((repo / ".data" / slice_io.STAMP).read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert stamp["git_commit"] == head and "papers/demo/configs/proxy/exp.yaml" in stamp["files"]
    call = json.loads(text[text.index("{"):text.index("}") + 1])
    assert call["carry"] == [".data"] and call["timeout_s"] == 600
    assert call["command"] == "REPRO_DATA_DIR=.data PYTHONUNBUFFERED=1 python3 -m bench.slice --minutes 9"
    with pytest.raises(ReproError, match="over the device tool's"):
        slice_io.prepare_carry(["--plan", str(plan), "--data-src", str(tmp_path / "src"), "--limit-mib", "0.0001"],
                               root=repo)


def test_committed_results_md_has_the_generated_section_up_to_date():
    text = (REPO / slice_io.RESULTS_MD).read_text()
    assert slice_io.BEGIN in text and slice_io.END in text
    section = text.split(slice_io.BEGIN, 1)[1].split(slice_io.END, 1)[0]
    assert section.strip() == slice_io.render_results(REPO).strip()
