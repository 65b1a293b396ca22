"""Every experiment config of every paper and scale loads, names known models/datasets/methods, and builds."""

from pathlib import Path

import pytest
import timm
import yaml

import common.models  # noqa: F401  (registers our CIFAR backbones into timm)
import papers  # noqa: F401  (registers the papers' own models: LSTNet, SMMix's ViTs)
from common.config import load_config
from common.data import list_datasets
from common.methods import build_method
from common.report import paper_results

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(REPO.glob("papers/*/configs/*/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "papers")))
def test_config_loads_for_every_method(path):
    raw = yaml.safe_load(path.read_text())
    paper, scale = path.parts[-4], path.parts[-2]
    assert raw["paper"] == paper and raw["scale"] == scale and raw["experiment"] == path.stem
    assert raw["methods"], "an experiment needs a methods grid"
    for label in raw["methods"]:
        cfg = load_config(path, method_label=label)
        assert timm.is_model(cfg.model.name), cfg.model.name
        assert cfg.data.name in list_datasets()
        build_method(cfg.method, num_classes=10, label_smoothing=cfg.train.label_smoothing)
        if scale != "smoke":  # proxy and paper runs say what they need (GPUs, or 0 for CPU-sized ones)
            assert "resources" in raw and "gpus" in raw["resources"], "declare resources.gpus"


@pytest.mark.parametrize("paper", sorted({p.parts[-4] for p in CONFIGS}))
def test_paper_results_rows_are_well_formed(paper):
    spec = paper_results(paper)
    for table_id, table in spec["tables"].items():
        assert table["metric"] and table["statistic"] in ("median_last10", "best", "final", "selected",
                                                          "selected_val"), table_id
        methods = {row["method"] for row in table["rows"]}
        assert table["baseline"] in methods
        for row in table["rows"]:
            assert {"setting", "method", "paper", "source", "verified"} <= set(row), row
            experiment = row.get("experiment", table.get("experiment"))
            if experiment is not None:  # a named experiment must exist at some scale
                assert list(REPO.glob(f"papers/{paper}/configs/*/{experiment}.yaml")), experiment
