"""Train/test splits: the official folds, and seeded per-user temporal and random hold-outs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from rlsim.data.schema import Dataset
from rlsim.errors import DataError

GENERATED_SPLITS = ("temporal", "random")


@dataclass
class Split:
    name: str
    train: pd.DataFrame
    test: pd.DataFrame

    def summary(self) -> dict:
        return {"split": self.name, "train": int(len(self.train)), "test": int(len(self.test)),
                "train_users": int(self.train.user_id.nunique()), "test_users": int(self.test.user_id.nunique())}


def _per_user_holdout(ratings: pd.DataFrame, frac: float, seed: int, by_time: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    if not 0.0 < frac < 1.0:
        raise DataError(f"test fraction must be in (0, 1), got {frac}")
    rng = np.random.default_rng(seed)
    df = ratings.reset_index(drop=True)
    # A seeded random key breaks timestamp ties (and is the whole order for the random split).
    tie = rng.random(len(df))
    user = df["user_id"].to_numpy()
    order = np.lexsort((tie, df["timestamp"].to_numpy(), user)) if by_time else np.lexsort((tie, user))
    del tie
    # Each user's rows are a run of the sorted order; the last n_test of a run are the test rows.
    # Plain arrays, no sorted copy of the whole frame (10M+ ratings).
    u = user[order]
    n_rows = len(u)
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if n_rows else np.zeros(0, np.int64)
    del u
    ends = np.r_[starts[1:], n_rows].astype(np.int64)
    sizes = ends - starts
    # Each user keeps at least one training rating; users with one rating stay in train only.
    n_test = np.minimum(np.floor(sizes * frac + 0.5).astype(np.int64), sizes - 1)
    mark = np.zeros(n_rows + 1, np.int32)
    np.add.at(mark, ends - n_test, 1)
    np.add.at(mark, ends, -1)
    is_test = np.cumsum(mark[:-1], dtype=np.int32) > 0
    del mark
    test_rows = order[is_test]
    train_rows = order[~is_test]
    del order, is_test
    return df.take(train_rows).reset_index(drop=True), df.take(test_rows).reset_index(drop=True)


def make_split(ds: Dataset, split: str, seed: int = 0, test_frac: float = 0.2) -> Split:
    """An official fold by name (e.g. 'u1'), or 'temporal' / 'random' (last/random test_frac per user)."""
    if split in ds.official_splits:
        train, test = ds.official_splits[split]
        return Split(split, train.reset_index(drop=True), test.reset_index(drop=True))
    if split == "temporal":
        from rlsim.data.schema import has_timestamps

        if not has_timestamps(ds.ratings):
            raise DataError(f"split 'temporal' needs timestamps and {ds.name} has none (every user's are equal): "
                            "use --split random")
        train, test = _per_user_holdout(ds.ratings, test_frac, seed, by_time=True)
    elif split == "random":
        train, test = _per_user_holdout(ds.ratings, test_frac, seed, by_time=False)
    else:
        known = sorted(ds.official_splits) + list(GENERATED_SPLITS)
        raise DataError(f"unknown split '{split}' for {ds.name} (known: {', '.join(known)})")
    return Split(split, train, test)


def holdout_validation(train: pd.DataFrame, frac: float = 0.1, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A per-user random validation set carved out of a training set (for early stopping)."""
    return _per_user_holdout(train, frac, seed, by_time=False)


def temporal_validation(train: pd.DataFrame, frac: float = 0.2, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rest, validation): the last ``frac`` of each user's training ratings by time, as the temporal
    split carves its test set (ties broken by the seed); users with one rating stay in ``rest``."""
    return _per_user_holdout(train, frac, seed, by_time=True)
