"""The benchmarks run on CPU at small sizes, so they cannot rot (their numbers are not checked here)."""

import json

import pytest

from bench import epoch_time, method_overhead, trainer_vs_plain


def test_trainer_vs_plain_runs(tmp_path):
    payload = trainer_vs_plain.main(["--small", "--steps", "2", "--warmup", "1", "--out", str(tmp_path / "a.json")])
    assert len(payload["rows"]) == 2 and all(row["ratio"] > 0 for row in payload["rows"])
    assert json.loads((tmp_path / "a.json").read_text())["benchmark"] == "trainer_vs_plain"


def test_method_overhead_runs_for_every_method(tmp_path):
    payload = method_overhead.main(["--small", "--steps", "1", "--warmup", "1", "--out", str(tmp_path / "b.json")])
    measured = {row["method"] for row in payload["rows"] if "overhead_pct" in row}
    assert {"mixup", "cutmix", "transmix"} <= measured


@pytest.mark.slow
def test_epoch_time_runs_with_and_without_fast_path_and_packing(tmp_path):
    payload = epoch_time.main(["--small", "--steps", "2", "--packs", "1", "2", "--out", str(tmp_path / "c.json")])
    assert [(r["fast_path"], r["packed"]) for r in payload["rows"]] == [(False, 1), (False, 2), (True, 1), (True, 2)]
    assert all(r["s_per_epoch"] > 0 for r in payload["rows"])
