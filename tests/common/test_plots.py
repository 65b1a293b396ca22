"""Figures: the numbers drawn are the numbers in the logs, and nothing is drawn that was not run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common import plots
from common.errors import ReproError

STAMP = "scale: smoke (test; numbers meaningless)"


def write_run(folder, top1, loss, split="test"):
    """A fake run folder whose log.jsonl has one row per epoch with the given values."""
    folder.mkdir(parents=True)
    rows = [
        {"epoch": e + 1, "lr": 0.1, "train_loss": lo, f"{split}_top1": t, f"{split}_nll": 1.0}
        for e, (t, lo) in enumerate(zip(top1, loss))
    ]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def assert_saved(stem):
    for suffix in (".png", ".pdf"):
        path = stem.with_name(stem.name + suffix)
        assert path.is_file() and path.stat().st_size > 0, path


@pytest.fixture
def figure_texts(monkeypatch):
    """Every text string of each figure, captured just before it is saved and closed."""
    captured = []
    real_save = plots.save_figure

    def spy(fig, out_stem):
        texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
        captured.append(texts)
        real_save(fig, out_stem)

    monkeypatch.setattr(plots, "save_figure", spy)
    return captured


def test_load_history_reads_rows_and_rejects_missing(tmp_path):
    run = write_run(tmp_path / "run", [10.0, 20.0], [2.0, 1.5])
    with open(run / "log.jsonl", "a") as fh:
        fh.write("\n")  # a trailing blank line is not a row
    assert [r["test_top1"] for r in plots.load_history(run)] == [10.0, 20.0]
    with pytest.raises(ReproError, match="no log.jsonl"):
        plots.load_history(tmp_path / "nothing")


def test_curves_mean_and_band_over_seeds(tmp_path, figure_texts):
    erm = [
        write_run(tmp_path / "erm/seed0", [10, 20, 30], [2.0, 1.0, 0.5]),
        write_run(tmp_path / "erm/seed1", [20, 40, 50], [3.0, 2.0, 1.5]),
    ]
    mixup = [write_run(tmp_path / "mixup/seed0", [15, 25, 35], [2.5, 2.0, 1.0])]
    stem = tmp_path / "figs/sub/curves"
    drawn = plots.plot_curves({"erm": erm, "mixup": mixup, "cutmix": []}, stem, "title", STAMP)

    assert_saved(stem)
    assert set(drawn) == {"erm", "mixup"}  # a method without runs is left out, not drawn as zeros
    epochs, mean, lo, hi = drawn["erm"]
    np.testing.assert_array_equal(epochs, [1, 2, 3])
    np.testing.assert_allclose(mean, [15, 30, 40])
    np.testing.assert_allclose(lo, [10, 20, 30])
    np.testing.assert_allclose(hi, [20, 40, 50])
    np.testing.assert_allclose(drawn["mixup"][1], [15, 25, 35])
    texts = figure_texts[0]
    assert "erm (n=2 seeds)" in texts and "mixup (n=1 seed)" in texts
    assert STAMP in texts and "test top-1 accuracy (%)" in texts


def test_curves_error_val_split_and_unequal_lengths(tmp_path, figure_texts):
    runs = [
        write_run(tmp_path / "a/seed0", [10, 20, 30], [2.0, 1.0, 0.5], split="val"),
        write_run(tmp_path / "a/seed1", [30, 40], [2.0, 1.0], split="val"),
    ]  # still training
    drawn = plots.plot_curves({"a": runs}, tmp_path / "err", "t", STAMP, error=True)
    epochs, mean, lo, _ = drawn["a"]
    np.testing.assert_array_equal(epochs, [1, 2])  # only epochs every seed has reached
    np.testing.assert_allclose(mean, [80, 70])
    np.testing.assert_allclose(lo, [70, 60])
    assert "val error (%)" in figure_texts[0]


def test_curves_refuse_mixed_splits_and_error_of_non_accuracy(tmp_path):
    a = write_run(tmp_path / "a/seed0", [10], [1.0], split="test")
    b = write_run(tmp_path / "b/seed0", [10], [1.0], split="val")
    with pytest.raises(ReproError, match="test_top1 and val_top1"):
        plots.plot_curves({"a": [a], "b": [b]}, tmp_path / "x", "t", STAMP)
    with pytest.raises(ReproError, match="accuracy metric"):
        plots.plot_curves({"a": [a]}, tmp_path / "x", "t", STAMP, metric="nll", error=True)


def test_curves_without_runs_say_so(tmp_path, figure_texts):
    missing = tmp_path / "never_ran/seed0"
    with pytest.warns(UserWarning, match="no log.jsonl"):
        drawn = plots.plot_curves({"erm": [missing], "mixup": []}, tmp_path / "empty", "t", STAMP)
    assert drawn == {}
    assert_saved(tmp_path / "empty")
    assert "no finished runs yet" in figure_texts[0]
    plots.plot_curves({}, tmp_path / "empty2", "t", STAMP)
    assert "no finished runs yet" in figure_texts[1]


def test_mixed_examples(tmp_path, figure_texts):
    methods = {"erm": {"name": "erm"}, "mixup": {"name": "mixup"}, "cutmix": {"name": "cutmix", "prob": 1.0}}
    stem = tmp_path / "mixed"
    rows = plots.plot_mixed_examples(methods, stem, "mixed", STAMP, n_images=8, seed=3)
    assert_saved(stem)
    assert list(rows) == ["original", "erm", "mixup", "cutmix"]

    original, original_targets = rows["original"]
    assert original.shape == (8, 3, 32, 32)
    # One image per class in turn, not the first 8 test images (all of class 0 in the sorted split).
    np.testing.assert_array_equal(original_targets.argmax(1), np.arange(8))
    for label, (images, targets) in rows.items():
        assert targets.shape == (8, 10)
        torch.testing.assert_close(targets.sum(1), torch.ones(8), msg=label)
    torch.testing.assert_close(rows["erm"][0], original, rtol=0, atol=0)
    torch.testing.assert_close(rows["erm"][1], original_targets, rtol=0, atol=0)

    # CutMix: every pixel comes from the image itself or from the same place in one batch partner,
    # and the label weight of a partner's class is the fraction of pixels it gave.
    cut_images, cut_targets = rows["cutmix"]
    assert not torch.equal(cut_images, original)
    for b in range(8):
        own = (cut_images[b] == original[b]).all(0)
        if own.all():
            continue
        partners = [p for p in range(8) if p != b and ((cut_images[b] == original[p]).all(0) | own).all()]
        assert partners, f"image {b} has pixels from no single batch image"
        pasted_fraction = float((~own).float().mean())
        assert cut_targets[b, b] == pytest.approx(1 - pasted_fraction, abs=1e-6)

    # mixup: a convex combination of two batch images with the weights of its target.
    mix_images, mix_targets = rows["mixup"]
    for b in range(8):
        weights = mix_targets[b]
        combination = (weights[:8].view(8, 1, 1, 1) * original).sum(0)  # class k is image k here
        torch.testing.assert_close(mix_images[b], combination, atol=1e-5, rtol=0)

    texts = figure_texts[0]
    assert "original" in texts and STAMP in texts
    assert any(" / " in t for t in texts)  # "cat 0.62 / dog 0.38" under mixed images


def test_mixed_examples_shows_first_n_of_an_even_batch(tmp_path):
    rows = plots.plot_mixed_examples(
        {"cutmix": {"name": "cutmix", "prob": 1.0}}, tmp_path / "m", "t", STAMP, n_images=3
    )
    assert rows["cutmix"][0].shape[0] == 3 and rows["cutmix"][1].shape == (3, 10)
    with pytest.raises(ReproError, match="reserved"):
        plots.plot_mixed_examples({"original": {"name": "erm"}}, tmp_path / "m", "t", STAMP)


def test_seed_bars(tmp_path, figure_texts):
    means = plots.plot_seed_bars(
        {"erm": [5.0, 6.0, 7.0], "mixup": [4.0], "none": []},
        tmp_path / "b/bars",
        "final error",
        "test top-1 error (%)",
        STAMP,
    )
    assert means == pytest.approx({"erm": 6.0, "mixup": 4.0})
    assert_saved(tmp_path / "b/bars")
    assert "erm: 6.00 (n=3 seeds)" in figure_texts[0]
    assert plots.plot_seed_bars({}, tmp_path / "empty", "t", "y", STAMP) == {}
    assert "no finished runs yet" in figure_texts[1]


def test_runs_with_a_validation_split_plot_their_test_curve(tmp_path):
    folder = tmp_path / "run/seed0"
    folder.mkdir(parents=True)
    rows = [{"epoch": 1, "train_loss": 1.0, "val_top1": 40.0, "test_top1": 30.0},
            {"epoch": 2, "train_loss": 0.9, "val_top1": 50.0, "test_top1": 45.0}]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = plots.plot_curves({"erm": [folder]}, tmp_path / "c", "t", STAMP)
    np.testing.assert_allclose(drawn["erm"][1], [30.0, 45.0])


def test_labelled_run_splits_at_the_first_equals_sign_and_names_the_bad_entry():
    import argparse

    from common.plots import labelled_run

    assert labelled_run("C-Mixup=results/a=b/seed0") == ("C-Mixup", Path("results/a=b/seed0"))
    with pytest.raises(argparse.ArgumentTypeError, match="LABEL=RUN_DIR, got 'results/x'"):
        labelled_run("results/x")
