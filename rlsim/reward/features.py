"""Lookup tables the model reads: id maps, frozen item text vectors, demographics, rating history.

Everything here is computed once per training run (text through rlsim.embeddings, which caches on
disk) and saved in the checkpoint, so prediction never touches the dataset files or a text model.
Index 0 of every id table is the reserved "unknown" row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

AGE_EDGES = (18, 25, 35, 45, 50, 56)  # the ml-1m age groups; bucket 0 = unknown


@dataclass
class FeatureTables:
    user_ids: np.ndarray  # train users; user_ids[k] has index k + 1
    item_ids: np.ndarray  # train items; same convention
    text_item_ids: np.ndarray  # every item of the dataset with text; row k + 1 (row 0 = zeros)
    genre: np.ndarray  # [len(text_item_ids) + 1, d_text] float32
    plot: np.ndarray
    demo_user_ids: np.ndarray  # users with demographics; demo row k + 1
    demo: np.ndarray  # [len(demo_user_ids) + 1, 3] int64: age bucket, gender, occupation (0 = unknown)
    n_occupations: int
    hist_users: np.ndarray  # (user index, item index) pairs of the training ratings
    hist_items: np.ndarray
    hist_ratings: np.ndarray  # the rating of each history pair

    def __post_init__(self):
        self._u = pd.Index(self.user_ids)
        self._i = pd.Index(self.item_ids)
        self._t = pd.Index(self.text_item_ids)
        self._d = pd.Index(self.demo_user_ids)
        keys = self.hist_users.astype(np.int64) * self.n_items + self.hist_items
        order = np.argsort(keys, kind="stable")
        self._hist_keys, self._hist_r = keys[order], self.centred_ratings()[order]

    @property
    def mean_rating(self) -> float:
        return float(self.hist_ratings.mean()) if len(self.hist_ratings) else 0.0

    def centred_ratings(self) -> np.ndarray:
        # Centred on the global mean, never on the user's own mean: a user mean would include the
        # rating being predicted, and the sum of the other centred ratings would give it away.
        return (self.hist_ratings - self.mean_rating).astype(np.float32)

    @staticmethod
    def _lookup(index: pd.Index, ids) -> np.ndarray:
        pos = index.get_indexer(np.asarray(ids))
        return (pos + 1).astype(np.int64)  # -1 (missing) becomes the unknown row 0

    def encode(self, users, items) -> dict[str, np.ndarray]:
        """Index arrays for (user_id, item_id) pairs; unknown ids map to row 0, never fail."""
        u, i = self._lookup(self._u, users), self._lookup(self._i, items)
        return {"user": u, "item": i, "text": self._lookup(self._t, items), "demo": self._lookup(self._d, users),
                "self_r": self.own_rating(u, i)}

    def in_history(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        """1.0 where the pair is among the training ratings (a pick the choice head must not see), else 0."""
        w = np.zeros(len(u), np.float32)
        if len(self._hist_keys) == 0:
            return w
        keys = u.astype(np.int64) * self.n_items + i
        pos = np.clip(np.searchsorted(self._hist_keys, keys), 0, len(self._hist_keys) - 1)
        w[(self._hist_keys[pos] == keys) & (u > 0) & (i > 0)] = 1.0
        return w

    def own_rating(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        """The pair's own centred rating when it is in the rating history (else 0), so the model can
        leave it out of the history tokens: a rating never predicts itself."""
        w = np.zeros(len(u), np.float32)
        if len(self._hist_keys) == 0:
            return w
        keys = u.astype(np.int64) * self.n_items + i
        pos = np.clip(np.searchsorted(self._hist_keys, keys), 0, len(self._hist_keys) - 1)
        hit = (self._hist_keys[pos] == keys) & (u > 0) & (i > 0)
        w[hit] = self._hist_r[pos[hit]]
        return w

    @property
    def n_users(self) -> int:
        return len(self.user_ids) + 1

    @property
    def n_items(self) -> int:
        return len(self.item_ids) + 1

    def to_state(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_state(cls, state: dict) -> "FeatureTables":
        return cls(**{k: (np.asarray(v) if not isinstance(v, int) else v) for k, v in state.items()})


def _demographics(users: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, int]:
    users = users.dropna(subset=["user_id"])
    has = users["age"].notna() | users["gender"].fillna("").astype(str).ne("") | \
        users["occupation"].fillna("").astype(str).ne("")
    users = users[has]
    occs = sorted(set(users["occupation"].fillna("").astype(str)) - {""})
    occ_idx = {o: k + 1 for k, o in enumerate(occs)}
    age = users["age"].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    age_b = np.where(np.isnan(age), 0, np.searchsorted(AGE_EDGES, np.nan_to_num(age), side="right") + 1)
    gender = users["gender"].map({"M": 1, "F": 2}).fillna(0).to_numpy()
    occ = users["occupation"].fillna("").astype(str).map(occ_idx).fillna(0).to_numpy()
    demo = np.zeros((len(users) + 1, 3), np.int64)
    demo[1:] = np.stack([age_b, gender, occ], 1).astype(np.int64)
    return users["user_id"].to_numpy(np.int64), demo, len(occs) + 1


def build_features(items: pd.DataFrame, users: pd.DataFrame, train: pd.DataFrame,
                   text: dict[str, np.ndarray]) -> FeatureTables:
    """Tables from the dataset's items/users, the training ratings and item_embeddings(items) output."""
    user_ids = np.unique(train["user_id"].to_numpy(np.int64))
    item_ids = np.unique(train["item_id"].to_numpy(np.int64))
    d = text["genre"].shape[1]
    genre = np.vstack([np.zeros((1, d), np.float32), text["genre"].astype(np.float32)])
    plot = np.vstack([np.zeros((1, d), np.float32), text["plot"].astype(np.float32)])
    demo_users, demo, n_occ = _demographics(users)
    ft = FeatureTables(user_ids, item_ids, items["item_id"].to_numpy(np.int64), genre, plot,
                       demo_users, demo, n_occ, np.zeros(0, np.int64), np.zeros(0, np.int64),
                       np.zeros(0, np.float32))
    idx = ft.encode(train["user_id"].to_numpy(), train["item_id"].to_numpy())
    return FeatureTables(**{**ft.to_state(), "hist_users": idx["user"], "hist_items": idx["item"],
                            "hist_ratings": train["rating"].to_numpy(np.float32)})
