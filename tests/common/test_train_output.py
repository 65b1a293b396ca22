"""What the trainer prints: tqdm bars only on a terminal, the one line per epoch always."""

import sys
from pathlib import Path

from common.train import main

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "papers/mixup/configs/smoke/cifar10_preactresnet18.yaml"
TINY = ["model.kwargs.width=8", "train.batch_size=50", "data.num_workers=0", "train.epochs=2",
        "train.max_steps_per_epoch=2"]


def test_no_progress_bars_in_a_log_file_but_one_line_per_epoch(tmp_path, capsys):
    assert main(["--config", str(SMOKE), "--method", "erm", "--output", str(tmp_path / "log"), *TINY]) == 0
    out, err = capsys.readouterr()
    assert "epoch    1/2" in out and "epoch    2/2" in out
    assert "batch/s" not in err + out and "s/batch" not in err + out and "\r" not in err + out


def test_progress_bars_on_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # as if stderr were a terminal
    assert main(["--config", str(SMOKE), "--method", "erm", "--output", str(tmp_path / "tty"), *TINY]) == 0
    out, err = capsys.readouterr()
    assert "epoch    2/2" in out and "/2 [" in err  # tqdm's 'k/2 [elapsed<remaining' counter
