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


def test_interleaved_alternates_blocks_and_takes_the_median():
    import torch

    from bench.harness import interleaved

    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    timed = interleaved(steps, torch.device("cpu"), batch_size=4, steps_total=6, warmup=1, rounds=3)
    # warm-up once each, then blocks of 2 steps: a a b b | b b a a | a a b b
    assert "".join(calls) == "ab" + "aabb" + "bbaa" + "aabb"
    assert set(timed) == {"a", "b"} and all(t["images_per_s"] > 0 and t["s_per_step"] > 0 for t in timed.values())


def test_data_path_runs_both_paths(tmp_path, monkeypatch):
    from bench import data_path

    monkeypatch.setenv("REPRO_CACHE_DIR", str(tmp_path / "cache"))
    payload = data_path.main(["--dataset", "cifar10-mini", "--batch-size", "50", "--batches", "3", "--warmup", "1",
                              "--workers", "0", "--out", str(tmp_path / "d.json")])
    assert [row["path"] for row in payload["rows"]] == ["DataLoader, 0 workers", "device cache"]
    assert all(row["images_per_s"] > 0 for row in payload["rows"])
