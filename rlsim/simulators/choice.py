"""Would the user pick this movie now? Choice models, learned from which movies users rated.

A rating simulator answers "how would I rate it if I watched it"; a choice model answers "would I
watch it if it were shown to me now". MovieLens has no impressions, so choice is learned from the
implicit signal of the TRAINING ratings only: a rated (user, movie) is a pick, and movies the user
never rated, drawn at random (``negatives`` per pick, seeded), are the movies passed over. The
probabilities are those of such a page: one watched movie among ``negatives`` unwatched ones
(Agent4Rec shows pages of a few movies; ``negatives=3`` is a page of four). A movie already shown
in the session is not picked again.

Each model scores a pair from the training histories and maps its features through a logistic
link. The link is fitted on a seeded validation slice of each user's training ratings, scored
from the rest, so that its picks look like the held-out ones it is judged on (a training pick
would otherwise vote for itself); then the histories are refitted on all training ratings.

- :class:`PopularityChoice`: the movie's training count and the user's activity. The reference
  every source's choice must beat.
- :class:`BPRChoice`: implicit matrix factorisation (BPR) of the watched movies, plus popularity.
  MF's choice.
- :class:`NeighbourChoice`: the user's ``k`` nearest neighbours by cosine over binary histories,
  each voting with its similarity for the movies it watched, the co-watch affinity of
  rlsim.cowatch (PureSVD: "people who watched what I watched watched it"), plus popularity. The
  offline persona's choice: "people like me watched it". The session's movies join the history
  of both.

Both are ``fit(train) -> self`` / ``probability(users, items, sessions) -> [n]``, as Surprise's
algorithms are fit/predict.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.optimize import minimize

from rlsim.simulators.base import Sessions, check_sessions


def sample_negatives(picks: pd.DataFrame, rated: pd.DataFrame, negatives: int, seed: int) -> pd.DataFrame:
    """user_id, item_id of ``negatives`` catalogue movies per pick that the user never rated (seeded)."""
    rng = np.random.default_rng(seed)
    items = np.unique(rated["item_id"].to_numpy())
    known = pd.MultiIndex.from_frame(rated[["user_id", "item_id"]])
    u = np.repeat(picks["user_id"].to_numpy(), negatives)
    i = rng.choice(items, len(u))
    for _ in range(20):  # redraw the few that hit a rated movie (users rate a small share)
        bad = pd.MultiIndex.from_arrays([u, i]).isin(known)
        if not bad.any():
            break
        i[bad] = rng.choice(items, int(bad.sum()))
    keep = ~pd.MultiIndex.from_arrays([u, i]).isin(known)
    return pd.DataFrame({"user_id": u[keep], "item_id": i[keep]})


def not_shown(p: np.ndarray, items, sessions: Sessions) -> np.ndarray:
    """Every choice model's rule: what this session already showed is not picked again (p = 0)."""
    if sessions is not None:
        shown = np.fromiter((int(i) in s.items for i, s in zip(items, sessions)), bool, len(p))
        p[shown] = 0.0
    return p


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-4) -> np.ndarray:
    """Weights (bias last) of a logistic regression: a few features, so L-BFGS on the exact loss."""
    xb = np.hstack([x, np.ones((len(x), 1))])

    def loss(w):
        z = xb @ w
        g = xb.T @ (1 / (1 + np.exp(-z)) - y) / len(y) + l2 * np.r_[w[:-1], 0]
        return (np.logaddexp(0, z) - y * z).mean() + 0.5 * l2 * (w[:-1] ** 2).sum(), g

    return minimize(loss, np.zeros(xb.shape[1]), jac=True, method="L-BFGS-B").x


class _LogisticChoice:
    """fit/probability around ``_fit_histories(train)``, ``features(users, items) -> [n, k]`` and a
    logistic link fitted on a validation slice of the training ratings."""

    name = "choice"
    conditions_on_session = False  # True: the session's watched movies move the choice, not only exclude

    # Settings of the time-local popularity feature (rlsim.recency) to choose among on the validation
    # slice: (half-life of the kernel, half-life of the user's own time profile: 0 their last time,
    # inf all their times alike), in days; None: without it.
    RECENCY = (None, *((h, u) for h in (30.0, 90.0, 365.0, 1000.0) for u in (0.0, float("inf"))))

    def __init__(self, negatives: int = 3, seed: int = 0, val_frac: float = 0.1, max_link_picks: int = 50_000,
                 recency_grid: tuple | None = None):
        self.negatives, self.seed, self.val_frac, self.max_link_picks = negatives, seed, val_frac, max_link_picks
        self.recency_grid = self.RECENCY if recency_grid is None else tuple(recency_grid)
        self.time_kernel, self.recency = None, None

    def _fit_histories(self, train: pd.DataFrame) -> None:
        raise NotImplementedError

    def features(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def candidates(self) -> list[dict]:
        """Settings to choose among on the validation slice (none by default)."""
        return [{}]

    def fit(self, train: pd.DataFrame):
        from rlsim.data.schema import has_timestamps
        from rlsim.data.splits import holdout_validation

        rest, val = holdout_validation(train, self.val_frac, self.seed)
        if len(val) > self.max_link_picks:  # a link of three weights: a sample of picks is plenty
            val = val.sample(self.max_link_picks, random_state=self.seed)
        neg = sample_negatives(val, train, self.negatives, self.seed)
        users = np.r_[val["user_id"].to_numpy(), neg["user_id"].to_numpy()]
        items = np.r_[val["item_id"].to_numpy(), neg["item_id"].to_numpy()]
        y = np.r_[np.ones(len(val)), np.zeros(len(neg))]
        grid = self.recency_grid if "timestamp" in train and has_timestamps(train) else (None,)
        recent = {h: self._recent_feature(rest, h, users, items) for h in grid}
        best = None
        for setting in self.candidates():  # chosen on the validation slice, never on test data
            for k, v in setting.items():
                setattr(self, k, v)
            self._fit_histories(rest)
            base = self.features(users, items)
            for h in grid:  # the time-local popularity feature too, or none
                x = base if h is None else np.column_stack([base, recent[h]])
                w = _fit_logistic(x, y)
                z = np.hstack([x, np.ones((len(x), 1))]) @ w
                loss = float((np.logaddexp(0, z) - y * z).mean())
                if best is None or loss < best[0]:
                    best = (loss, {**setting, "time_kernel": h}, w)
        self.validation_log_loss, self.chosen, self.w = best
        for k, v in self.chosen.items():
            setattr(self, k, v)
        self.link_picks = int(len(val))
        self._fit_histories(train)
        self.recency = None if self.time_kernel is None else self._recency(train, self.time_kernel)
        return self

    @staticmethod
    def _recency(train: pd.DataFrame, kernel: tuple):
        from rlsim.recency import TimeLocalPopularity

        return TimeLocalPopularity(*kernel).fit(train)

    def _recent_feature(self, train, kernel, users, items) -> np.ndarray | None:
        return None if kernel is None else np.log1p(self._recency(train, kernel).score(users, items))

    def _link_features(self, users, items, sessions) -> np.ndarray:
        x = self.features(users, items, sessions) if self.conditions_on_session else self.features(users, items)
        return x if self.recency is None else np.column_stack([x, np.log1p(self.recency.score(users, items))])

    def probability(self, users, items, sessions: Sessions = None) -> np.ndarray:
        users, items = np.asarray(users), np.asarray(items)
        check_sessions(sessions, len(users))
        x = self._link_features(users, items, sessions)
        p = 1 / (1 + np.exp(-(x @ self.w[:-1] + self.w[-1])))
        return not_shown(p, items, sessions)


class PopularityChoice(_LogisticChoice):
    """log(1 + the movie's training count) and log(1 + the user's) through a logistic link."""

    name = "popularity"

    def _fit_histories(self, train: pd.DataFrame) -> None:
        self.item_count = train["item_id"].value_counts()
        self.user_count = train["user_id"].value_counts()

    def features(self, users, items) -> np.ndarray:
        ic = pd.Series(items).map(self.item_count).fillna(0).to_numpy(float)
        uc = pd.Series(users).map(self.user_count).fillna(0).to_numpy(float)
        return np.column_stack([np.log1p(ic), np.log1p(uc)])


class NeighbourChoice(_LogisticChoice):
    """s(u, i) = sum of cos(u, v) over u's k nearest neighbours v (binary histories) that watched i."""

    name = "neighbours"
    conditions_on_session = True

    def __init__(self, k: int | None = None, block: int = 256, cowatch_dims: int | None = None, **kw):
        super().__init__(**kw)
        self.k, self.block = k, block  # k None: chosen among K_CHOICES on the validation slice
        # None: rlsim.cowatch.select_dims on a validation slice of the training ratings, as the env's
        # co-watch feature chooses its own (same procedure and seed, so both agree).
        self.cowatch_dims = cowatch_dims

    K_CHOICES = (10, 25, 50, 100, 200)
    # Time-blind by default: on ml-latest-small's temporal validation slice the time-local feature
    # lowers the rate at which its top-1 among the RankZero candidates is watched next (-0.023, 95%
    # interval -0.039 to -0.007, 610 users; bench/results/choice_temporal.json), though it raises the
    # AUC against unrated movies. ``recency_grid=_LogisticChoice.RECENCY`` turns it on.
    RECENCY = (None,)

    def fit(self, train: pd.DataFrame):
        if self.cowatch_dims is None:
            from rlsim.cowatch import select_dims

            self.cowatch_dims, self.cowatch_validation = select_dims(train, seed=self.seed)
        return super().fit(train)

    def candidates(self) -> list[dict]:
        return [{"k": self.k}] if self.k else [{"k": k} for k in self.K_CHOICES]

    def _fit_histories(self, train: pd.DataFrame) -> None:
        self.user_ids = np.unique(train["user_id"].to_numpy())
        self.item_ids = np.unique(train["item_id"].to_numpy())
        r = np.searchsorted(self.user_ids, train["user_id"].to_numpy())
        c = np.searchsorted(self.item_ids, train["item_id"].to_numpy())
        x = sparse.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(self.user_ids), len(self.item_ids)))
        x.data[:] = 1.0  # a movie rated twice is one pick
        self.x = x
        self.count = np.asarray(x.sum(0)).ravel()
        self.xu = sparse.csr_matrix(x.multiply(1 / np.sqrt(np.maximum(np.asarray(x.sum(1)).ravel(), 1))[:, None]))
        from rlsim.cowatch import CoWatch

        self.cowatch = CoWatch(self.cowatch_dims, self.seed).fit_matrix(x, self.user_ids, self.item_ids)

    @staticmethod
    def _index(ids: np.ndarray, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.minimum(np.searchsorted(known, ids), len(known) - 1)
        return pos, known[pos] == ids

    def _neighbour_votes(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), n_items]: each user's k nearest neighbours' similarity-weighted watches."""
        sim = (self.xu[rows] @ self.xu.T).toarray()
        sim[np.arange(len(rows)), rows] = 0.0  # a user is not their own neighbour
        k = min(self.k, sim.shape[1] - 1)
        if k < sim.shape[1]:
            cut = np.partition(sim, -k, axis=1)[:, -k][:, None]
            sim[sim < cut] = 0.0
        return (sparse.csr_matrix(sim) @ self.x).toarray()

    def score(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        ur, uok = self._index(users, self.user_ids)
        ir, iok = self._index(items, self.item_ids)
        out = np.zeros(len(users))
        uniq, inv = np.unique(ur, return_inverse=True)
        for s in range(0, len(uniq), self.block):
            votes = self._neighbour_votes(uniq[s:s + self.block])
            sel = (inv >= s) & (inv < s + self.block)
            out[sel] = votes[inv[sel] - s, ir[sel]]
        return np.where(uok & iok, out, 0.0)

    def _session_votes(self, users: np.ndarray, items: np.ndarray, sessions) -> np.ndarray:
        """score() with each pair's session movies added to the user's history: what the user just
        watched moves their neighbourhood ("people who watched that also watched ...")."""
        ur, uok = self._index(users, self.user_ids)
        ir, iok = self._index(items, self.item_ids)
        out = np.zeros(len(users))
        for s in range(0, len(users), self.block):
            sl = np.arange(s, min(s + self.block, len(users)))
            h = self.x[ur[sl]].tolil()
            for row, j in enumerate(sl):
                if not uok[j]:
                    h.rows[row], h.data[row] = [], []
                extra = [int(c) for c, ok in zip(*self._index(np.asarray(sessions[j].items, np.int64), self.item_ids))
                         if ok] if len(sessions[j]) else []
                for c in extra:
                    h[row, c] = 1.0
            h = sparse.csr_matrix(h)
            hn = sparse.csr_matrix(h.multiply(1 / np.sqrt(np.maximum(np.asarray(h.sum(1)).ravel(), 1))[:, None]))
            sim = (hn @ self.xu.T).toarray()
            sim[np.arange(len(sl))[uok[sl]], ur[sl][uok[sl]]] = 0.0  # not their own neighbour
            k = min(self.k, sim.shape[1] - 1)
            cut = np.partition(sim, -k, axis=1)[:, -k][:, None]
            sim[sim < cut] = 0.0
            votes = sparse.csr_matrix(sim) @ self.x
            out[sl] = np.asarray(votes[np.arange(len(sl)), ir[sl]]).ravel()
        return np.where(iok, out, 0.0)

    def features(self, users, items, sessions: Sessions = None) -> np.ndarray:
        ir, iok = self._index(items, self.item_ids)
        if sessions is not None and any(len(x) for x in sessions):
            s = self._session_votes(np.asarray(users), np.asarray(items), sessions)
            cw = self.cowatch.score_with(users, items, [x.items for x in sessions])
        else:
            s = self.score(users, items)
            cw = self.cowatch.score(users, items)
        return np.column_stack([np.log1p(s), np.log1p(np.where(iok, self.count[ir], 0)), cw])


class BPRChoice(_LogisticChoice):
    """Implicit MF (rlsim.bpr: BPR, watched vs not) and popularity through a logistic link: MF's choice."""

    name = "bpr"

    def __init__(self, factors: int | None = None, reg: float = 0.01, epochs: int = 30, **kw):
        super().__init__(**kw)
        self.factors, self.reg, self.epochs = factors, reg, epochs  # factors None: chosen on validation

    FACTOR_CHOICES = (16, 64)

    def candidates(self) -> list[dict]:
        return [{"factors": self.factors}] if self.factors else [{"factors": f} for f in self.FACTOR_CHOICES]

    def _fit_histories(self, train: pd.DataFrame) -> None:
        from rlsim.bpr import BPR

        self.bpr = BPR(factors=self.factors, reg=self.reg, epochs=self.epochs, seed=self.seed).fit(train)
        self.item_count = train["item_id"].value_counts()

    def features(self, users, items) -> np.ndarray:
        s = self.bpr.score(np.asarray(users), np.asarray(items))
        floor = float(np.min(self.bpr.b)) if len(self.bpr.b) else 0.0  # a movie BPR never saw: the lowest bias
        ic = pd.Series(items).map(self.item_count).fillna(0).to_numpy(float)
        return np.column_stack([np.where(np.isfinite(s), s, floor), np.log1p(ic)])


CHOICE_MODELS = {"popularity": PopularityChoice, "neighbours": NeighbourChoice, "bpr": BPRChoice}


class LazyChoice:
    """A choice model fitted on its first use (building a simulator stays as cheap as before)."""

    def __init__(self, kind: str, train: pd.DataFrame, seed: int = 0, **kw):
        self.kind, self.train, self.seed, self.kw = kind, train, seed, kw
        self._model = None

    @property
    def name(self) -> str:
        return self.kind

    @property
    def model(self):
        if self._model is None:
            self._model = CHOICE_MODELS[self.kind](seed=self.seed, **self.kw).fit(self.train)
        return self._model

    def probability(self, users, items, sessions: Sessions = None) -> np.ndarray:
        return self.model.probability(users, items, sessions)
