"""rlsim.run_config.resolve: one typed run config, in the order YAML < environment < flags."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from rlsim.cli import build_parser, main
from rlsim.errors import ConfigError
from rlsim.run_config import SECTIONS, api_key, personas_for, resolve

SECRET = "sk-test-secret-never-written"


def test_order_yaml_env_flags():
    sections = {"data": {"cache_dir": "/yaml/cache", "data_dir": "/yaml/data", "split": "u2"}}
    env = {"RLSIM_CACHE_DIR": "/env/cache", "RLSIM_DATA_DIR": "/env/data"}
    run = resolve(sections, env, {"cache_dir": "/flag/cache"})
    assert run.data.cache_dir == "/flag/cache"  # in all three: the flag
    assert run.data.data_dir == "/env/data"  # in YAML and the environment: the environment
    assert run.data.split == "u2"  # only in YAML
    assert run.origin["data.cache_dir"] == "flag" and run.origin["data.data_dir"] == "env"
    assert run.origin["data.split"] == "yaml"
    # The persona endpoint follows the same order.
    p = {"personas": {"base_url": "http://yaml/v1"}}
    assert resolve(p, {"OPENAI_BASE_URL": "http://env/v1"}, {}).personas.base_url == "http://env/v1"
    assert resolve(p, {"OPENAI_BASE_URL": "http://env/v1"}, {"base_url": "http://flag/v1"}).personas.base_url \
        == "http://flag/v1"
    assert resolve(p, {}, {}).personas.base_url == "http://yaml/v1"


def test_the_cli_applies_the_order(tmp_path, monkeypatch):
    from rlsim.cli import run_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  cache_dir: /yaml/cache\n  seed: 3\nreward:\n  epochs: 9\n")
    monkeypatch.setenv("RLSIM_CACHE_DIR", "/env/cache")
    args = build_parser().parse_args(["reward", "train", "--config", str(cfg), "--out", "o", "--seed", "5"])
    run = run_config(args)
    assert (run.data.cache_dir, run.data.seed, run.reward.seed, run.reward.epochs) == ("/env/cache", 5, 5, 9)


def test_every_section_of_the_shipped_configs_is_typed():
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent / "configs"
    for path in sorted(root.glob("*.yaml")):
        run = resolve(path, {}, {})
        raw = yaml.safe_load(path.read_text())
        for name, values in raw.items():
            assert name in SECTIONS, (path.name, name)
            section = getattr(run, name)
            for key, value in values.items():
                assert getattr(section, key) == value, (path.name, name, key)


def test_unknown_section_and_key_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown config section\(s\) \['rewrd'\]"):
        resolve({"rewrd": {"epochs": 3}}, {}, {})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epoch'\] in config section 'reward'"):
        resolve({"reward": {"epoch": 3}}, {}, {})
    with pytest.raises(ConfigError, match="section 'hybrid' must be a mapping"):
        resolve({"hybrid": [1]}, {}, {})
    for text, what in (("rewrd:\n  epochs: 3\n", "unknown config section(s) ['rewrd']"),
                       ("policy:\n  iteratons: 3\n", "unknown key(s) ['iteratons'] in config section 'policy'")):
        cfg = tmp_path / "bad.yaml"
        cfg.write_text(text)
        assert main(["baselines", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("rlsim: error: ") and what in err, err
    assert not (tmp_path / "o").exists()


def test_switches_and_parsed_flags():
    run = resolve({}, {}, {"no_download": True, "calibrate": False, "weights": "0.25,0.75", "sources": "bias, mf,",
                           "stages": ["data"]})
    assert run.data.download is False and run.personas.calibrate is False
    c = run.candidates
    assert (c.pop_weight, c.sim_weight, c.tune_weights) == (0.25, 0.75, False)
    assert run.study.sources == ["bias", "mf"] and run.pipeline.stages == ["data"]
    with pytest.raises(ConfigError, match="--weights must be POP,SIM"):
        resolve({}, {}, {"weights": "half"})


def test_the_key_stays_out_of_the_config():
    env = {"OPENAI_API_KEY": SECRET, "OPENAI_BASE_URL": "http://env/v1"}
    run = resolve({"personas": {"backend": "openai", "model": "m"}}, env, {})
    assert SECRET not in repr(run) and SECRET not in str(dataclasses.asdict(run))
    assert api_key(personas_for(run, "pool"), env) == SECRET
    with pytest.raises(ConfigError, match="needs OPENAI_API_KEY"):
        api_key(personas_for(resolve({"personas": {"backend": "openai"}}, {}, {}), "pool"), {})


def test_personas_backend_for_each_use():
    endpoint = {"OPENAI_BASE_URL": "http://env/v1"}
    # pool: auto (or no backend given) is openai when an endpoint is configured, else offline
    assert personas_for(resolve({}, endpoint, {}), "pool").backend == "openai"
    assert personas_for(resolve({}, {}, {}), "pool").backend == "offline"
    assert personas_for(resolve({"personas": {"backend": "offline"}}, endpoint, {}), "pool").backend == "offline"
    assert personas_for(resolve({}, endpoint, {"backend": "offline"}), "pool").backend == "offline"
    # the run config itself keeps the backend as given: the in-process persona stays the offline one
    assert resolve({}, endpoint, {}).personas.backend == "offline"
    # llm: an LLM persona asks an LLM
    assert personas_for(resolve({"personas": {"backend": "offline"}}, endpoint, {}), "llm").backend == "openai"
    azure = {"AZURE_OPENAI_ENDPOINT": "https://a.example", "OPENAI_API_VERSION": "2025-01-01"}
    assert resolve({}, azure, {}).personas.api_version == "2025-01-01"
    assert resolve({}, azure, {"base_url": "http://other/v1"}).personas.api_version is None


def test_verbose_from_flag_or_environment():
    assert resolve({}, {"RLSIM_VERBOSE": "1"}, {}).verbose is True
    assert resolve({}, {"RLSIM_VERBOSE": ""}, {}).verbose is False
    assert resolve({}, {}, {"verbose": True}).verbose is True



def test_flags_not_given_leave_the_yaml_alone(tmp_path):
    """argparse defaults are None: `personas profile` without --kind keeps the YAML's personas.profile."""
    from rlsim.cli import run_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("personas:\n  profile: psych\n")
    args = build_parser().parse_args(["personas", "profile", "--config", str(cfg), "--out", "o"])
    assert run_config(args).personas.profile == "psych"
    args = build_parser().parse_args(["personas", "profile", "--config", str(cfg), "--out", "o", "--kind", "lusifer"])
    assert run_config(args).personas.profile == "lusifer"
