"""RankZero: top-K candidate items per user from popularity blended with text similarity.

popularity = damped mean rating and (log) count of each item in the training ratings;
similarity = FAISS inner product between the user's taste vector (rating-weighted mean of the
normalised text embeddings of the movies they rated at or above their own mean) and the
catalogue. Both are scaled to [0, 1] before blending, so the weights mean what they say.
Items the user rated in training are never candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from rlsim.errors import ConfigError


@dataclass
class CandidatesConfig:
    k: int = 25
    # Blend weights. With tune_weights (the default) they are chosen by recall@K on a validation
    # slice carved out of the TRAINING ratings (val_frac per user), never on the test set; these
    # two are then only the fallback when tuning is off (`--weights POP,SIM` turns it off).
    pop_weight: float = 0.8
    sim_weight: float = 0.2
    tune_weights: bool = True
    sim_weight_grid: list = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0])
    val_frac: float = 0.2
    # Inside popularity: weight of the (log) count against the damped mean rating.
    count_weight: float = 0.8
    # Prior strength (in ratings) pulling an item's mean towards the global mean.
    damping: float = 10.0
    # FAISS retrieves this many nearest items per user before blending (0 = whole catalogue).
    pool: int = 0
    # A held-out test rating >= this counts as "liked" for recall@K.
    like_threshold: float = 4.0

    def validate(self) -> "CandidatesConfig":
        if self.k < 1:
            raise ConfigError(f"candidates.k must be >= 1, got {self.k}")
        if self.pop_weight < 0 or self.sim_weight < 0 or self.pop_weight + self.sim_weight <= 0:
            raise ConfigError("candidates weights must be >= 0 and not both zero")
        if self.tune_weights and (not self.sim_weight_grid or not all(0 <= w <= 1 for w in self.sim_weight_grid)):
            raise ConfigError("candidates.sim_weight_grid must list weights in [0, 1]")
        if not 0.0 < self.val_frac < 1.0:
            raise ConfigError(f"candidates.val_frac must be in (0, 1), got {self.val_frac}")
        return self


def _minmax(x: np.ndarray, axis=None) -> np.ndarray:
    lo = np.min(x, axis=axis, keepdims=axis is not None)
    hi = np.max(x, axis=axis, keepdims=axis is not None)
    return (x - lo) / np.maximum(hi - lo, 1e-12)


def item_popularity(train: pd.DataFrame, item_ids: np.ndarray, damping: float = 10.0,
                    count_weight: float = 0.5) -> pd.DataFrame:
    """Per item (aligned with item_ids): count, damped mean, and the [0, 1] popularity score."""
    mu = float(train["rating"].mean())
    g = train.groupby("item_id")["rating"].agg(["sum", "count"])
    g = g.reindex(item_ids).fillna(0.0)
    count = g["count"].to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        damped = (g["sum"].to_numpy(float) + damping * mu) / (count + damping)
    damped = np.where(count > 0, damped, mu)  # unrated items (or damping 0) sit at the global mean
    logc = np.log1p(count)
    score = (1 - count_weight) * _minmax(damped) + count_weight * _minmax(logc)
    return pd.DataFrame({"item_id": item_ids, "count": count, "damped_mean": damped, "pop_score": score})


def taste_vectors(train: pd.DataFrame, user_ids: np.ndarray, item_index: pd.Series,
                  emb: np.ndarray) -> np.ndarray:
    """L2-normalised rating-weighted mean embedding of each user's at-or-above-own-mean items."""
    df = train[["user_id", "item_id", "rating"]].copy()
    df["umean"] = df.groupby("user_id")["rating"].transform("mean")
    liked = df[df["rating"] >= df["umean"]]
    uix = pd.Series(np.arange(len(user_ids)), index=user_ids)
    rows = uix.reindex(liked["user_id"].to_numpy()).to_numpy()
    cols = item_index.reindex(liked["item_id"].to_numpy()).to_numpy()
    ok = ~(np.isnan(rows) | np.isnan(cols))
    from scipy import sparse

    # A sparse (user x item) matrix of rating weights times the embeddings: no [liked, D] gather.
    W = sparse.csr_matrix((liked["rating"].to_numpy(float)[ok], (rows[ok].astype(int), cols[ok].astype(int))),
                          shape=(len(user_ids), emb.shape[0]))
    out = np.asarray(W @ np.asarray(emb, np.float64))
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.maximum(norm, 1e-12)).astype(np.float32)


def faiss_similarity(user_vecs: np.ndarray, item_emb: np.ndarray, pool: int = 0) -> np.ndarray:
    """Dense [users, items] cosine matrix via a FAISS inner-product index; items outside the
    top-`pool` of a user get that user's lowest retrieved score (they can still win on popularity)."""
    import faiss

    n_items = item_emb.shape[0]
    x = np.ascontiguousarray(item_emb, dtype=np.float32)
    faiss.normalize_L2(x)
    if pool <= 0 or pool >= n_items:
        # The whole catalogue: a flat search would return every inner product, sorted; the product
        # itself is the same numbers without sorting n_items per user (30x faster at 10k items).
        return np.ascontiguousarray(user_vecs, dtype=np.float32) @ x.T
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    k = n_items if pool <= 0 else min(pool, n_items)
    sims, idx = index.search(np.ascontiguousarray(user_vecs, dtype=np.float32), k)
    out = np.repeat(sims[:, -1:], n_items, axis=1)
    np.put_along_axis(out, idx, sims, axis=1)
    return out


def build_candidates(train: pd.DataFrame, items: pd.DataFrame, item_emb: np.ndarray,
                     cfg: CandidatesConfig, user_ids: np.ndarray | None = None,
                     pop_weight: float | None = None, sim_weight: float | None = None,
                     chunk_cells: int = 8_000_000) -> pd.DataFrame:
    """Top-K candidates per user: (user_id, rank, item_id, score, pop_score, sim_score).

    item_emb rows align with `items`; weights default to the config's (override for ablations).
    Users are scored in blocks of about chunk_cells (user, item) cells, so memory does not grow
    with users x items.
    """
    cfg.validate()
    wp = cfg.pop_weight if pop_weight is None else pop_weight
    ws = cfg.sim_weight if sim_weight is None else sim_weight
    item_ids = items["item_id"].to_numpy()
    item_index = pd.Series(np.arange(len(item_ids)), index=item_ids)
    users = np.sort(train["user_id"].unique()) if user_ids is None else np.asarray(user_ids)
    pop = item_popularity(train, item_ids, cfg.damping, cfg.count_weight)["pop_score"].to_numpy()
    taste = taste_vectors(train, users, item_index, item_emb)
    # Training items, as a sparse user x item pattern (excluded from each user's candidates).
    uix = pd.Series(np.arange(len(users)), index=users)
    r = uix.reindex(train["user_id"].to_numpy()).to_numpy()
    c = item_index.reindex(train["item_id"].to_numpy()).to_numpy()
    ok = ~(np.isnan(r) | np.isnan(c))
    from scipy import sparse

    seen = sparse.csr_matrix((np.ones(int(ok.sum()), bool), (r[ok].astype(int), c[ok].astype(int))),
                             shape=(len(users), len(item_ids)))
    k = min(cfg.k, len(item_ids))
    # Users in blocks: the dense [users, items] score matrix is never whole (memory stays flat).
    block = max(1, int(chunk_cells // max(len(item_ids), 1)))
    parts_top, parts_score, parts_sim = [], [], []
    for s in range(0, len(users), block):
        sim = faiss_similarity(taste[s:s + block], item_emb, cfg.pool)
        # Per-user rescaling: cosines of MiniLM texts sit in a narrow band that differs by user.
        score = wp * pop[None, :] + ws * _minmax(sim, axis=1)
        sr = seen[s:s + block].tocoo()
        score[sr.row, sr.col] = -np.inf
        top = np.argpartition(-score, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(score, top, 1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, 1)
        parts_top.append(top)
        parts_score.append(np.take_along_axis(score, top, 1))
        parts_sim.append(np.take_along_axis(sim, top, 1))
    top = np.concatenate(parts_top) if parts_top else np.zeros((0, k), np.int64)
    rows = np.repeat(np.arange(len(users)), k)
    cols = top.ravel()
    df = pd.DataFrame({"user_id": users[rows], "rank": np.tile(np.arange(k), len(users)),
                       "item_id": item_ids[cols], "score": np.concatenate(parts_score).ravel() if parts_score else [],
                       "pop_score": pop[cols], "sim_score": np.concatenate(parts_sim).ravel() if parts_sim else []})
    # A user who rated almost everything may have fewer than K unrated items.
    return df[np.isfinite(df["score"])].reset_index(drop=True)


def recall_at_k(candidates: pd.DataFrame, test: pd.DataFrame, like_threshold: float) -> dict:
    """Mean over users with >= 1 liked held-out item of |candidates ∩ liked| / |liked|."""
    liked = test[test["rating"] >= like_threshold][["user_id", "item_id"]].drop_duplicates()
    if liked.empty:
        return {"recall": float("nan"), "users": 0, "hits": 0, "liked": 0}
    hits = liked.merge(candidates[["user_id", "item_id"]].drop_duplicates(), on=["user_id", "item_id"])
    per_user = (hits.groupby("user_id").size().reindex(liked["user_id"].unique()).fillna(0)
                / liked.groupby("user_id").size())
    return {"recall": float(per_user.mean()), "users": int(len(per_user)), "hits": int(len(hits)),
            "liked": int(len(liked))}


def choose_weights(train: pd.DataFrame, items: pd.DataFrame, item_emb: np.ndarray, cfg: CandidatesConfig,
                   seed: int = 0) -> dict:
    """Blend weights by recall@K on a validation slice of the training ratings (the test set is
    never looked at): candidates from the rest of training, liked = validation ratings >= threshold.
    Ties go to the smaller similarity weight."""
    from rlsim.data.splits import holdout_validation

    tr, va = holdout_validation(train, cfg.val_frac, seed)
    grid = []
    for w in sorted(set(float(x) for x in cfg.sim_weight_grid)):
        c = build_candidates(tr, items, item_emb, cfg, pop_weight=round(1.0 - w, 6), sim_weight=w)
        grid.append({"sim_weight": w, "pop_weight": round(1.0 - w, 6),
                     "validation_recall": recall_at_k(c, va, cfg.like_threshold)["recall"]})
    best = max(grid, key=lambda g: (round(g["validation_recall"], 12), -g["sim_weight"]))
    return {"chosen": {"pop": best["pop_weight"], "sim": best["sim_weight"]}, "grid": grid,
            "validation": {"frac": cfg.val_frac, "seed": seed, "ratings": int(len(va))}}


def evaluate_candidates(train: pd.DataFrame, test: pd.DataFrame, items: pd.DataFrame, item_emb: np.ndarray,
                        cfg: CandidatesConfig) -> tuple[pd.DataFrame, dict]:
    """The blended candidates and recall@K for popularity-only, similarity-only and the blend."""
    blend = build_candidates(train, items, item_emb, cfg)
    metrics = {"k": cfg.k, "like_threshold": cfg.like_threshold,
               "weights": {"pop": cfg.pop_weight, "sim": cfg.sim_weight}}
    for name, wp, ws in [("popularity", 1.0, 0.0), ("similarity", 0.0, 1.0)]:
        c = build_candidates(train, items, item_emb, cfg, pop_weight=wp, sim_weight=ws)
        metrics[name] = recall_at_k(c, test, cfg.like_threshold)
    metrics["blend"] = recall_at_k(blend, test, cfg.like_threshold)
    metrics["users"] = int(blend["user_id"].nunique())
    return blend, metrics


def candidates_stage(train: pd.DataFrame, test: pd.DataFrame, items: pd.DataFrame, item_emb: np.ndarray,
                     cfg: CandidatesConfig, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """The RankZero stage: weights chosen on a training validation slice (unless fixed), then the
    candidates from all training ratings and their test recall beside popularity and similarity alone."""
    cfg.validate()
    tuning = None
    if cfg.tune_weights:
        tuning = choose_weights(train, items, item_emb, cfg, seed)
        cfg = replace(cfg, pop_weight=tuning["chosen"]["pop"], sim_weight=tuning["chosen"]["sim"])
    cands, metrics = evaluate_candidates(train, test, items, item_emb, cfg)
    metrics["weights_from"] = "validation slice of training" if tuning else "config (fixed)"
    if tuning:
        metrics["tuning"] = tuning
    return cands, metrics


def write_candidates(dcfg, cfg: CandidatesConfig, out, *, dataset=None, split=None) -> dict:
    """The stage as the CLI, the pipeline and jobs/ run it: OUT/candidates.parquet + OUT/metrics.json
    (test recall beside the baselines), returning the metrics."""
    from pathlib import Path

    from rlsim.baselines import evaluate_baselines
    from rlsim.data import load_split
    from rlsim.embeddings import item_text_vectors
    from rlsim.io import write_json, write_parquet

    if dataset is None:
        dataset, split = load_split(dcfg)
    emb = item_text_vectors(dataset.items, dcfg.text_model, dcfg.cache_dir)
    cands, metrics = candidates_stage(split.train, split.test, dataset.items, emb, cfg, seed=dcfg.seed)
    out = Path(out)
    write_parquet(cands, out / "candidates.parquet")
    result = {"dataset": dcfg.dataset, "split": split.summary(), "candidates": metrics,
              "baselines": evaluate_baselines(split.train, split.test, dataset.scale, seed=dcfg.seed)}
    write_json(out / "metrics.json", result)
    return result
