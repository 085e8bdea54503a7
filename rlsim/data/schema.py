"""The canonical schema every dataset is parsed into (and cached as Parquet)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

RATING_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
ITEM_COLUMNS = ["item_id", "title", "year", "genres", "overview"]
USER_COLUMNS = ["user_id", "age", "gender", "occupation"]


@dataclass(frozen=True)
class RatingScale:
    """The dataset's own rating scale: ratings are min, min+step, ..., max."""

    min: float
    max: float
    step: float

    @property
    def values(self) -> np.ndarray:
        n = int(round((self.max - self.min) / self.step)) + 1
        return self.min + self.step * np.arange(n, dtype=np.float64)

    @property
    def n_classes(self) -> int:
        return len(self.values)

    def to_class(self, ratings) -> np.ndarray:
        """Rating values to class indices 0..n_classes-1."""
        r = np.asarray(ratings, dtype=np.float64)
        # Half-way values round up (4.5 -> 5), unlike numpy's round-half-to-even.
        return np.clip(np.floor((r - self.min) / self.step + 0.5), 0, self.n_classes - 1).astype(np.int64)

    def from_class(self, classes) -> np.ndarray:
        return self.min + self.step * np.asarray(classes, dtype=np.float64)

    def round(self, predictions) -> np.ndarray:
        """Snap predictions to the nearest valid rating."""
        return self.from_class(self.to_class(predictions))

    def clip(self, predictions) -> np.ndarray:
        return np.clip(np.asarray(predictions, dtype=np.float64), self.min, self.max)

    def to_dict(self) -> dict:
        return {"min": self.min, "max": self.max, "step": self.step}


@dataclass
class Dataset:
    """Ratings, items and users of one MovieLens release, on its own rating scale."""

    name: str
    ratings: pd.DataFrame  # user_id:int64, item_id:int64, rating:float64, timestamp:int64
    items: pd.DataFrame  # item_id:int64, title:str, year:Int64, genres:str ("A|B"), overview:str
    users: pd.DataFrame  # user_id:int64, age:Int64, gender:str, occupation:str
    scale: RatingScale
    # Official train/test folds shipped with the release (ml-100k: u1..u5, ua, ub).
    official_splits: dict[str, tuple[pd.DataFrame, pd.DataFrame]]

    def summary(self) -> dict:
        return {
            "dataset": self.name,
            "ratings": int(len(self.ratings)),
            "users": int(self.ratings.user_id.nunique()),
            "items": int(len(self.items)),
            "rated_items": int(self.ratings.item_id.nunique()),
            "scale": self.scale.to_dict(),
            "official_splits": sorted(self.official_splits),
            "items_with_overview": int((self.items.overview.str.len() > 0).sum()),
        }


def normalise_ratings(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "user_id": df["user_id"].astype("int64"),
            "item_id": df["item_id"].astype("int64"),
            "rating": df["rating"].astype("float64"),
            "timestamp": df["timestamp"].astype("int64"),
        }
    )
    return out.reset_index(drop=True)


def genre_list(genres: str) -> list[str]:
    return [g for g in str(genres).split("|") if g and g != "(no genres listed)"]


def has_timestamps(ratings) -> bool:
    """Whether the ratings carry an order in time: some user has two different timestamps. Without
    one (a file of zeros or one constant) the temporal split and the session replays are off."""
    if "timestamp" not in ratings or len(ratings) < 2:
        return False
    return bool((ratings.groupby("user_id")["timestamp"].nunique() > 1).any())


NO_TIMESTAMPS = "no timestamps in the ratings (every user's are equal): the session replay is off"

