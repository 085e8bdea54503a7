"""Planning one user's alignment: the demonstrations (their most recent training ratings outside the
validation slice, in time order), the questions around them, and the messages that ask them."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rlsim.data.splits import holdout_validation
from rlsim.personas import prompts as P
from rlsim.personas.align.config import AlignConfig


def split_validation(train: pd.DataFrame, frac: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(demonstration pool, validation): a seeded per-user random slice of the training ratings."""
    pool, val = holdout_validation(train, frac, seed)
    return pool, val


def item_rows(items: pd.DataFrame) -> dict[int, dict]:
    out = {}
    for r in items[["item_id", "title", "year", "genres"]].to_dict("records"):
        y = r["year"]
        out[int(r["item_id"])] = {"item_id": int(r["item_id"]), "title": str(r["title"]),
                                  "year": None if pd.isna(y) else int(y), "genres": str(r["genres"])}
    return out


def item_of(rows: dict[int, dict], i: int) -> dict:
    return rows.get(int(i), {"item_id": int(i), "title": f"movie {int(i)}", "year": None, "genres": ""})


def plan_user(u: int, seq: pd.DataFrame, acfg: AlignConfig, seed: int, rows: dict[int, dict]) -> dict | None:
    """The questions of one user: seq = their demonstration pool in time order (item_id, rating, timestamp)."""
    n = len(seq)
    demos_n = min(acfg.demos, n)
    if demos_n < acfg.min_demos:
        return None
    rng = np.random.default_rng([int(seed), int(u)])
    items = seq["item_id"].to_numpy().astype(int)
    ratings = seq["rating"].to_numpy().astype(float)
    start = n - demos_n
    label = {int(i): P.movie_label(item_of(rows, i)) for i in items}
    chunks = []
    for j, s in enumerate(range(start, n, acfg.chunk)):
        e = min(n, s + acfg.chunk)
        h0 = max(0, s - acfg.history)
        chunks.append({"key": f"ns{j}", "history": [(int(items[t]), float(ratings[t])) for t in range(h0, s)],
                       "items": [int(items[t]) for t in range(s, e)],
                       "real": {int(items[t]): float(ratings[t]) for t in range(s, e)}})
    pos = list(range(start, n))
    cands = [(a, b) for x, a in enumerate(pos) for b in pos[x + 1:] if ratings[a] != ratings[b]]
    pairs = []
    if cands and acfg.pair_questions:
        pick = rng.permutation(len(cands))[: acfg.pair_questions]
        for k, c in enumerate(pick):
            a, b = cands[int(c)]
            if rng.random() < 0.5:
                a, b = b, a
            pairs.append({"key": f"p{k + 1}", "a": int(items[a]), "b": int(items[b]),
                          "ra": float(ratings[a]), "rb": float(ratings[b])})
    whatif = []
    used_instead: set[int] = set()
    if acfg.whatif:
        for t in rng.permutation(pos):
            if len(whatif) >= acfg.whatif:
                break
            t = int(t)
            window = set(range(max(0, t - acfg.session), t + 1))
            others = [b for b in pos if b not in window and int(items[b]) not in used_instead
                      and ratings[b] != ratings[t]]
            if not others:
                continue
            b = int(others[int(rng.integers(len(others)))])
            used_instead.add(int(items[b]))
            whatif.append({"session": [(int(items[s]), float(ratings[s])) for s in range(max(0, t - acfg.session), t)],
                           "shown": (int(items[t]), float(ratings[t])), "instead": int(items[b]),
                           "real": float(ratings[b])})
    shown = sorted({i for c in chunks for i, _ in c["history"]} | {i for c in chunks for i in c["items"]}
                   | {i for w in whatif for i, _ in w["session"]} | {w["shown"][0] for w in whatif})
    demo_set = set(int(items[t]) for t in pos)
    return {"user_id": int(u), "chunks": chunks, "pairs": pairs, "whatif": whatif, "label": label,
            "demo_items": [int(items[t]) for t in pos], "context_items": [i for i in shown if i not in demo_set]}


def demonstrations_frame(plans: dict[int, dict], pool: pd.DataFrame) -> pd.DataFrame:
    """Every rating an alignment prompt shows: the demonstrations and the earlier ratings shown as context."""
    rows = []
    for u, p in plans.items():
        in_pair = {x for q in p["pairs"] for x in (q["a"], q["b"])}
        in_whatif = {x for w in p["whatif"] for x in (w["shown"][0], w["instead"])}
        for pos, i in enumerate(p["demo_items"]):
            rows.append((u, i, "demonstration", pos, i in in_pair, i in in_whatif))
        for i in p["context_items"]:
            rows.append((u, i, "context", -1, False, False))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "role", "position", "in_pair", "in_whatif"])
    df = df.merge(pool[["user_id", "item_id", "rating", "timestamp"]], on=["user_id", "item_id"], how="left")
    return df[["user_id", "item_id", "rating", "timestamp", "role", "position", "in_pair", "in_whatif"]] \
        .sort_values(["user_id", "role", "position", "item_id"]).reset_index(drop=True)


def ns_messages(p: dict, profile: str, rows, scale) -> list[list[dict]]:
    return [P.next_state_messages(p["user_id"], profile, [(p["label"].get(i) or P.movie_label(item_of(rows, i)), r)
                                                          for i, r in c["history"]],
                                  [item_of(rows, i) for i in c["items"]], scale) for c in p["chunks"]]


def pair_messages(p: dict, profile: str, rows, scale) -> list[dict]:
    return P.pair_messages(p["user_id"], profile, [(q["key"], item_of(rows, q["a"]), item_of(rows, q["b"]))
                                                   for q in p["pairs"]], scale)


def whatif_messages(p: dict, profile: str, rows, scale) -> list[dict]:
    lab = lambda i: P.movie_label(item_of(rows, i))  # noqa: E731
    cases = [{"session": [(lab(i), r) for i, r in w["session"]], "shown": (lab(w["shown"][0]), w["shown"][1]),
              "instead": item_of(rows, w["instead"])} for w in p["whatif"]]
    return P.whatif_messages(p["user_id"], profile, cases, scale)
