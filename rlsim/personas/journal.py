"""The record of a rating job: OUT/journal.jsonl (every finished unit, durable at once), OUT/spend.json
(the limiter's view of the job's spend) and what a rerun takes back from them (``replay_journal``).
Which failures are final on resume (``is_final``) is decided here too."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from rlsim.io import read_json
from rlsim.personas.plan import JobPlan
from rlsim.personas.usage import empty_usage, merge_usage

log = logging.getLogger(__name__)

ROW_COLUMNS = ["user_id", "item_id", "rating", "raw", "status", "reason", "attempts", "repaired", "source"]
ROW_SCHEMA = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("rating", pa.float64()),
                        ("raw", pa.float64()), ("status", pa.string()), ("reason", pa.string()),
                        ("attempts", pa.int64()), ("repaired", pa.bool_()), ("source", pa.string())])


# Failure reasons that are final on resume: the request itself is refused by the endpoint (bad
# request, unknown model or route, too large). Everything else is transient and asked again on the
# next run: budget, http_429/5xx/408/409, timeouts, connection errors, http_401/403 (the key is not
# part of the job, a new one may work), and unusable answers after all retries (malformed,
# truncated, missing or off-scale values: the LLM answering nonsense, which a new request may fix).
RETRY_ON_RESUME_4XX = {"http_401", "http_403", "http_408", "http_409", "http_429"}


def is_final(status: str, reason: str) -> bool:
    if status == "ok":
        return True
    r = str(reason or "")
    return r.startswith("http_4") and r not in RETRY_ON_RESUME_4XX


def not_final_mask(status: pd.Series, reason: pd.Series) -> np.ndarray:
    """``not is_final(status, reason)`` for columns."""
    r = reason.fillna("").astype(str)
    final = (status == "ok") | (r.str.startswith("http_4") & ~r.isin(RETRY_ON_RESUME_4XX))
    return ~final.to_numpy(bool)


def clean_row(r: dict) -> dict:
    out = {k: r.get(k) for k in ROW_COLUMNS}
    for k in ("rating", "raw"):
        v = out[k]
        out[k] = None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)
    out["user_id"], out["item_id"], out["attempts"] = int(out["user_id"]), int(out["item_id"]), int(out["attempts"])
    out["repaired"] = bool(out["repaired"])
    return out


def _user_of_unit(unit_id: str) -> int:
    return int(unit_id.rsplit(":", 1)[0])


class Journal:
    """OUT/journal.jsonl: one line per finished unit (rows and usage), appended and flushed at once.

    A kill loses at most the units in flight; a torn last line is ignored (and closed with a
    newline before the next append). Reading it back gives each item's latest row (attempts add
    up over runs) and everything ever spent. Lines are fsynced one by one, or once per group
    inside ``batch()`` (the Ray loop: the results one wait returned).
    """

    def __init__(self, path: Path):
        self.path = path
        self._fh = None
        self._defer = False
        self._unsynced = False

    def entries(self):
        """Each readable line, in order (streamed: the journal of a large job is never held)."""
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill

    def load(self) -> tuple[dict[str, dict[int, dict]], dict, int]:
        """Everything at once (small jobs and tests; ``run_rating_job`` streams ``entries``)."""
        rows: dict[str, dict[int, dict]] = {}
        usage = empty_usage()
        n = 0
        for e in self.entries():
            n += 1
            usage = merge_usage(usage, e.get("usage", {}))
            merge_rows(rows.setdefault(e["unit_id"], {}), e["rows"])
        return rows, usage, n

    def append(self, unit_id: str, run: int, rows: list[dict], usage: dict) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = False
            if self.path.is_file() and self.path.stat().st_size > 0:
                with open(self.path, "rb") as fh:
                    fh.seek(-1, os.SEEK_END)
                    torn = fh.read(1) != b"\n"
            self._fh = open(self.path, "a", encoding="utf-8")
            if torn:
                self._fh.write("\n")
        self._fh.write(json.dumps({"unit_id": unit_id, "run": run, "rows": [clean_row(r) for r in rows],
                                   "usage": usage}) + "\n")
        self._fh.flush()  # in the OS's hands: a kill -9 of this process loses nothing written
        if self._defer:
            self._unsynced = True
        else:
            os.fsync(self._fh.fileno())

    def sync(self) -> None:
        if self._fh is not None and self._unsynced:
            os.fsync(self._fh.fileno())
        self._unsynced = False

    @contextlib.contextmanager
    def batch(self):
        """Appends inside are flushed at once and fsynced together at the end."""
        self._defer = True
        try:
            yield self
        finally:
            self._defer = False
            self.sync()

    def close(self) -> None:
        if self._fh is not None:
            self.sync()
            self._fh.close()
            self._fh = None


def merge_rows(have: dict[int, dict], new_rows: list[dict]) -> None:
    """A newer row for an item replaces the older one; its attempts add to the earlier runs'."""
    for r in new_rows:
        r = clean_row(r)
        old = have.get(r["item_id"])
        if old is not None:
            r["attempts"] += old["attempts"]
        have[r["item_id"]] = r


class SpendLedger:
    """OUT/spend.json: the job's spend as its limiter sees it (settled + reserved), rewritten by the
    limiter at every reservation and settlement (``RateLimiter.register(ledger=...)``)."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> float:
        if not self.path.is_file():
            return 0.0
        try:
            d = read_json(self.path)
        except (OSError, json.JSONDecodeError):
            return 0.0
        # Reservations of a killed run may have been sent: they count (a hard cap errs on the safe side).
        return float(d.get("spent_usd", 0.0)) + float(d.get("reserved_usd", 0.0))


@dataclasses.dataclass
class Replay:
    """What a rerun takes from the journal: the rows of shards not safely in their Parquet files,
    journal lines per shard, and everything ever spent."""

    state: dict[str, dict[int, dict]]
    lines: dict[str, int]
    usage: dict
    final: set[str]  # done, checked against the journal, nothing left to retry: not opened again
    in_file: set[str]  # done and checked, with transient failures to retry: rows come from the Parquet
    rows_kept: int = 0  # rows of the journal held after the replay


def replay_journal(journal: Journal, plan: JobPlan, manifest: dict, out_dir: Path) -> Replay:
    """Stream the journal once, keeping only the rows of shards that need them.

    A shard recorded as done in the manifest, whose Parquet file is there and whose number of
    journal lines is the one recorded when the file was written, is taken from the file: its lines
    are counted, not kept. Any other shard (not done; killed before the manifest was written; a
    torn or missing journal line; a folder from before the count was recorded) gets its rows from
    the journal, as before (a second pass when a count does not match).
    """
    done = {s: e for s, e in manifest["shards"].items()
            if s in plan.index and e.get("status") == "done" and "journal_lines" in e
            and (out_dir / e.get("file", "-")).is_file()}
    state: dict[str, dict[int, dict]] = {}
    lines: dict[str, int] = {}
    usage = empty_usage()

    def stream(keep) -> None:
        nonlocal usage
        for e in journal.entries():
            s = plan.shard_of_user(_user_of_unit(e["unit_id"]))
            if keep is None:
                usage = merge_usage(usage, e.get("usage", {}))
                if s is not None:
                    lines[s] = lines.get(s, 0) + 1
            if s is not None and (s not in done if keep is None else s in keep):
                merge_rows(state.setdefault(e["unit_id"], {}), e["rows"])

    stream(None)
    suspect = {s for s, e in done.items() if lines.get(s, 0) != e["journal_lines"]}
    if suspect:
        log.info("%d finished shards differ from the journal; their rows are read from it", len(suspect))
        for s in suspect:
            del done[s]
        stream(suspect)
    final = {s for s, e in done.items() if int(e.get("retryable", 1)) == 0}
    return Replay(state, lines, usage, final, set(done) - final, sum(len(v) for v in state.values()))
