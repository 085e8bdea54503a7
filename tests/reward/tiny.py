"""A tiny random ratings table with items, users (demographics) and text vectors, for model tests."""

from __future__ import annotations

import numpy as np
import pandas as pd


def tiny_ratings(n: int, n_items: int, n_users: int = 20, seed: int = 0):
    """(train, items, users, text): n random ratings of n_users - 1 users on n_items - 1 movies (ids from
    1), one rating per pair, and random 8-wide genre and plot vectors per movie."""
    rng = np.random.default_rng(seed)
    train = pd.DataFrame({"user_id": rng.integers(1, n_users, n), "item_id": rng.integers(1, n_items, n),
                          "rating": rng.integers(1, 6, n).astype(float)}).drop_duplicates(["user_id", "item_id"])
    items = pd.DataFrame({"item_id": np.arange(1, n_items)})
    users = pd.DataFrame({"user_id": np.arange(1, n_users), "age": pd.array([30] * (n_users - 1), dtype="Int64"),
                          "gender": "M", "occupation": "writer"})
    text = {k: rng.normal(size=(n_items - 1, 8)).astype(np.float32) for k in ("genre", "plot")}
    return train, items, users, text
