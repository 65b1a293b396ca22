"""Test driver for multi-process runs: ``accelerate launch ... tests/common/mp_driver.py RECORD_DIR <train args>``.

Runs `common.train.main` unchanged, with thin wrappers that record, per process, what the tests check and the
trainer does not log: the state of each step's `ctx.generator` before the method draws from it, the step's
scalars (the mixing lambda), how many rows every evaluation gathered, and the metrics `train()` returned. Each
process writes ``RECORD_DIR/rank<r>.json`` at the end and its pid to ``RECORD_DIR/pid<r>`` at the start.

With ``REPRO_TEST_PAUSE_AFTER_EPOCH=k`` the main process, right after saving the checkpoint of epoch k, creates
``RECORD_DIR/paused`` and sleeps, so a test can SIGKILL every process at a known point without racing the run.
Nothing here changes what the trainer computes.
"""

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import common.train as trainer


def main() -> int:
    record_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    record_dir.mkdir(parents=True, exist_ok=True)
    (record_dir / f"pid{rank}").write_text(str(os.getpid()))
    record = {"steps": [], "eval_rows": [], "metrics": None}

    step_fn, evaluate_fn, save_fn, train_fn = (trainer.optimisation_step, trainer.evaluate, trainer.save_checkpoint,
                                               trainer.train)

    def optimisation_step(accelerator, model, optimizer, method, batch, ctx, clip_grad=None):
        state = hashlib.sha256(ctx.generator.get_state().numpy().tobytes()).hexdigest()
        result = step_fn(accelerator, model, optimizer, method, batch, ctx, clip_grad)
        scalars = {k: float(v) for k, v in result.items() if k != "logits"}
        record["steps"].append({"epoch": ctx.epoch, "step": ctx.step, "generator": state, "scalars": scalars,
                                "labels": batch[1].tolist()})
        return result

    def evaluate(model, loader, accelerator, task):
        metrics, outputs, targets = evaluate_fn(model, loader, accelerator, task)
        record["eval_rows"].append(len(targets))
        return metrics, outputs, targets

    pause_after = int(os.environ.get("REPRO_TEST_PAUSE_AFTER_EPOCH", "0"))

    def save_checkpoint(path, state):
        save_fn(path, state)
        if state["epoch"] == pause_after:
            (record_dir / "paused").write_text(str(state["epoch"]))
            time.sleep(600)  # the test kills every process here

    def train(*args, **kwargs):
        record["metrics"] = train_fn(*args, **kwargs)
        return record["metrics"]

    trainer.optimisation_step, trainer.evaluate, trainer.save_checkpoint, trainer.train = (
        optimisation_step, evaluate, save_checkpoint, train)
    code = trainer.main(argv)
    (record_dir / f"rank{rank}.json").write_text(json.dumps(record))
    return code


if __name__ == "__main__":
    sys.exit(main())
