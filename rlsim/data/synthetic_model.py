"""The generator behind rlsim.data.synthetic: what to generate, the source's aggregate statistics,
and the latent-factor model that draws each user's items and scores (see that module's docstring).

Nothing here writes files; rlsim.data.synthetic streams the model's draws into Parquet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rlsim.data.schema import ITEM_COLUMNS, Dataset, RatingScale, genre_list
from rlsim.errors import DataError

DEFAULT_SOURCE = "ml-latest-small"


@dataclass
class SynthConfig:
    """What to generate. Shares of the score's variance: item quality, user x item taste, noise."""

    n_ratings: int
    n_users: int
    n_items: int
    source: str = DEFAULT_SOURCE
    seed: int = 0
    factors: int = 8
    item_share: float = 0.30
    taste_share: float = 0.20
    # Share of each item's taste vector explained by its (template's) genres.
    genre_share: float = 0.5
    # No user rates more than this share of the catalogue.
    max_user_share: float = 0.5
    chunk_users: int = 10_000

    def validate(self) -> "SynthConfig":
        if min(self.n_ratings, self.n_users, self.n_items) < 1:
            raise DataError("synthetic data needs at least one rating, user and item")
        if self.n_ratings > self.n_users * int(self.n_items * self.max_user_share):
            raise DataError(f"{self.n_ratings} ratings do not fit {self.n_users} users x {self.n_items} items "
                            f"(at most {self.max_user_share:.0%} of the items per user)")
        if not (0 <= self.item_share and 0 <= self.taste_share and self.item_share + self.taste_share < 1):
            raise DataError("item_share and taste_share must be >= 0 and sum to less than 1")
        return self


# ---------------------------------------------------------------- source statistics


@dataclass
class SourceStats:
    name: str
    scale: RatingScale
    # Per source user: ratings, mean, sd, first timestamp, span (last - first); resampled jointly.
    user_table: np.ndarray  # [users, 5] float
    item_counts: np.ndarray  # ratings per rated item, sorted descending
    quality_pop_corr: float  # corr(damped item mean, log count) over items with >= 5 ratings
    hist: np.ndarray  # share of each rating class
    t_min: int
    t_max: int
    templates: pd.DataFrame  # items sorted by popularity (most rated first): ITEM_COLUMNS
    demographics: pd.DataFrame | None  # age, gender, occupation of source users (None if absent)
    summary: dict = field(default_factory=dict)

    @property
    def user_counts(self) -> np.ndarray:
        return self.user_table[:, 0]

    def describe(self) -> dict:
        """The statistics the tests compare a generated dataset against."""
        return {"users": int(len(self.user_table)), "items": int(len(self.item_counts)),
                "ratings": int(self.user_counts.sum()), "popularity_exponent": popularity_exponent(self.item_counts),
                "hist": self.hist.round(4).tolist()}


def popularity_exponent(counts) -> float:
    """Slope of log(count) on log(rank) over items with >= 5 ratings (rank-frequency power law)."""
    c = np.sort(np.asarray(counts, float))[::-1]
    c = c[c >= 5]
    if len(c) < 3:
        return float("nan")
    return float(np.polyfit(np.log(np.arange(1, len(c) + 1)), np.log(c), 1)[0])


def source_stats(ds: Dataset) -> SourceStats:
    r = ds.ratings
    if len(r) == 0:
        raise DataError(f"{ds.name} has no ratings to learn a synthetic dataset from")
    users = r.groupby("user_id")
    ms = users["rating"].agg(["size", "mean", "std"]).fillna(0.0).to_numpy(float)
    ts = users["timestamp"].agg(["min", "max"]).to_numpy(np.int64)
    table = np.c_[ms, ts[:, 0], ts[:, 1] - ts[:, 0]].astype(float)
    items = r.groupby("item_id")["rating"].agg(["sum", "count"])
    mu = float(r["rating"].mean())
    damped = (items["sum"] + 10 * mu) / (items["count"] + 10)
    big = items["count"] >= 5
    corr = float(np.corrcoef(damped[big], np.log(items["count"][big]))[0, 1]) if big.sum() > 3 else 0.0
    hist = np.bincount(ds.scale.to_class(r["rating"].to_numpy()), minlength=ds.scale.n_classes) / len(r)
    counts = items["count"].reindex(ds.items["item_id"].to_numpy()).fillna(0).to_numpy()
    # Most rated first; ties in a fixed (id) order.
    order = np.lexsort((ds.items["item_id"].to_numpy(), -counts))
    templates = ds.items.iloc[order][ITEM_COLUMNS].reset_index(drop=True)
    # Aligned with user_table's rows (users in id order).
    demo = ds.users.drop_duplicates("user_id").set_index("user_id").reindex(
        np.asarray(list(users.groups)))[["age", "gender", "occupation"]]
    has_demo = demo["age"].notna().any() or demo["gender"].fillna("").astype(str).ne("").any() or \
        demo["occupation"].fillna("").astype(str).ne("").any()
    return SourceStats(
        name=ds.name, scale=ds.scale, user_table=table,
        item_counts=np.sort(items["count"].to_numpy())[::-1], quality_pop_corr=0.0 if np.isnan(corr) else corr,
        hist=hist, t_min=int(r["timestamp"].min()), t_max=int(r["timestamp"].max()), templates=templates,
        demographics=demo.reset_index(drop=True) if has_demo else None, summary=ds.summary())


# ---------------------------------------------------------------- sampling helpers


def _user_counts(raw: np.ndarray, stats: SourceStats, cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Ratings per user from raw (source) counts, scaled to sum to n_ratings exactly."""
    U, N = cfg.n_users, cfg.n_ratings
    hi = max(1, int(cfg.n_items * cfg.max_user_share))
    lo = int(min(stats.user_counts.min(), max(1, N // U), hi))
    f_lo, f_hi = 1e-6, 1e6
    for _ in range(100):  # sum(clip(raw * f, lo, hi)) is monotone in f
        f = np.sqrt(f_lo * f_hi)
        if np.clip(raw * f, lo, hi).sum() < N:
            f_lo = f
        else:
            f_hi = f
    c = np.clip(raw * f, lo, hi)
    n = np.floor(c).astype(np.int64)
    n += rng.random(U) < (c - n)
    n = np.clip(n, lo, hi)
    # Exact total: move single ratings onto (or off) random users that have room.
    for _ in range(1000):
        diff = N - int(n.sum())
        if diff == 0:
            break
        room = np.flatnonzero(n < hi) if diff > 0 else np.flatnonzero(n > lo)
        if len(room) == 0:
            raise DataError("cannot fit the requested ratings into the users' bounds")
        pick = rng.choice(room, size=min(abs(diff), len(room)), replace=False)
        n[pick] += 1 if diff > 0 else -1
    return n


def _item_weights(stats: SourceStats, n_items: int) -> np.ndarray:
    """Popularity weight of each item rank (most popular first): the source curve by relative rank."""
    src = np.maximum(stats.item_counts.astype(float), 0.5)
    q = (np.arange(n_items) + 0.5) / n_items  # relative rank of each target item
    w = np.exp(np.interp(q * len(src) - 0.5, np.arange(len(src)), np.log(src)))
    return w / w.sum()


def _draw_items(rng: np.random.Generator, counts: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per user, counts[u] distinct items drawn one after another with probability ∝ w (successive
    sampling). Returns (user index, item index) pairs, grouped by user in draw order."""
    n_items = len(w)
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    kept = np.zeros(0, np.int64)  # keys u * n_items + i of accepted pairs, user-major, draw order
    have = np.zeros(len(counts), np.int64)
    mass = np.zeros(len(counts))  # probability mass already taken by each user
    for rnd in range(12):
        todo = np.flatnonzero(have < counts)
        if len(todo) == 0:
            break
        deficit = counts[todo] - have[todo]
        free = np.clip(1.0 - mass[todo], 0.02, 1.0)
        n_draw = np.ceil(deficit / free * (1.15 + 0.25 * rnd)).astype(np.int64) + 2
        u = np.repeat(todo, n_draw)
        i = np.minimum(np.searchsorted(cdf, rng.random(len(u)), side="right"), n_items - 1)
        keys = np.concatenate([kept, u * n_items + i])
        uniq, first = np.unique(keys, return_index=True)
        owner = uniq // n_items
        o = np.lexsort((first, owner))
        uniq, owner = uniq[o], owner[o]
        start = np.searchsorted(owner, owner, side="left")
        keep = (np.arange(len(uniq)) - start) < counts[owner]
        kept = uniq[keep]
        owner = owner[keep]
        have = np.bincount(owner, minlength=len(counts))
        mass = np.bincount(owner, weights=w[kept % n_items], minlength=len(counts))
    short = np.flatnonzero(have < counts)
    if len(short):  # heavy users whose remaining items are rare: exact weighted sampling of the rest
        extra = []
        taken = pd.Series(kept % n_items).groupby(kept // n_items).agg(lambda s: s.to_numpy())
        for u in short:
            key = rng.exponential(size=n_items) / w
            if u in taken.index:
                key[taken[u]] = np.inf
            need = int(counts[u] - have[u])
            extra.append(u * n_items + np.argpartition(key, need - 1)[:need])
        kept = np.concatenate([kept] + extra)
        kept = kept[np.argsort(kept // n_items, kind="stable")]
    return kept // n_items, kept % n_items


# ---------------------------------------------------------------- the generator


class SynthModel:
    """Global parameters of one synthetic dataset (everything but the per-user draws)."""

    def __init__(self, stats: SourceStats, cfg: SynthConfig):
        self.stats, self.cfg = stats, cfg
        rng = np.random.default_rng([cfg.seed, 1])
        I, k = cfg.n_items, cfg.factors
        self.w_rank = _item_weights(stats, I)
        # Item ids are a random permutation of 1..I over popularity ranks.
        self.rank_of_item = rng.permutation(I)  # item index (id - 1) -> popularity rank
        self.w = self.w_rank[self.rank_of_item]
        # Template of each rank: the source item at the same relative popularity rank.
        n_src = len(stats.templates)
        tpl_of_rank = np.minimum(((np.arange(I) + 0.5) / I * n_src).astype(np.int64), n_src - 1)
        self.template = tpl_of_rank[self.rank_of_item]
        logpop = np.log(self.w)
        zpop = (logpop - logpop.mean()) / max(logpop.std(), 1e-9)
        rho = float(np.clip(stats.quality_pop_corr, -0.95, 0.95))
        self.quality = rho * zpop + np.sqrt(1 - rho ** 2) * rng.standard_normal(I)
        # Taste vectors: part genre (so the item text carries signal), part item-specific.
        genres = stats.templates["genres"].map(genre_list)
        names = sorted({g for gs in genres for g in gs})
        gidx = {g: j for j, g in enumerate(names)}
        G = np.zeros((n_src, max(len(names), 1)))
        for row, gs in enumerate(genres):
            for g in gs:
                G[row, gidx[g]] = 1.0
        G /= np.maximum(np.sqrt(G.sum(1, keepdims=True)), 1.0)
        A = rng.standard_normal((G.shape[1], k))
        gpart = (G @ A)[self.template]
        gs = cfg.genre_share if len(names) else 0.0
        self.q = np.sqrt(gs) * gpart + np.sqrt(1 - gs) * rng.standard_normal((I, k))
        # Each synthetic user resamples one source user's (count, mean, sd, first time, span), with
        # jitter: their correlations (heavy raters rate lower and longer) survive.
        urng = np.random.default_rng([cfg.seed, 2])
        U, tab = cfg.n_users, stats.user_table
        self.pick = urng.integers(0, len(tab), U)
        t = tab[self.pick]
        jit = tab.std(0) * 0.1
        raw = np.exp(np.log(np.maximum(t[:, 0], 1)) + 0.1 * urng.standard_normal(U))
        self.counts = _user_counts(raw, stats, cfg, urng)
        lo, hi = stats.scale.min, stats.scale.max
        self.mean = np.clip(t[:, 1] + jit[1] * urng.standard_normal(U), lo, hi)
        self.sd = np.clip(t[:, 2] + jit[2] * urng.standard_normal(U), 0.05 * stats.scale.step, (hi - lo) / 2)
        self.start = np.clip(t[:, 3] + jit[3] * urng.standard_normal(U), stats.t_min, stats.t_max)
        span = np.expm1(np.log1p(t[:, 4]) + 0.1 * urng.standard_normal(U))
        self.span = np.clip(span, 0, np.maximum(stats.t_max - self.start, 0))
        self._calibrate_popularity()
        self.thresholds = None

    def _calibrate_popularity(self, rounds: int = 3, pilot_users: int = 3000) -> None:
        """Weights whose realised popularity curve is the source's: drawing without replacement
        flattens the head (heavy users run out of popular items), so boost it until it matches."""
        rng = np.random.default_rng([self.cfg.seed, 5])
        U = self.cfg.n_users
        counts = self.counts if U <= pilot_users else self.counts[rng.choice(U, pilot_users, replace=False)]
        target = self.w_rank
        w = target.copy()
        for _ in range(rounds):
            _, ii = _draw_items(rng, counts, w[self.rank_of_item])
            realised = np.sort(np.bincount(ii, minlength=len(w)) / max(len(ii), 1))[::-1]
            w = w * np.clip(target / np.maximum(realised, 1e-12), 0.5, 2.0)
            w /= w.sum()
        self.w = w[self.rank_of_item]

    def user_params(self, a: int, b: int, rng: np.random.Generator) -> dict:
        p = rng.standard_normal((b - a, self.cfg.factors)) / np.sqrt(self.cfg.factors)
        return {"mean": self.mean[a:b], "sd": self.sd[a:b], "start": self.start[a:b], "span": self.span[a:b],
                "p": p}

    def scores(self, a: int, b: int, rng: np.random.Generator):
        """(user index, item index, continuous score z, timestamp) for users a..b-1."""
        cfg = self.cfg
        par = self.user_params(a, b, rng)
        uu, ii = _draw_items(rng, self.counts[a:b], self.w)
        e = 1.0 - cfg.item_share - cfg.taste_share
        x = (np.sqrt(cfg.item_share) * self.quality[ii]
             + np.sqrt(cfg.taste_share) * np.einsum("nk,nk->n", par["p"][uu], self.q[ii])
             + np.sqrt(e) * rng.standard_normal(len(ii)))
        n_u = np.bincount(uu, minlength=b - a)
        m = np.bincount(uu, x, b - a) / np.maximum(n_u, 1)
        v = np.bincount(uu, (x - m[uu]) ** 2, b - a) / np.maximum(n_u - 1, 1)
        xs = np.where(n_u[uu] > 1, (x - m[uu]) / np.sqrt(np.maximum(v[uu], 1e-12)), 0.0)
        z = par["mean"][uu] + par["sd"][uu] * xs
        ts = par["start"][uu] + par["span"][uu] * rng.random(len(uu))
        return uu + a, ii, z, np.round(ts).astype(np.int64)

    def calibrate(self) -> None:
        """Score thresholds that give the source's rating histogram (from a pilot of users)."""
        rng = np.random.default_rng([self.cfg.seed, 3])
        n = min(self.cfg.n_users, 3000)
        _, _, z, _ = self.scores(0, n, rng)
        cum = np.cumsum(self.stats.hist)[:-1]
        self.thresholds = np.quantile(z, np.clip(cum, 0, 1))

    def ratings(self, z: np.ndarray) -> np.ndarray:
        cls = np.searchsorted(self.thresholds, z, side="right")
        return self.stats.scale.from_class(cls)


# ---------------------------------------------------------------- tables of a generated dataset


def items_table(model: SynthModel) -> pd.DataFrame:
    """Items 1..n_items, each with its template's text (ITEM_COLUMNS)."""
    tpl = model.stats.templates
    rank = model.rank_of_item
    t = tpl.iloc[model.template].reset_index(drop=True)
    # n-th use of a template (in popularity order) gets "#n" in its title.
    order = np.argsort(rank, kind="stable")
    copy = np.zeros(len(rank), np.int64)
    copy[order] = pd.Series(model.template[order]).groupby(model.template[order]).cumcount().to_numpy()
    title = t["title"].astype(str).to_numpy().copy()
    for j in np.flatnonzero(copy > 0):
        m = re.match(r"^(.*?)(\s*\(\d{4}\))?\s*$", title[j])
        title[j] = f"{m.group(1)} #{copy[j] + 1}{m.group(2) or ''}"
    return pd.DataFrame({"item_id": np.arange(1, len(rank) + 1, dtype=np.int64), "title": title,
                         "year": t["year"].astype("Int64").to_numpy(), "genres": t["genres"].astype(str).to_numpy(),
                         "overview": t["overview"].fillna("").astype(str).to_numpy()})


def users_table(model: SynthModel) -> pd.DataFrame:
    """Users 1..n_users with the demographics of the source user each one resampled (USER_COLUMNS)."""
    U = model.cfg.n_users
    ids = np.arange(1, U + 1, dtype=np.int64)
    demo = model.stats.demographics
    if demo is None:
        return pd.DataFrame({"user_id": ids, "age": pd.array([pd.NA] * U, dtype="Int64"), "gender": "",
                             "occupation": ""})
    d = demo.iloc[model.pick].reset_index(drop=True)
    return pd.DataFrame({"user_id": ids, "age": d["age"].astype("Int64"), "gender": d["gender"].fillna("").astype(str),
                         "occupation": d["occupation"].fillna("").astype(str)})
