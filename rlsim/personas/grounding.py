"""What a persona sees: its profile, the movies to rate, and its own most similar ratings.

For each movie to rate, the K movies from the user's own training history nearest in MiniLM
space (a FAISS inner-product index over the user's history vectors) are shown with the rating
the user gave them. ``PromptBuilder`` turns (user, item) pairs into batched ``WorkUnit``s.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

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
