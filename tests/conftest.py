"""Shared fixtures: generated MovieLens folders, and the real data folder when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fixtures import write_latest_small, write_ml1m, write_ml100k, write_overviews

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The developer's data and cache folders, taken out of the environment of the whole session (its Ray
# heads and subprocesses too): the environment wins over a YAML's data_dir / cache_dir
# (rlsim.run_config: YAML < environment < flags), and the tests say where their data is. Only the
# real-data tests (real_data_dir) and warm-cache reads (WARM_CACHE_DIR) use them.
REAL_DATA_DIR = os.environ.pop("RLSIM_DATA_DIR", None)
WARM_CACHE_DIR = os.environ.pop("RLSIM_CACHE_DIR", None)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A folder with ml-100k (with overviews), ml-latest-small and ml-1m fixtures."""
    root = tmp_path_factory.mktemp("data")
    write_ml100k(root)
    write_overviews(root)
    write_latest_small(root)
    write_ml1m(root)
    return root


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    """A cache shared by the session so text embeddings are computed once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def ml100k(data_root, cache_root):
    from rlsim.data import load_movielens

    return load_movielens("ml-100k", data_dir=data_root, cache_dir=cache_root, download=False)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    d = REAL_DATA_DIR
    if not d or not (Path(d) / "ml-100k" / "u.data").is_file():
        pytest.skip("real MovieLens data not available (set RLSIM_DATA_DIR)")
    return Path(d)


SMALL_REWARD = dict(dim=16, layers=1, heads=2, ff_dim=32, text_hidden=32, epochs=2, batch_size=256)


@pytest.fixture(scope="session")
def tiny_reward_checkpoint(data_root, cache_root, tmp_path_factory) -> Path:
    """A small reward model trained on the ml-100k fixture (u1), shared by the tests that need one."""
    from rlsim.config import DataConfig
    from rlsim.reward.config import RewardConfig
    from rlsim.reward.train import train_reward_model

    out = tmp_path_factory.mktemp("tiny-reward")
    dcfg = DataConfig(dataset="ml-100k", split="u1", data_dir=str(data_root), cache_dir=str(cache_root),
                      download=False)
    train_reward_model(dcfg, RewardConfig(**SMALL_REWARD), out)
    return out / "checkpoint"
