"""Typed config loading: unknown keys, wrong types and non-mapping sections are clear errors."""

from __future__ import annotations

import pytest

from rlsim.config import DataConfig, from_dict
from rlsim.errors import ConfigError
from rlsim.run_config import resolve


def test_from_dict_checks_keys_types_and_sections():
    cfg = from_dict(DataConfig, {"dataset": "ml-1m", "test_frac": 1}, "data")
    assert cfg.dataset == "ml-1m" and cfg.test_frac == 1.0 and isinstance(cfg.test_frac, float)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['splt'\] in config section 'data'"):
        from_dict(DataConfig, {"splt": "u1"}, "data")
    with pytest.raises(ConfigError, match="'data.seed' must be int"):
        from_dict(DataConfig, {"seed": "zero"}, "data")
    with pytest.raises(ConfigError, match="section 'data' must be a mapping, got list"):
        from_dict(DataConfig, ["u1"], "data")


def test_flags_win_over_file_and_absent_flags_do_not():
    run = resolve({"data": {"split": "u1", "seed": 7}}, {}, {"split": "u3", "seed": None, "data_dir": "/d",
                                                             "cache_dir": None})
    assert (run.data.split, run.data.seed, run.data.data_dir) == ("u3", 7, "/d")
