"""Typed config loading: unknown keys, wrong types and non-mapping sections are clear errors."""

from __future__ import annotations

import argparse

import pytest

from rlsim.cli import apply_flags, data_config
from rlsim.config import DataConfig, from_dict
from rlsim.errors import ConfigError


def test_from_dict_checks_keys_types_and_sections():
    cfg = from_dict(DataConfig, {"dataset": "ml-1m", "test_frac": 1}, "data")
    assert cfg.dataset == "ml-1m" and cfg.test_frac == 1.0 and isinstance(cfg.test_frac, float)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['splt'\] in config section 'data'"):
        from_dict(DataConfig, {"splt": "u1"}, "data")
    with pytest.raises(ConfigError, match="'data.seed' must be int"):
        from_dict(DataConfig, {"seed": "zero"}, "data")
    with pytest.raises(ConfigError, match="section 'data' must be a mapping, got list"):
        from_dict(DataConfig, ["u1"], "data")


def test_flags_win_over_file_and_absent_flags_do_not(monkeypatch):
    monkeypatch.delenv("RLSIM_DATA_DIR", raising=False)
    monkeypatch.delenv("RLSIM_CACHE_DIR", raising=False)
    args = argparse.Namespace(split="u3", seed=None, data_dir="/d", cache_dir=None)
    cfg = data_config(args, {"data": {"split": "u1", "seed": 7}})
    assert (cfg.split, cfg.seed, cfg.data_dir) == ("u3", 7, "/d")
    cfg2 = apply_flags(DataConfig(), argparse.Namespace(n=5), [("n", "seed"), ("missing", "split")])
    assert cfg2.seed == 5 and cfg2.split == "u1"
