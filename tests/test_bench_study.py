"""bench/study.py on a tiny config (fixture data, 2 sources, 2 seeds): every key written by the script."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

BENCH = Path(__file__).resolve().parents[1] / "bench" / "study.py"


def test_bench_study_writes_every_key(tmp_path, data_root, cache_root, tiny_reward_checkpoint):
    spec = importlib.util.spec_from_file_location("bench_study", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = {"data": {"download": False}, "candidates": {"k": 10},
           "policy": {"train_batch_size": 250, "minibatch_size": 125, "num_epochs": 1, "hidden": 16,
                      "users_per_episode": 8, "num_envs_per_env_runner": 8},
           "study": {"sources": ["bias", "offline_persona"], "bootstrap": 100,
                     "bpr_grid": [{"factors": 8, "reg": 0.01, "epochs": 3}]}}
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "study.json"
    argv = ["--data-dir", str(data_root), "--cache-dir", str(cache_root), "--config", str(p), "--datasets",
            "ml-100k/u1", "--seeds", "2", "--env-steps", "250", "--reward-checkpoint", str(tiny_reward_checkpoint),
            "--num-cpus", "1", "--work", str(tmp_path / "work"), "--out", str(out)]
    out.write_text(json.dumps({"datasets": {"ml-100k/u2": {"kept": True}}, "command": "an earlier run"}))
    assert bench.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["command"].startswith("python bench/study.py --data-dir") and "--seeds 2" in r["command"]
    assert r["wall_seconds"] > 0 and r["config"]["study"]["seeds"] == 2
    d = r["datasets"]["ml-100k/u1"]
    assert d["seeds"] == 2 and d["held_out_users"] == d["held_out_users_with_behaviour"] > 0
    assert set(d["sources"]) == {"bias", "offline_persona"}
    for s in d["sources"].values():
        v = s["vs_popularity"]
        assert {"mean", "ci95", "p_holm"} <= set(v) and len(v["ci95"]) == 2 and v["n_users"] == d["held_out_users"]
    assert {"popularity", "random", "real_oracle", "mf_top1", "bpr_top1", "reward_model_greedy"} == set(d["references"])
    assert "popularity-first" in d["answer"]
    assert {"wall_seconds", "command", "policy", "reward"} <= set(d)
    for s in d["sources"].values():
        assert {"mean", "ci95", "p_holm"} <= set(s["vs_bpr_top1"])
    # What an earlier run wrote for another dataset stays; --fresh drops it.
    assert set(r["datasets"]) == {"ml-100k/u1", "ml-100k/u2"} and r["datasets"]["ml-100k/u2"] == {"kept": True}
    assert bench.main(argv + ["--fresh"]) == 0
    assert set(json.loads(out.read_text())["datasets"]) == {"ml-100k/u1"}
    spec = importlib.util.spec_from_file_location("study_table", BENCH.parent / "study_table.py")
    tab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tab)
    text = tab.table("ml-100k/u1", json.loads(out.read_text())["datasets"]["ml-100k/u1"])
    assert "| PPO on bias |" in text and "| bpr_top1 |" in text and "Holm p" in text


def test_bench_study_refuses_bad_arguments_in_one_line(capsys):
    spec = importlib.util.spec_from_file_location("bench_study", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as e:
        bench.main(["--datasets", "ml-100k"])
    assert e.value.code == 2 and "expected DATASET/SPLIT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--seeds", "0"])
    assert "study.seeds" in capsys.readouterr().err.splitlines()[-1]
