"""Datasets in one schema: ratings(user_id, item_id, rating, timestamp), items, users."""

from rlsim.data.movielens import SPECS, get_spec, load_movielens, verify_members
from rlsim.data.readers import read_overviews
from rlsim.data.schema import Dataset, RatingScale, genre_list
from rlsim.data.splits import Split, holdout_validation, make_split
from rlsim.data.text import item_texts, user_texts


def load_split(cfg) -> tuple[Dataset, Split]:
    """Dataset and split named by a DataConfig (the usual first line of every stage)."""
    ds = load_movielens(cfg.dataset, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir,
                        overviews=cfg.overviews, download=cfg.download)
    return ds, make_split(ds, cfg.split, seed=cfg.seed, test_frac=cfg.test_frac)


__all__ = [
    "SPECS", "Dataset", "RatingScale", "Split", "genre_list", "get_spec", "holdout_validation",
    "item_texts", "load_movielens", "load_split", "make_split", "read_overviews", "user_texts", "verify_members",
]
