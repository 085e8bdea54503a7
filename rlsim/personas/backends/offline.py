"""The offline persona: no LLM. A deterministic user grounded in their own rating history.

Prediction = the bias baseline (mu + b_u + b_i) as prior, moved by the user's own residuals on
the movies most similar to the one being rated, blended with biased matrix factorisation (blend
weights fitted on a hold-out of the training ratings). Similarity blends co-rating similarity of the
residuals (shrunk by the number of common raters) with MiniLM cosine similarity of the item
texts, so items nobody co-rated still find neighbours. Answers are snapped to the scale like
an LLM's (the unsnapped value is kept too).

Memory grows with the ratings, not with movies squared: the fit keeps the residuals as a sparse
item x user matrix, and the similarities of a user's target movies to the movies in their history
are computed when that user is predicted (sparse co-rating products over common raters, text
cosines of the two sets of vectors). These are the same numbers a dense item x item matrix
would hold, so the answers are those of the dense version (which needed 0.76 GB per matrix at
9.7k movies, and 31 GB at ml-25m's 62k).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from rlsim.baselines import BiasBaseline, MatrixFactorization
from rlsim.data.schema import RatingScale
from rlsim.personas.config import OfflineConfig

if TYPE_CHECKING:
    from rlsim.personas.grounding import WorkUnit


class OfflinePersona:
    name = "offline"
    # The stacking weights (4 numbers) are fitted on at most this many hold-out pairs (whole users,
    # seeded); ML-100K and ml-latest-small hold-outs are smaller, so they use all of theirs.
    max_stack_pairs = 20_000
    # At most this many (target x history) cells per block of similarity rows (8 dense tables
    # of this size: about 130 MB in float64).
    block_cells = 2_000_000

    def __init__(self, cfg: OfflineConfig | None = None):
        self.cfg = cfg or OfflineConfig()

    def fit(self, train: pd.DataFrame, scale: RatingScale, item_ids: np.ndarray | None = None,
            item_vectors: np.ndarray | None = None) -> "OfflinePersona":
        """train: ratings; item_ids/item_vectors: MiniLM text embeddings (rows aligned), optional."""
        self.weights = None
        if self.cfg.stack:
            from rlsim.data.splits import holdout_validation

            # Blend weights from a hold-out of the training ratings only; components then refit on all.
            tr, va = holdout_validation(train, self.cfg.holdout_frac, seed=0)
            if len(va) > self.max_stack_pairs:
                va = _user_sample(va, self.max_stack_pairs)
            inner = OfflinePersona(dataclasses.replace(self.cfg, stack=False)).fit(tr, scale, item_ids, item_vectors)
            X = inner._features(va["user_id"].to_numpy(), va["item_id"].to_numpy())
            w = np.linalg.lstsq(X, va["rating"].to_numpy(float), rcond=None)[0]
            self._fit_components(train, scale, item_ids, item_vectors)
            self.weights = w
            return self
        return self._fit_components(train, scale, item_ids, item_vectors)

    def _features(self, users, items) -> np.ndarray:
        bias = self.bias.predict(users, items)
        return np.c_[self._knn_raw(users, items), self.mf.predict(users, items), bias, np.ones(len(bias))]

    def _fit_components(self, train, scale, item_ids, item_vectors) -> "OfflinePersona":
        cfg = self.cfg
        self.scale = scale
        self.bias = BiasBaseline().fit(train, scale)
        all_items = np.unique(np.concatenate([train["item_id"].to_numpy(),
                                              item_ids if item_ids is not None else np.array([], int)]))
        self.items = all_items
        self._iix = pd.Series(np.arange(len(all_items)), index=all_items)
        users, uidx = np.unique(train["user_id"].to_numpy(), return_inverse=True)
        iidx = self._iix[train["item_id"].to_numpy()].to_numpy()
        base = self.bias.mu + self.bias.user_bias(train["user_id"]) + self.bias.item_bias(train["item_id"])
        resid = train["rating"].to_numpy(float) - base
        n_i, n_u = len(all_items), len(users)
        # Item x user residuals, their squares and the rating pattern: one sparse structure (a
        # repeated (user, item) keeps its last rating, as the dense assignment did).
        R = sparse.csr_matrix((resid, (iidx, uidx)), shape=(n_i, n_u))
        if R.nnz < len(resid):  # duplicates were summed: rebuild from each pair's last rating
            last = ~pd.DataFrame({"u": uidx, "i": iidx}).duplicated(keep="last").to_numpy()
            R = sparse.csr_matrix((resid[last], (iidx[last], uidx[last])), shape=(n_i, n_u))
        R.sort_indices()
        self._R = R
        self._R2 = sparse.csr_matrix((R.data ** 2, R.indices, R.indptr), shape=R.shape)
        self._M = sparse.csr_matrix((np.ones_like(R.data), R.indices, R.indptr), shape=R.shape)
        self._V = None
        if item_vectors is not None and cfg.text_weight > 0:
            V = np.zeros((n_i, item_vectors.shape[1]), np.float32)
            pos = self._iix.reindex(item_ids).to_numpy()
            ok = ~np.isnan(pos)
            V[pos[ok].astype(int)] = item_vectors[ok]
            self._V = V
        self.mf = None
        if cfg.mf_weight > 0 or cfg.stack:
            self.mf = MatrixFactorization(factors=cfg.mf_factors, reg=cfg.mf_reg).fit(train, scale)
        # Each user's history: item indices and residuals.
        order = np.argsort(uidx, kind="stable")
        bounds = np.searchsorted(uidx[order], np.arange(n_u + 1))
        self.history = {int(u): (iidx[order[bounds[j]:bounds[j + 1]]], resid[order[bounds[j]:bounds[j + 1]]])
                        for j, u in enumerate(users)}
        return self

    def similarity(self, targets: np.ndarray, hist: np.ndarray) -> np.ndarray:
        """[len(targets), len(hist)] similarities between item indices: residual cosine over common
        raters damped by their count, plus text_weight x the floored text cosine; 0 for an item
        with itself."""
        cfg = self.cfg
        A, B = self._R[targets], self._R[hist]
        MA, MB = self._M[targets], self._M[hist]
        num = (A @ B.T).toarray()
        sq_th = (self._R2[targets] @ MB.T).toarray()  # sum of t's squared residuals over common raters
        sq_ht = (MA @ self._R2[hist].T).toarray()  # the same for h
        common = (MA @ MB.T).toarray()
        den = np.sqrt(sq_th * sq_ht)
        with np.errstate(invalid="ignore", divide="ignore"):
            S = np.where(den > 0, num / den, 0.0) * common / (common + cfg.shrink)
        if self._V is not None:
            T = self._V[targets] @ self._V[hist].T
            T = np.clip((T - cfg.text_floor) / (1.0 - cfg.text_floor), 0.0, None)
            S = S + cfg.text_weight * T
        S[targets[:, None] == hist[None, :]] = 0.0
        return S.astype(np.float32)

    def predict_raw(self, users, items) -> np.ndarray:
        """The unsnapped answer (clipped to the scale)."""
        users, items = np.asarray(users), np.asarray(items)
        if self.weights is not None:
            return self.scale.clip(self._features(users, items) @ self.weights)
        out = self._knn_raw(users, items)
        if self.mf is not None and self.cfg.mf_weight > 0:
            w = self.cfg.mf_weight
            out = (1 - w) * out + w * self.mf.predict(users, items)
        return self.scale.clip(out)

    def _knn_raw(self, users, items) -> np.ndarray:
        """Bias prior moved by the user's residuals on the most similar movies they rated."""
        users, items = np.asarray(users), np.asarray(items)
        out = self.bias.mu + self.bias.user_bias(users) + self.bias.item_bias(items)
        k, damp = self.cfg.k, self.cfg.damping
        ii = self._iix.reindex(items).to_numpy()
        df = pd.DataFrame({"u": users, "pos": np.arange(len(users))})
        for u, g in df.groupby("u", sort=False):
            hist = self.history.get(int(u))
            if hist is None:
                continue
            h_idx, h_res = hist
            rows = g["pos"].to_numpy()
            known = rows[~np.isnan(ii[rows])]
            if len(known) == 0:
                continue
            # A movie asked many times for one user (the session replay asks each test movie with
            # up to 20 sessions) gets one similarity row, and rows go in blocks: the dense
            # (targets x history) tables stay bounded (they peaked at 1.4 GB on ml-latest-small).
            targets, inverse = np.unique(ii[known].astype(int), return_inverse=True)
            move = np.empty(len(targets))
            step = max(1, self.block_cells // max(len(h_idx), 1))
            for s in range(0, len(targets), step):
                move[s:s + step] = self._knn_move(targets[s:s + step], h_idx, h_res, k, damp)
            out[known] += move[inverse]
        return self.scale.clip(out)

    def _knn_move(self, targets: np.ndarray, h_idx: np.ndarray, h_res: np.ndarray, k: int, damp: float) -> np.ndarray:
        """Each target's move from the bias prior: its k most similar rated movies' residuals."""
        sims = self.similarity(targets, h_idx)  # (targets, history)
        if sims.shape[1] > k:
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            sims_k = np.take_along_axis(sims, top, axis=1)
            res_k = h_res[top]
        else:
            sims_k, res_k = sims, np.broadcast_to(h_res, sims.shape)
        sims_k = np.clip(sims_k, 0.0, None)
        return (sims_k * res_k).sum(1) / (sims_k.sum(1) + damp)

    def predict(self, users, items) -> np.ndarray:
        raw = self.predict_raw(users, items)
        return self.scale.round(raw) if self.cfg.snap else raw


def _user_sample(df: pd.DataFrame, max_pairs: int, seed: int = 0) -> pd.DataFrame:
    """Whole users, in a seeded random order, until max_pairs rows."""
    users = df["user_id"].unique()
    order = np.random.default_rng(seed).permutation(len(users))
    sizes = df.groupby("user_id").size().reindex(users[order]).to_numpy()
    keep = users[order][np.cumsum(sizes) <= max_pairs]
    return df[df["user_id"].isin(keep)].reset_index(drop=True)


class OfflineBackend:
    """The offline persona behind the rating engine's interface: answers a unit from the fitted
    ``OfflinePersona`` (snapped to the scale like an LLM's answer; the unsnapped value kept)."""

    kind = "offline"

    def __init__(self, model, snap: bool = True):
        self.model = model
        self.snap = snap

    def answer(self, unit: WorkUnit) -> tuple[np.ndarray, np.ndarray]:
        users = np.full(len(unit.item_ids), unit.user_id)
        raw = np.asarray(self.model.predict_raw(users, np.asarray(unit.item_ids)), float)
        return (unit.rating_scale.round(raw) if self.snap else raw), raw
