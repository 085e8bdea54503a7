"""OUT/align/journal.jsonl: the record of an alignment run, one line per finished user."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlsim.personas.journal import is_final
from rlsim.personas.usage import empty_usage, merge_usage


class AlignJournal:
    """OUT/align/journal.jsonl: one line per finished user (status, lessons, answers, usage), flushed at once."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> tuple[dict[int, dict], dict, dict[int, int]]:
        """(latest entry per user, usage of every run, runs per user)."""
        latest: dict[int, dict] = {}
        runs: dict[int, int] = {}
        usage = empty_usage()
        if not self.path.is_file():
            return latest, usage, runs
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue  # torn by a kill
                u = int(e["user_id"])
                usage = merge_usage(usage, e.get("usage", {}))
                runs[u] = runs.get(u, 0) + 1
                latest[u] = e
        return latest, usage, runs

    def append(self, entry: dict) -> None:
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = self.path.is_file() and self.path.stat().st_size > 0 and self.path.read_bytes()[-1:] != b"\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            if torn:
                fh.write("\n")
            fh.write(json.dumps(entry, default=_json_default) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(type(o).__name__)


def user_is_final(e: dict) -> bool:
    return e["status"] in ("ok", "skipped") or (e["status"] == "failed" and is_final("failed", e["reason"]))
