"""C-Mixup rows whose data is not staged here (issue #14): the table shows the paper's number with "data not
available (<path>)" until a run exists, and each loader's missing-data error is one line naming the exact path."""

from __future__ import annotations

import json

import pytest

from common.data import build_splits
from common.errors import ReproError
from common.report import build_table


def rows_by_key(rows):
    return {(r["setting"], r["method"]): r for r in rows}


def test_rows_with_data_path_say_data_not_available_until_a_run_exists(tmp_path):
    _, _, rows = build_table("cmixup", "paper", "indist_rmse", tmp_path)
    table = rows_by_key(rows)
    erm, cmixup = table[("Electricity", "erm")], table[("Electricity", "cmixup")]
    assert erm["paper"] == "0.05810" and erm["ours"] == "data not available ($REPRO_DATA_DIR/electricity/electricity.txt)"
    assert cmixup["verdict"] == "data not available" and cmixup["n"] == "0/3"
    # a row without data_path and without runs stays "missing" / "not run"
    assert table[("Exchange-Rate", "cmixup")]["ours"] == "missing"
    assert table[("Exchange-Rate", "cmixup")]["verdict"] == "not run"
    # once a run of the baseline exists, its number replaces the note; the method's row keeps it
    run = tmp_path / "cmixup" / "paper" / "electricity" / "erm" / "seed0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"selected": {"test": {"rmse": 0.0612}}}))
    table = rows_by_key(build_table("cmixup", "paper", "indist_rmse", tmp_path)[2])
    assert table[("Electricity", "erm")]["ours"].startswith("0.0612") and table[("Electricity", "erm")]["n"] == "1/3"
    assert table[("Electricity", "cmixup")]["ours"].startswith("data not available")


def test_ood_r_rows_show_the_paper_number_and_where_the_data_goes(tmp_path):
    table = rows_by_key(build_table("cmixup", "paper", "ood_r", tmp_path)[2])
    dti = table[("DTI avg", "cmixup")]
    assert dti["paper"] == "0.4980" and "$REPRO_DATA_DIR/dti/DTI_sub100_*.pkl" in dti["ours"]
    assert dti["verdict"] == "data not available" and dti["n"] == "0/3"  # configs/paper/dti.yaml: 3 seeds
    worst = rows_by_key(build_table("cmixup", "paper", "ood_r_worst", tmp_path)[2])
    poverty = rows_by_key(build_table("cmixup", "paper", "ood_r_worst_group", tmp_path)[2])[("PovertyMap worst", "erm")]
    assert poverty["paper"] == "0.5000" and "$REPRO_DATA_DIR/wilds/poverty_v1.1/" in poverty["ours"]
    assert worst[("DTI worst", "cmixup")]["paper_gain"] == "+0.0290"  # higher r is better


@pytest.mark.parametrize("name, file", [("electricity", "electricity.txt"), ("no2", "no2.csv"),
                                        ("communities_and_crime", "communities.data")])
def test_missing_data_is_one_line_naming_the_exact_path(tmp_path, monkeypatch, name, file):
    monkeypatch.setenv("REPRO_DATA_DIR", str(tmp_path))
    with pytest.raises(ReproError) as err:
        build_splits(name, allow_download=False)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / name / file) in message
