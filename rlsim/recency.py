"""Time-local popularity: how much a movie was watched around the time the user was last active.

In a temporal split a user's next watches follow what was being watched when they were active
(new releases, trends), not the whole history's counts. From the TRAINING ratings only:

    s(u, i) = sum over training picks (v, i, t) of  K(t, T_u),   K = 2 ** (-|t - t'| / half_life)

with T_u the user's time profile: their training timestamps weighted ``2 ** (-(last_u - t) /
user_half_life)`` (``user_half_life`` 0: their last training time only; inf: all alike) and
normalised to one.
Time is binned (days, at most ``max_bins`` bins, and users x bins at most ``max_cells``, so the
table stays small at any size) so the sums are two small matrix products:
the user's profile over bins x the kernel between bins x the (bin x movie) pick counts. The
result is rescaled to the size of the global counts (``scale_``) so that log1p of it means the
same at a busy and at a quiet time. A user or movie the training ratings never saw scores 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

DAY = 86_400


@dataclass
class TimeLocalPopularity:
    half_life: float = 90.0  # days
    user_half_life: float = 0.0  # days; 0: the user's last training time only
    max_bins: int = 2000
    max_cells: int = 10_000_000  # users x bins of the per-user kernel table (80 MB)

    def fit(self, train: pd.DataFrame) -> "TimeLocalPopularity":
        df = train.drop_duplicates(["user_id", "item_id"])  # a movie rated twice is one pick
        t = df["timestamp"].to_numpy(np.int64)
        t0 = int(t.min()) if len(t) else 0
        days = (t - t0) / DAY
        span = float(days.max()) if len(days) else 0.0
        n_users = max(int(df["user_id"].nunique()), 1)
        bins = max(1, min(self.max_bins, self.max_cells // n_users))
        self.width = max(1.0, span / bins)  # days per bin
        nb = max(1, min(bins, int(np.ceil(span / self.width))))
        b = np.minimum((days / self.width).astype(np.int64), nb - 1)  # the last moment joins the last bin
        self.users_ = pd.Index(np.unique(df["user_id"].to_numpy()))
        self.items_ = pd.Index(np.unique(df["item_id"].to_numpy()))
        u = self.users_.get_indexer(df["user_id"].to_numpy())
        i = self.items_.get_indexer(df["item_id"].to_numpy())
        # Picks per (bin, movie), stored movie-major for gathering by movie.
        self.c_ = sparse.csr_matrix((np.ones(len(i)), (i, b)), shape=(len(self.items_), nb))
        # The user's time profile over bins.
        last = np.zeros(len(self.users_))
        np.maximum.at(last, u, days)
        age = last[u] - days
        w = (age <= 0).astype(float) if self.user_half_life <= 0 else 2.0 ** (-age / self.user_half_life)
        h = sparse.csr_matrix((w, (u, b)), shape=(len(self.users_), nb))
        h = sparse.csr_matrix(h.multiply(1 / np.maximum(np.asarray(h.sum(1)).ravel(), 1e-12)[:, None]))
        centre = np.arange(nb) * self.width
        kern = 2.0 ** (-np.abs(centre[:, None] - centre[None, :]) / max(self.half_life, 1e-9))
        self.uk_ = np.asarray(h @ kern)  # [users, bins]: the kernel around each user's profile
        # Scale: a user's kernel-weighted picks summed over all movies, against the total number of picks.
        mass = self.uk_ @ np.asarray(self.c_.sum(0)).ravel()
        self.scale_ = len(df) / np.maximum(mass, 1e-12)
        return self

    def score(self, users, items) -> np.ndarray:
        """Time-local pick count of each (user, movie) pair, on the scale of the global counts."""
        u = self.users_.get_indexer(np.asarray(users).ravel())
        i = self.items_.get_indexer(np.asarray(items).ravel())
        ok = np.flatnonzero((u >= 0) & (i >= 0))
        out = np.zeros(len(u))
        if len(ok):
            g = self.c_[i[ok]].tocoo()  # row r of g: pair ok[r]'s movie, its picks per bin
            v = g.data * self.uk_[u[ok][g.row], g.col]
            out[ok] = np.bincount(g.row, v, len(ok)) * self.scale_[u[ok]]
        return out
