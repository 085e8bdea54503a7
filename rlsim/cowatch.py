"""Co-watch affinity: "users who watched what you watched also watched this" (PureSVD).

The policy sees each candidate through features built from the training ratings only
(rlsim.env). Text similarity says what a movie is about; it does not say whether this user would
pick it. PureSVD (Cremonesi et al., 2010) does, cheaply and at any size: a truncated SVD of the
binary user x movie matrix of training ratings, V = its top ``dims`` right singular vectors, and
the affinity of user u for movie i is (x_u V) . V_i, the user's history projected back onto the
movie. A simulated user whose choice model rewards watched movies can teach a policy to use it;
one that only rates cannot, which is what the study measures.

``dims`` is chosen on a seeded validation slice of each user's training ratings (one held-back
movie against 9 unrated ones, as the choice trials of rlsim.simulators.choice), never on test data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.sparse.linalg import svds

DIMS_GRID = (16, 32, 64)


@dataclass
class CoWatch:
    dims: int = 32
    seed: int = 0

    def fit(self, train: pd.DataFrame) -> "CoWatch":
        users = np.unique(train["user_id"].to_numpy())
        items = np.unique(train["item_id"].to_numpy())
        rows = np.searchsorted(users, train["user_id"].to_numpy())
        cols = np.searchsorted(items, train["item_id"].to_numpy())
        x = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), (len(users), len(items)))
        x.data[:] = 1.0  # a movie rated twice is still one watch
        return self.fit_matrix(x, users, items)

    def fit_matrix(self, x: sparse.csr_matrix, users: np.ndarray, items: np.ndarray) -> "CoWatch":
        """fit() from a binary user x movie matrix already built (rows ``users``, columns ``items``)."""
        self.users_, self.items_, self.x_ = pd.Index(users), pd.Index(items), x
        k = max(1, min(self.dims, min(x.shape) - 1))
        # ARPACK's start vector is random: a fixed one makes the factors reproducible.
        v0 = np.random.default_rng(self.seed).standard_normal(min(x.shape))
        _, _, vt = svds(x, k=k, v0=v0)
        self.v_ = np.ascontiguousarray(vt.T)  # [items, k]
        self.u_ = np.asarray(x @ self.v_)  # [users, k]: each history projected
        return self

    def score(self, users, items) -> np.ndarray:
        """Affinity of each (user, movie) pair; 0 for a user or movie the training ratings never saw."""
        u = self.users_.get_indexer(np.asarray(users).ravel())
        i = self.items_.get_indexer(np.asarray(items).ravel())
        ok = (u >= 0) & (i >= 0)
        out = np.zeros(len(u))
        out[ok] = np.einsum("nd,nd->n", self.u_[u[ok]], self.v_[i[ok]])
        return out

    def score_with(self, users, items, extra) -> np.ndarray:
        """score() with each pair's ``extra`` movies (a session's) added to the user's history
        (a user the training ratings never saw starts from an empty one)."""
        users, items = np.asarray(users).ravel(), np.asarray(items).ravel()
        u = self.users_.get_indexer(users)
        i = self.items_.get_indexer(items)
        vec = np.where((u >= 0)[:, None], self.u_[np.maximum(u, 0)], 0.0)
        for row, movies in enumerate(extra):
            j = self.items_.get_indexer(np.asarray(movies, np.int64)) if len(movies) else np.array([], int)
            j = j[j >= 0]
            if u[row] >= 0 and len(j):  # a movie already in the history is not counted twice
                j = j[self.x_[u[row], j].toarray().ravel() == 0]
            vec[row] += self.v_[j].sum(0)
        return np.where(i >= 0, np.einsum("nd,nd->n", vec, self.v_[np.maximum(i, 0)]), 0.0)


def select_dims(train: pd.DataFrame, grid=DIMS_GRID, seed: int = 0, negatives: int = 9) -> tuple[int, dict]:
    """The ``dims`` of the grid whose held-back movie ranks first among ``negatives`` unrated ones
    most often, on a validation slice of the training ratings; and every grid point's accuracy."""
    from rlsim.data.splits import holdout_validation

    rest, val = holdout_validation(train, 0.1, seed)
    val = val[val["user_id"].isin(rest["user_id"]) & val["item_id"].isin(rest["item_id"])]
    if not len(val):
        return int(grid[len(grid) // 2]), {}
    rng = np.random.default_rng(seed)
    items = np.unique(rest["item_id"].to_numpy())
    nu = np.repeat(val["user_id"].to_numpy(), negatives)
    ni = rng.choice(items, len(nu))
    # A drawn movie the user did rate is no negative: it is left out of its trial.
    rated = pd.MultiIndex.from_arrays([nu, ni]).isin(pd.MultiIndex.from_frame(train[["user_id", "item_id"]]))
    acc = {}
    for d in grid:
        m = CoWatch(d, seed).fit(rest)
        pos = m.score(val["user_id"], val["item_id"])
        ns = np.where(rated, -np.inf, m.score(nu, ni)).reshape(len(val), negatives)
        acc[int(d)] = float(np.mean(pos > ns.max(1)))
    return max(acc, key=acc.get), acc


def candidate_features(model: CoWatch, user_ids: np.ndarray, cand_items: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """[U, K, 2]: the affinity over the user's best candidate's, and its rank among the user's
    valid candidates in [0, 1] (1 = the highest); 0 where padded."""
    s = model.score(np.broadcast_to(user_ids[:, None], cand_items.shape), cand_items).reshape(cand_items.shape)
    s = np.where(valid, s, -np.inf)
    top = np.abs(np.where(valid, s, 0)).max(1, keepdims=True)
    rel = np.where(valid, s / np.maximum(top, 1e-12), 0.0)
    order = np.argsort(np.argsort(s, 1), 1)  # padded (-inf) rank lowest
    n = valid.sum(1, keepdims=True)
    rank = np.where(valid, (order - (cand_items.shape[1] - n)) / np.maximum(n - 1, 1), 0.0)
    return np.stack([rel, rank], 2)
