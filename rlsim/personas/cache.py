"""Content-addressed response cache: reruns are free and give the same answers.

Key = sha256 of (backend, model, base URL, request parameters, messages). The API key is never
part of the key or the value. Stored in one SQLite file (WAL, so several actors on one machine
can share it) under <cache_dir>/personas/responses.sqlite.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path


def request_key(backend: str, model: str, base_url: str | None, params: dict, messages: list[dict]) -> str:
    blob = json.dumps({"backend": backend, "model": model, "base_url": base_url or "", "params": params,
                       "messages": messages}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False)
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._conn.commit()

    @classmethod
    def in_dir(cls, cache_dir: str | Path) -> "ResponseCache":
        return cls(Path(cache_dir).expanduser() / "personas" / "responses.sqlite")

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM responses WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict) -> None:
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO responses (key, value) VALUES (?, ?)", (key, json.dumps(value)))
            self._conn.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
