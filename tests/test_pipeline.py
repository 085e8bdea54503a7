"""`rlsim pipeline` on fixture data: stage folders, skip-on-rerun, metrics.json and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlsim.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, data_root: Path, cache_root: Path, stages: list[str]) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["data"].update(data_dir=str(data_root), cache_dir=str(cache_root), download=False)
    cfg["reward"].update(dim=16, layers=1, heads=2, ff_dim=32, text_hidden=32, epochs=2, batch_size=256)
    cfg["policy"].update(iterations=1, train_batch_size=256, minibatch_size=128, num_epochs=1)
    cfg["pipeline"].update(stages=stages, persona_users=10)
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_fast_pipeline_skips_done_stages(tmp_path, data_root, cache_root, capsys):
    cfg = _config(tmp_path, data_root, cache_root, ["data", "baselines", "evaluate"])
    out = tmp_path / "run"
    assert main(["pipeline", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["ran"] == ["data", "baselines", "evaluate"]
    ev = m["stages"]["evaluate"]
    assert set(ev["models"]) == {"bias", "mf"} and "global_mean" in ev["baselines"]
    assert (out / "report.html").is_file() and (out / "per_user.png").is_file() and (out / "gini.png").is_file()
    html = (out / "report.html").read_text()
    assert "Baseline gate" in html and "baseline: global_mean" in html
    capsys.readouterr()
    assert main(["pipeline", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "metrics.json").read_text())["ran"] == []
    assert "nothing" in capsys.readouterr().out
    assert main(["pipeline", "--config", str(cfg), "--out", str(out), "--quiet", "--stages", "baselines",
                 "--force"]) == 0
    assert json.loads((out / "metrics.json").read_text())["ran"] == ["baselines"]


def test_unknown_stage_is_a_user_error(tmp_path, data_root, cache_root, capsys):
    cfg = _config(tmp_path, data_root, cache_root, ["data", "train_everything"])
    assert main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "unknown pipeline stage" in capsys.readouterr().err


def _available(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.slow
def test_full_pipeline_on_fixtures(tmp_path, data_root, cache_root):
    stages = ["data", "baselines", "reward", "candidates", "policy", "profiles", "personas", "evaluate"]
    cfg = _config(tmp_path, data_root, cache_root, stages)
    out = tmp_path / "run"
    assert main(["pipeline", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["stages"]) == set(stages)
    ev = m["stages"]["evaluate"]
    assert "reward_model" in ev["models"] and ev["policy"]["policy"] is not None
    assert ev["personas"]["persona"]["n"] > 0 and "reward_model" in ev["personas"]
    assert set(ev["fidelity"]) == {"reward_model", "offline_persona", "bias", "mf"}
    assert ev["policy"]["held_out_users"] > 0 and "popularity" in ev["policy"]["real_hit_rate"]
    for png in ("per_user.png", "gini.png", "policy.png", "personas.png", "histograms.png"):
        assert (out / png).is_file(), png
    from tests.test_report import assert_sections_have_content

    assert_sections_have_content((out / "report.html").read_text(), out, (
        "Data", "Baseline gate", "Reward model training", "Per-user accuracy", "Gini", "Correlations",
        "Simulated users: fidelity", "Policy on held-out users", "Personas vs reward model", "Stages"))
