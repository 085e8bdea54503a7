"""Lessons from ``personas align``: how they are stored and checked (OUT/lessons.json + lessons.parquet
+ demonstrations.parquet), loaded for a rating job, cleaned, and appended to a user's profile line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from rlsim.errors import ConfigError
from rlsim.io import read_json
from rlsim.personas import prompts as P
from rlsim.personas.stages_common import split_fingerprint

LESSONS_FORMAT = 1
OFFLINE_LESSONS = "the offline persona is not an LLM and reads no lessons; drop --lessons or use an LLM backend"
MAX_LESSON_CHARS = 200


def sha_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def lessons_fingerprint(lessons: dict[int, list[str]]) -> str:
    return sha_json(sorted((int(u), list(v)) for u, v in lessons.items()))


def apply_lessons(texts: dict[int, str], lessons: dict[int, list[str]]) -> tuple[dict[int, str], dict]:
    """Profile texts with each user's lessons appended on the profile line; info for the job's summary."""
    out = dict(texts)
    used = {}
    for u in texts:
        ls = lessons.get(int(u)) or []
        if ls:
            out[u] = P.profile_with_lessons(texts[u], ls)
            used[int(u)] = list(ls)
    return out, {"users_with_lessons": len(used), "users": len(texts), "sha256": lessons_fingerprint(used)}


def lessons_dir(path) -> Path:
    p = Path(path)
    return p.parent if p.is_file() else p


def load_lessons(path, data_cfg, split) -> tuple[dict[int, list[str]], dict]:
    """Lessons from an align OUT folder (lessons.json + lessons.parquet), after checking they were built
    on this dataset and split and that no demonstration is a rating this split holds out."""
    d = lessons_dir(path)
    mp = d / "lessons.json"
    if not mp.is_file():
        raise ConfigError(f"no lessons in {path} (lessons.json missing): run `rlsim personas align --out {path}`")
    meta = read_json(mp)
    if meta.get("format") != LESSONS_FORMAT:
        raise ConfigError(f"lessons in {path} have format {meta.get('format')} (this rlsim reads {LESSONS_FORMAT}); "
                          "align again")
    if meta.get("dataset") != data_cfg.dataset or meta.get("split") != split.name:
        raise ConfigError(f"lessons in {path} were built on {meta.get('dataset')} split {meta.get('split')}, this "
                          f"job uses {data_cfg.dataset} split {split.name}; align on the same split")
    if meta.get("split_fingerprint") != split_fingerprint(split):
        raise ConfigError(f"lessons in {path} were built on another '{split.name}' split of {data_cfg.dataset} "
                          "(other seed or test fraction); align on the same split")
    for name in ("lessons.parquet", "demonstrations.parquet"):
        if not (d / name).is_file():
            raise ConfigError(f"lessons in {path} are incomplete ({name} missing): align again")
    demos = pd.read_parquet(d / "demonstrations.parquet", columns=["user_id", "item_id"])
    leak = demos.merge(split.test[["user_id", "item_id"]], on=["user_id", "item_id"])
    if len(leak):
        raise ConfigError(f"lessons in {path} were learned from {len(leak)} ratings this split holds out; "
                          "align on the same split")
    df = pd.read_parquet(d / "lessons.parquet")
    lessons = {int(u): [str(t) for t in g.sort_values("lesson")["text"]] for u, g in df.groupby("user_id")}
    info = {"source": str(d), "version": meta.get("version"), "sha256": meta.get("lessons_sha256"),
            "backend": meta.get("backend"), "model": meta.get("model"), "users_with_lessons": len(lessons),
            "profiles_sha256": (meta.get("profiles") or {}).get("sha256"),
            "validation": meta.get("validation")}
    return lessons, info


def clean_lessons(raw, max_lessons: int) -> list[str]:
    out: list[str] = []
    for x in raw if isinstance(raw, list) else []:
        if not isinstance(x, str):
            continue
        t = " ".join(x.split())
        if len(t) > MAX_LESSON_CHARS:
            t = t[:MAX_LESSON_CHARS].rsplit(" ", 1)[0] + " ..."
        if t and t.lower() not in {o.lower() for o in out}:
            out.append(t)
    return out[:max_lessons]
