"""Item and user text, the inputs of the text encoder and the persona prompts."""

from __future__ import annotations

import pandas as pd

from rlsim.data.schema import genre_list

GENDERS = {"M": "male", "F": "female"}


def genre_text(genres: str) -> str:
    g = genre_list(genres)
    return "Genres: " + (", ".join(g) if g else "unknown")


def plot_text(title: str, overview: str) -> str:
    overview = (overview or "").strip()
    return f"{title}. {overview}" if overview else str(title)


def item_text(row) -> str:
    """Title, genres and overview in one string (prompts and similarity search)."""
    parts = [str(row["title"]), genre_text(row["genres"])]
    if row.get("overview"):
        parts.append(str(row["overview"]).strip())
    return ". ".join(parts)


def item_texts(items: pd.DataFrame) -> pd.DataFrame:
    """item_id, genre_text, plot_text, text for every item."""
    return pd.DataFrame({
        "item_id": items["item_id"].to_numpy(),
        "genre_text": [genre_text(g) for g in items["genres"]],
        "plot_text": [plot_text(t, o) for t, o in zip(items["title"], items["overview"])],
        "text": [item_text(r) for r in items.to_dict("records")],
    })


def user_text(row) -> str:
    age = row.get("age")
    gender = GENDERS.get(str(row.get("gender") or ""), "")
    occ = str(row.get("occupation") or "").strip()
    if pd.isna(age) and not gender and not occ:
        return "A MovieLens user (no demographics recorded)."
    who = " ".join(x for x in [f"{int(age)}-year-old" if not pd.isna(age) else "", gender] if x) or "person"
    return f"A {who}" + (f" who works as {'an' if occ[:1].lower() in 'aeiou' else 'a'} {occ}." if occ and occ not in ("none", "other") else ".")


def user_texts(users: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"user_id": users["user_id"].to_numpy(), "text": [user_text(r) for r in users.to_dict("records")]})
