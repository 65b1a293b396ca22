"""--config values as users type them: seeds lists validated once, train=false (the README's spelling) honoured."""

import subprocess
import sys
from pathlib import Path

import pytest

from common import workflow as grid
from common.errors import ReproError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("given", "seeds"), [
    (None, None), ("", None), (3, [0, 1, 2]), ("0,4", [0, 4]), ("[0, 4]", [0, 4]), (["0", "4"], [0, 4]),
    ([1, 2], [1, 2]),
])
def test_seed_lists(given, seeds):
    assert grid.parse_seeds(given) == seeds


@pytest.mark.parametrize("given", ["a,b", "0,b", "-1", -2, "1.5", ["0", "x"], True, "0,-3"])
def test_a_bad_seed_list_is_one_error_naming_it(given):
    with pytest.raises(ReproError, match=r"--config seeds=.*(not a seed|negative count).*seeds=0,4"):
        grid.parse_seeds(given)


@pytest.mark.parametrize(("given", "value"), [
    (True, True), (False, False), ("true", True), ("false", False), ("True", True), ("False", False),
    (1, True), (0, False), ("1", True), ("0", False),
])
def test_train_flag_spellings(given, value):
    assert grid.parse_flag(given, "train") is value


@pytest.mark.parametrize("given", ["maybe", "yes", 2, "falsy"])
def test_a_bad_flag_is_an_error(given):
    with pytest.raises(ReproError, match="train=true or train=false"):
        grid.parse_flag(given, "train")


def dry_run(workdir, *config):
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                           "-n", "reproduce_mixup", "--config", *config],
                          capture_output=True, text=True, timeout=600, check=False)


def test_snakemake_takes_train_false_in_lower_case_and_refuses_bad_seeds(tmp_path):
    # train=false reaches the schema as a string; it must pass it and schedule no training at all
    res = dry_run(tmp_path, "train=false")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "mixed_examples" in res.stdout and "\ntrain " not in res.stdout.replace("\t", " ")
    trained = dry_run(tmp_path, "train=true")
    assert trained.returncode == 0 and "\ntrain " in trained.stdout.replace("\t", " ")
    bad = dry_run(tmp_path, "seeds=a,b")
    assert bad.returncode != 0 and "'a' is not a seed" in bad.stdout + bad.stderr
