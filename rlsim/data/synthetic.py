"""Synthetic MovieLens-shaped datasets at any size, generated from a real dataset's statistics.

SYNTHETIC DATA: every rating is drawn from a latent-factor model; no real (user, item, rating)
triple is copied. What is taken from the source dataset (a local copy, at generation time) are
aggregate shapes only:

- ratings per user (its empirical distribution, rescaled to the target mean);
- the item popularity curve (rank-frequency, so its power-law exponent), mapped onto the target
  catalogue by relative rank;
- the joint distribution of each user's (mean, sd) of ratings, and the global rating histogram
  (ratings are the quantised scores, thresholds chosen so the histogram matches);
- how strongly an item's mean rating follows its popularity; the timestamps' range, each user's
  first-rating time and activity span;
- item text (title, year, genres, overview) of real movies, reused as templates: a synthetic
  item copies the text of the source item at the same popularity quantile (copies beyond the
  first get a "#n" in the title); demographics are resampled from the source's users.

Scores: ``x_ui = a * b_i + t * p_u . q_i + e * noise``, standardised within each user, then
``z = mean_u + sd_u * x`` is quantised on the source's scale. q_i is half explained by the
template's genres, so item text carries signal. Generation is seeded and chunked by users
(Parquet row groups), so 25M ratings need a few hundred MB.

Datasets are named ``synthetic-<size>[-from-<source>]`` (sizes: 100k, 1m, 10m, 25m, with the user
and item counts of the MovieLens release of that size; default source ml-latest-small). A name
is loaded from ``<data_dir>/<name>/`` when `rlsim data synth` wrote it there, else generated once
into the cache. ``rlsim data synth`` makes any other size.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from rlsim.data.schema import ITEM_COLUMNS, USER_COLUMNS, Dataset, RatingScale
from rlsim.data.synthetic_model import (DEFAULT_SOURCE, SynthConfig, SynthModel, items_table, source_stats,
                                        users_table)
from rlsim.errors import DataError

# SynthConfig is re-exported: callers configure, generate and load from this one module.
__all__ = ["DEFAULT_SOURCE", "GENERATOR_VERSION", "META_FILE", "PRESETS", "SynthConfig", "default_counts", "generate",
           "is_synthetic", "load_synthetic", "locate_synthetic", "parse_size", "preset_config", "read_meta",
           "read_synthetic"]

GENERATOR_VERSION = 1
# (ratings, users, items) of the MovieLens release of each size (items: those with a rating).
PRESETS: dict[str, tuple[int, int, int]] = {
    "100k": (100_000, 943, 1_682),
    "1m": (1_000_000, 6_040, 3_706),
    "10m": (10_000_000, 69_878, 10_677),
    "25m": (25_000_000, 162_541, 62_423),
}
META_FILE = "synthetic.json"
_NAME = re.compile(r"^synthetic-(?P<size>[0-9a-z.]+?)(?:-from-(?P<source>.+))?$")


def parse_size(text: str) -> int:
    """'100k' -> 100000, '2.5m' -> 2500000, '12345' -> 12345."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([km]?)", str(text).strip().lower())
    if not m:
        raise DataError(f"not a size: {text!r} (e.g. 100k, 1m, 2.5m, 250000)")
    return int(round(float(m.group(1)) * {"": 1, "k": 1_000, "m": 1_000_000}[m.group(2)]))


def preset_config(name: str) -> SynthConfig | None:
    """SynthConfig of a preset name (synthetic-10m, synthetic-1m-from-ml-100k), else None."""
    m = _NAME.match(name)
    if not m or m.group("size") not in PRESETS:
        return None
    n, u, i = PRESETS[m.group("size")]
    return SynthConfig(n_ratings=n, n_users=u, n_items=i, source=m.group("source") or DEFAULT_SOURCE)


def default_counts(source: Dataset, n_ratings: int, item_growth: float = 0.4) -> tuple[int, int]:
    """(users, items) for n_ratings: users at the source's ratings per user, items growing as
    (n_ratings / source ratings)^item_growth (MovieLens 100k -> 1M -> 10M grew about so)."""
    r = source.ratings
    per_user = len(r) / max(r["user_id"].nunique(), 1)
    n_src_items = max(int(r["item_id"].nunique()), 1)
    users = max(1, int(round(n_ratings / per_user)))
    items = max(1, int(round(n_src_items * (n_ratings / len(r)) ** item_growth)))
    # Enough room for every user's ratings (at most half the catalogue each).
    items = max(items, int(np.ceil(2 * n_ratings / users)) + 1)
    return users, items


def is_synthetic(name: str) -> bool:
    return str(name).startswith("synthetic")


# ---------------------------------------------------------------- writing


def generate(source: Dataset, cfg: SynthConfig, out_dir: str | Path, name: str | None = None,
             progress: bool = False) -> Path:
    """Write a synthetic dataset folder (ratings/items/users Parquet + synthetic.json); returns it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    cfg.validate()
    stats = source_stats(source)
    model = SynthModel(stats, cfg)
    model.calibrate()
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("rating", pa.float64()),
                        ("timestamp", pa.int64())])
    with pq.ParquetWriter(tmp / "ratings.parquet", schema) as writer, \
            tqdm(total=cfg.n_ratings, unit="rating", unit_scale=True, desc=f"generate {name or out.name}",
                 disable=not progress) as bar:
        for c, a in enumerate(range(0, cfg.n_users, cfg.chunk_users)):
            b = min(a + cfg.chunk_users, cfg.n_users)
            rng = np.random.default_rng([cfg.seed, 100, c])
            uu, ii, z, ts = model.scores(a, b, rng)
            o = np.lexsort((ts, uu))
            writer.write_table(pa.table({"user_id": uu[o] + 1, "item_id": ii[o] + 1,
                                         "rating": model.ratings(z[o]), "timestamp": ts[o]}, schema=schema))
            bar.update(len(uu))
    items_table(model).to_parquet(tmp / "items.parquet", index=False)
    users_table(model).to_parquet(tmp / "users.parquet", index=False)
    meta = {"name": name or out.name, "synthetic": True, "generator_version": GENERATOR_VERSION,
            "note": "SYNTHETIC: ratings drawn from a latent-factor model fitted to aggregate statistics of the "
                    "source; item text reused from the source's movies. Not real MovieLens ratings.",
            "config": asdict(cfg), "scale": stats.scale.to_dict(), "source": stats.summary,
            "source_stats": stats.describe(), "thresholds": model.thresholds.tolist()}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)
    return out


# ---------------------------------------------------------------- loading


def read_meta(folder: str | Path) -> dict:
    return json.loads((Path(folder) / META_FILE).read_text())


def read_synthetic(folder: str | Path, name: str | None = None) -> Dataset:
    folder = Path(folder)
    meta = read_meta(folder)
    s = meta["scale"]
    import pyarrow.parquet as pq

    # self_destruct frees each Arrow column once converted: no second copy of 10M+ ratings.
    ratings = pq.read_table(folder / "ratings.parquet").to_pandas(self_destruct=True, split_blocks=True)
    return Dataset(name=name or meta["name"], ratings=ratings,
                   items=pd.read_parquet(folder / "items.parquet")[ITEM_COLUMNS],
                   users=pd.read_parquet(folder / "users.parquet")[USER_COLUMNS],
                   scale=RatingScale(s["min"], s["max"], s["step"]), official_splits={})


def locate_synthetic(name: str, data_dir: Path | None) -> Path | None:
    if data_dir is None:
        return None
    for cand in (data_dir / name, data_dir):
        if (cand / META_FILE).is_file() and (cand.name == name or read_meta(cand).get("name") == name):
            return cand
    return None


def _cache_folder(cache_root: Path, name: str, cfg: SynthConfig, source: Dataset) -> Path:
    key = {"v": GENERATOR_VERSION, "cfg": asdict(cfg), "source": source.summary()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return cache_root / "synthetic" / f"{name}-{digest}"


def load_synthetic(name: str, data_dir: str | Path | None, cache_dir: str | Path, load_source,
                   progress: bool = True) -> Dataset:
    """A generated folder in data_dir, else a preset generated once into cache_dir/synthetic/.

    load_source(name) -> Dataset loads the real source (only needed to generate)."""
    ddir = Path(data_dir).expanduser() if data_dir is not None else None
    found = locate_synthetic(name, ddir)
    if found is not None:
        return read_synthetic(found, name)
    cfg = preset_config(name)
    if cfg is None:
        where = f" in {ddir}" if ddir is not None else ""
        raise DataError(f"no synthetic dataset '{name}'{where}; presets: "
                        f"{', '.join('synthetic-' + k for k in PRESETS)} (optionally -from-<source>), "
                        "or make one with `rlsim data synth`")
    source = load_source(cfg.source)
    folder = _cache_folder(Path(cache_dir).expanduser(), name, cfg, source)
    if not (folder / META_FILE).is_file():
        generate(source, cfg, folder, name=name, progress=progress)
    return read_synthetic(folder, name)
