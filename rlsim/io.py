"""Small helpers for the run folder: atomic JSON, Parquet, and merging metrics.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from rlsim.metrics import nan_to_none


def write_json(path: str | Path, obj: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(nan_to_none(obj), indent=2, sort_keys=False) + "\n")
    tmp.replace(p)
    return p


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def update_json(path: str | Path, updates: dict) -> dict:
    """Merge top-level keys into a JSON file (stages share one metrics.json)."""
    p = Path(path)
    data = read_json(p) if p.is_file() else {}
    data.update(updates)
    write_json(p, data)
    return data


def write_parquet(df: pd.DataFrame, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    df.to_parquet(tmp, index=False)
    tmp.replace(p)
    return p
