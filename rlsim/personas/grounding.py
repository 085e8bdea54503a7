"""What a persona sees: its profile, the movies to rate, and its own most similar ratings.

For each movie to rate, the K movies from the user's own training history nearest in MiniLM
space (a FAISS inner-product index over the user's history vectors) are shown with the rating
the user gave them. ``PromptBuilder`` turns (user, item) pairs into batched ``WorkUnit``s.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from rlsim.data.schema import RatingScale
from rlsim.personas.prompts import movie_label, rating_messages, session_rating_messages


@dataclass
class WorkUnit:
    """One idempotent request: a user and a batch of movies. Everything needed travels with it."""

    user_id: int
    item_ids: list[int]
    profile_text: str
    items: list[dict]  # item_id, title, year, genres
    grounding: dict[int, list[tuple[str, float]]] = field(default_factory=dict)
    scale: tuple[float, float, float] = (1.0, 5.0, 1.0)
    # Answers of earlier runs to skip in the response cache: a resumed job asks again (new requests)
    # for items whose cached answers were all unusable, instead of replaying them.
    answer_offset: int = 0
    # A persona simulator's session so far, [(label of a shown movie, the rating given)], and the
    # persona's summary as updated during the session: part of the messages, hence of the cache key.
    session: list[tuple[str, float]] = field(default_factory=list)
    summary: str = ""

    @property
    def unit_id(self) -> str:
        h = hashlib.sha1(",".join(map(str, self.item_ids)).encode()).hexdigest()[:12]
        return f"{self.user_id}:{h}"

    @property
    def rating_scale(self) -> RatingScale:
        return RatingScale(*self.scale)

    def subset(self, item_ids: list[int]) -> "WorkUnit":
        keep = set(item_ids)
        return WorkUnit(self.user_id, [i for i in self.item_ids if i in keep], self.profile_text,
                        [it for it in self.items if int(it["item_id"]) in keep],
                        {i: g for i, g in self.grounding.items() if i in keep}, self.scale, self.answer_offset,
                        session=self.session, summary=self.summary)

    def messages(self) -> list[dict]:
        if self.session or self.summary:
            return session_rating_messages(self.user_id, self.profile_text, self.items, self.grounding,
                                           self.rating_scale, self.session, self.summary)
        return rating_messages(self.user_id, self.profile_text, self.items, self.grounding, self.rating_scale)


class PromptBuilder:
    def __init__(self, train: pd.DataFrame, items: pd.DataFrame, scale: RatingScale, profiles: dict[int, str],
                 item_vectors: np.ndarray | None = None, k_similar: int = 3, batch_size: int = 10):
        self.scale = scale
        self.profiles = profiles
        self.k = k_similar
        self.batch_size = max(1, int(batch_size))
        cols = ["item_id", "title", "year", "genres"]
        it = items[cols].copy()
        it["year"] = it["year"].astype("float")
        self.item_rows = {int(r["item_id"]): {"item_id": int(r["item_id"]), "title": str(r["title"]),
                                              "year": None if pd.isna(r["year"]) else int(r["year"]),
                                              "genres": str(r["genres"])} for r in it.to_dict("records")}
        self.labels = {i: movie_label(r) for i, r in self.item_rows.items()}
        self.vec_row = pd.Series(np.arange(len(items)), index=items["item_id"].to_numpy())
        self.vectors = None if item_vectors is None else np.ascontiguousarray(item_vectors, np.float32)
        self.history = {int(u): g for u, g in train.groupby("user_id")}

    def similar_rated(self, user_id: int, item_ids: list[int]) -> dict[int, list[tuple[str, float]]]:
        hist = self.history.get(int(user_id))
        if hist is None or self.vectors is None or self.k <= 0:
            return {}
        import faiss

        h_items = hist["item_id"].to_numpy()
        h_rows = self.vec_row.reindex(h_items).to_numpy()
        ok = ~np.isnan(h_rows)
        h_items, h_r = h_items[ok], hist["rating"].to_numpy()[ok]
        if len(h_items) == 0:
            return {}
        index = faiss.IndexFlatIP(self.vectors.shape[1])
        index.add(self.vectors[h_rows[ok].astype(int)])
        q_rows = self.vec_row.reindex(item_ids).to_numpy()
        out: dict[int, list[tuple[str, float]]] = {}
        has = ~np.isnan(q_rows)
        if not has.any():
            return out
        k = min(self.k + 1, len(h_items))  # +1: the item itself may be in the history (resimulation)
        _, nn = index.search(self.vectors[q_rows[has].astype(int)], k)
        for iid, row in zip(np.asarray(item_ids)[has], nn):
            picks = [j for j in row if j >= 0 and h_items[j] != iid][: self.k]
            out[int(iid)] = [(self.labels.get(int(h_items[j]), str(h_items[j])), float(h_r[j])) for j in picks]
        return out

    def units(self, pairs: pd.DataFrame) -> list[WorkUnit]:
        """Batched units for (user_id, item_id) pairs, in a deterministic order."""
        out = []
        scale = (float(self.scale.min), float(self.scale.max), float(self.scale.step))
        for u, g in pairs.groupby("user_id", sort=True):
            ids = [int(i) for i in dict.fromkeys(g["item_id"].tolist())]
            ground = self.similar_rated(int(u), ids)
            for s in range(0, len(ids), self.batch_size):
                b = ids[s:s + self.batch_size]
                items = [self.item_rows.get(i, {"item_id": i, "title": f"movie {i}", "year": None, "genres": ""})
                         for i in b]
                out.append(WorkUnit(int(u), b, self.profiles.get(int(u), "A movie viewer."), items,
                                    {i: ground[i] for i in b if i in ground}, scale))
        return out

    def source(self, pairs: pd.DataFrame) -> "UnitSource":
        """The units of ``units(pairs)``, built a group of users at a time when a job needs them (a
        job holds the units of the shards in flight, not the run's)."""
        return pairs_source(pairs, self.units, self.batch_size)


# ---------------------------------------------------------------- units built on demand

def unit_id_of(user_id: int, item_ids) -> str:
    """``WorkUnit(user_id, item_ids, ...).unit_id`` without building the unit."""
    h = hashlib.sha1(",".join(map(str, item_ids)).encode()).hexdigest()[:12]
    return f"{int(user_id)}:{h}"


class UnitSource:
    """A job's units, built for a group of its users at a time (``run_rating_job`` takes this or a list).

    ``users``: the job's user ids. ``build(users)`` -> the units of those users (given in ascending
    order); ``unit_ids(users)`` -> [(unit_id, number of items)] of the same units, in the same order,
    without building them (optional; by default the units are built and dropped). Both must give the
    same answer every time they are asked (a resumed job checks its plan against them).
    """

    def __init__(self, users, build: Callable[[np.ndarray], list[WorkUnit]],
                 unit_ids: Callable[[np.ndarray], list[tuple[str, int]]] | None = None):
        self.users = np.unique(np.asarray(users, dtype=np.int64))
        self.build = build
        self._unit_ids = unit_ids

    def unit_ids(self, users: np.ndarray) -> list[tuple[str, int]]:
        if self._unit_ids is not None:
            return self._unit_ids(users)
        return [(u.unit_id, len(u.item_ids)) for u in self.build(users)]

    def __iter__(self):
        """Every unit, a thousand users at a time (``dry_run`` estimates a source this way)."""
        for a in range(0, len(self.users), 1000):
            yield from self.build(self.users[a:a + 1000])


def pairs_source(pairs: pd.DataFrame, units_of: Callable[[pd.DataFrame], list[WorkUnit]],
                 per_unit: int) -> UnitSource:
    """A ``UnitSource`` over (user_id, item_id) pairs: ``units_of(pairs of some users)`` builds their
    units, each user's distinct items (in the pairs' order) ``per_unit`` at a time."""
    u_col = pairs["user_id"].to_numpy(np.int64)
    order = np.argsort(u_col, kind="stable")  # each user's items keep the pairs' order
    u_sorted, i_sorted = u_col[order], pairs["item_id"].to_numpy(np.int64)[order]
    users, starts = np.unique(u_sorted, return_index=True)
    ends = np.append(starts[1:], len(u_sorted))
    per_unit = max(1, int(per_unit))

    def spans(chunk: np.ndarray):
        chunk = np.asarray(chunk, dtype=np.int64)
        pos = np.searchsorted(users, chunk)
        ok = pos < len(users)
        ok[ok] = users[pos[ok]] == chunk[ok]
        for u, p in zip(chunk[ok].tolist(), pos[ok].tolist()):
            yield u, int(starts[p]), int(ends[p])

    def rows(chunk: np.ndarray) -> pd.DataFrame:
        idx = [np.arange(a, b) for _, a, b in spans(chunk)]
        idx = np.concatenate(idx) if idx else np.zeros(0, np.int64)
        return pd.DataFrame({"user_id": u_sorted[idx], "item_id": i_sorted[idx]})

    def ids(chunk: np.ndarray) -> list[tuple[str, int]]:
        out = []
        for u, a, b in spans(chunk):
            items = list(dict.fromkeys(i_sorted[a:b].tolist()))
            out.extend((unit_id_of(u, items[s:s + per_unit]), len(items[s:s + per_unit]))
                       for s in range(0, len(items), per_unit))
        return out

    return UnitSource(users, lambda chunk: units_of(rows(chunk)), ids)
