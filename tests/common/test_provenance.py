"""The provenance record's git state: code changes mark a run dirty, workflow outputs do not."""

import subprocess

from common.provenance import git_state


def _git(root, *args):
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def _repo(tmp_path):
    for folder in ("common", "figures/p", "results/p"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "common" / "code.py").write_text("x = 1\n")
    (tmp_path / "figures" / "p" / "fig.pdf").write_text("old")
    (tmp_path / "results" / "p" / "metrics.json").write_text("{}")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return tmp_path


def test_clean_checkout_is_not_dirty(tmp_path):
    state = git_state(_repo(tmp_path))
    assert state["git_dirty"] is False and state["git_dirty_files"] == []
    assert len(state["git_commit"]) == 40


def test_rewritten_figures_and_results_do_not_make_a_run_dirty(tmp_path):
    root = _repo(tmp_path)
    (root / "figures" / "p" / "fig.pdf").write_text("rewritten by a sibling job")
    (root / "results" / "p" / "metrics.json").write_text('{"a": 1}')
    assert git_state(root)["git_dirty"] is False


def test_a_code_change_makes_a_run_dirty_and_is_named(tmp_path):
    root = _repo(tmp_path)
    (root / "common" / "code.py").write_text("x = 2\n")
    state = git_state(root)
    assert state["git_dirty"] is True and state["git_dirty_files"] == ["common/code.py"]


def test_outside_a_checkout_the_state_is_unknown(tmp_path):
    assert git_state(tmp_path) == {"git_commit": "unknown", "git_dirty": None}
