"""The shards of a running rating job: ``ShardWriter`` journals each finished unit, holds the rows of
open shards only and writes a shard's Parquet when its units are in; ``finish_job`` streams
OUT/ratings.parquet from the shard files and writes the summary."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rlsim.io import write_json, write_parquet
from rlsim.personas.grounding import WorkUnit
from rlsim.personas.journal import (ROW_COLUMNS, ROW_SCHEMA, Journal, Replay, clean_row, is_final, merge_rows,
                                    not_final_mask)
from rlsim.personas.plan import JobPlan
from rlsim.personas.usage import empty_usage, merge_usage

MANIFEST_EVERY_S = 1.0  # finished shards reach OUT/manifest.json at most this often (and at the end)
RATINGS_ROW_GROUP = 100_000  # rows per row group of OUT/ratings.parquet (what finish_job holds at once)


class ShardWriter:
    """Records each finished unit in the journal at once; holds the rows of open shards only (those
    with units in flight or not yet sent); writes a shard's Parquet when its units are in, records it
    in the manifest and drops its rows.

    ``todo()`` opens the shards in order and yields (planned unit, what is left of it): the units of
    a shard are built when its turn comes. ``max_open_shards``, ``max_rows_held`` and
    ``max_in_flight`` (set by the runners) are probes of what the driver held at most.
    """

    def __init__(self, out_dir: Path, plan: JobPlan, manifest: dict, journal: Journal, replay: Replay):
        self.out_dir = out_dir
        self.plan = plan
        self.manifest = manifest
        self.journal = journal
        self.replay = replay
        self.state = replay.state
        self.lines = replay.lines
        self.run = int(manifest.get("resumed", 0))
        self.open: dict[str, dict] = {}  # shard -> {"units": [...], "waiting": {unit ids}}
        self.usage = empty_usage()
        self.retried = 0
        self.rows_held = sum(len(v) for v in self.state.values())
        self.max_rows_held = self.rows_held
        self.max_open_shards = 0
        self.max_in_flight = 0
        self.shards_written = 0
        self._saved_at = 0.0

    # ------------------------------------------------------------ opening shards
    def units_to_rate(self) -> int:
        """Planned units of the shards that are opened (an upper bound of what is sent)."""
        return sum(self.plan.sizes.get(s, 0) for s in self.plan.names if s not in self.replay.final)

    def todo(self, skipped: Callable[[int], None] | None = None):
        for s in self.plan.names:
            if s in self.replay.final:
                continue
            units = self.plan.units(s)
            if s in self.replay.in_file:
                self._load_from_file(s, units)
            todo = []
            for u in units:
                have = self.state.get(u.unit_id, {})
                left = [i for i in u.item_ids if i not in have or not is_final(have[i]["status"], have[i]["reason"])]
                if not left:
                    continue
                again = [i for i in left if i in have]
                self.retried += len(again)
                sub = u if len(left) == len(u.item_ids) else u.subset(left)
                # Skip the cached answers earlier runs already used for these items (asked again, not replayed).
                offset = max((have[i]["attempts"] for i in again), default=0)
                if offset:
                    sub = dataclasses.replace(sub, answer_offset=u.answer_offset + offset)
                todo.append((u, sub))
            self.open[s] = {"units": units, "waiting": {u.unit_id for u, _ in todo}}
            self.max_open_shards = max(self.max_open_shards, len(self.open))
            if skipped is not None and len(units) > len(todo):
                skipped(len(units) - len(todo))
            if not todo:
                self._write_shard(s)  # complete in the journal, but its Parquet was not written (or is stale)
                continue
            if self.manifest["shards"].pop(s, None) is not None:
                self.save_manifest()  # written again when its work is done
            yield from todo

    def _load_from_file(self, s: str, units: list[WorkUnit]) -> None:
        """A done shard's rows from its Parquet (what the journal holds for it: the counts matched)."""
        df = pd.read_parquet(self.out_dir / self.manifest["shards"][s]["file"])
        by_pair: dict[tuple[int, int], list[dict]] = {}
        for r in df.to_dict("records"):
            by_pair.setdefault((int(r["user_id"]), int(r["item_id"])), []).append(clean_row(r))
        for u in units:
            rows = {}
            for i in u.item_ids:
                got = by_pair.get((int(u.user_id), int(i)))
                if got:
                    rows[int(i)] = got.pop(0)  # a pair in two units: the file has both rows, in unit order
            if rows:
                self.state[u.unit_id] = rows
                self._held(len(rows))

    # ------------------------------------------------------------ results
    def add(self, unit: WorkUnit, res: dict) -> None:
        self.journal.append(unit.unit_id, self.run, res["rows"], res["usage"])
        have = self.state.setdefault(unit.unit_id, {})
        n = len(have)
        merge_rows(have, res["rows"])
        self._held(len(have) - n)
        self.usage = merge_usage(self.usage, res["usage"])
        s = self.plan.shard_of_user(unit.user_id)
        self.lines[s] = self.lines.get(s, 0) + 1
        sh = self.open[s]
        sh["waiting"].discard(unit.unit_id)  # a retried unit overwrites itself: no duplicates
        if not sh["waiting"]:
            self._write_shard(s)

    def _held(self, n: int) -> None:
        self.rows_held += n
        self.max_rows_held = max(self.max_rows_held, self.rows_held)

    def rows_of(self, shard: str) -> pd.DataFrame:
        units = self.open[shard]["units"] if shard in self.open else self.plan.units(shard)
        rows = [r for u in units for r in self.state.get(u.unit_id, {}).values()]
        df = pd.DataFrame(rows, columns=ROW_COLUMNS)
        df["rating"] = df["rating"].astype(float)
        df["raw"] = df["raw"].astype(float)
        return df.sort_values(["user_id", "item_id"], kind="stable").reset_index(drop=True)

    def _write_shard(self, s: str) -> None:
        df = self.rows_of(s)
        fname = f"{s}.parquet"
        write_parquet(df, self.out_dir / "shards" / fname)
        failed = df["status"] != "ok"
        retryable = int(sum(not is_final(st, r) for st, r in zip(df["status"], df["reason"])))
        self.manifest["shards"][s] = {"status": "done", "file": f"shards/{fname}", "rows": len(df),
                                      "failed": int(failed.sum()), "retryable": retryable,
                                      "journal_lines": self.lines.get(s, 0)}
        for u in self.open.pop(s, {"units": []})["units"]:
            self._held(-len(self.state.pop(u.unit_id, {})))
        self.shards_written += 1
        self.save_manifest()

    def save_manifest(self, force: bool = False) -> None:
        """At most every MANIFEST_EVERY_S: the journal is the record, the manifest a summary of it that
        a resume checks (a shard finished since the last write is taken from the journal)."""
        now = time.monotonic()
        if force or now - self._saved_at >= MANIFEST_EVERY_S:
            write_json(self.out_dir / "manifest.json", self.manifest)
            self._saved_at = now


def stream_ratings(out_dir: Path, plan: JobPlan, manifest: dict, path: Path) -> dict:
    """Concatenate the shard files (in plan order: users ascending, each sorted by user and item)
    into one Parquet at ``path``, a row group at a time; returns the counts of the summary."""
    counts = {"pairs": 0, "rated": 0, "failed": 0, "retryable_failed": 0, "duplicates": 0}
    reasons: dict[str, int] = {}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    buf: list[pa.Table] = []
    held = 0
    with pq.ParquetWriter(tmp, ROW_SCHEMA) as w:
        for s in plan.names:
            e = manifest["shards"].get(s)
            if e is None or not (out_dir / e["file"]).is_file():
                continue
            t = pq.read_table(out_dir / e["file"], columns=ROW_COLUMNS)
            t = pa.Table.from_arrays([t.column(c).cast(ROW_SCHEMA.field(c).type) for c in ROW_COLUMNS],
                                     schema=ROW_SCHEMA)
            df = t.select(["user_id", "item_id", "status", "reason"]).to_pandas()
            failed = (df["status"] != "ok").to_numpy(bool)
            counts["pairs"] += len(df)
            counts["failed"] += int(failed.sum())
            counts["rated"] += int((~failed).sum())
            counts["retryable_failed"] += int(not_final_mask(df["status"], df["reason"]).sum())
            # Shards split the users, so a pair can only repeat within one.
            counts["duplicates"] += int(df.duplicated(["user_id", "item_id"]).sum())
            for k, v in df.loc[failed, "reason"].value_counts(sort=False).items():
                reasons[k] = reasons.get(k, 0) + int(v)
            buf.append(t)
            held += t.num_rows
            if held >= RATINGS_ROW_GROUP:
                w.write_table(pa.concat_tables(buf), row_group_size=RATINGS_ROW_GROUP)
                buf, held = [], 0
        if buf or counts["pairs"] == 0:
            w.write_table(pa.concat_tables(buf) if buf else ROW_SCHEMA.empty_table(),
                          row_group_size=RATINGS_ROW_GROUP)
    tmp.replace(path)
    counts["failure_reasons"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1]))
    return counts


def finish_job(out_dir: Path, plan: JobPlan, manifest: dict, writer: ShardWriter, elapsed_s: float,
               usage_before: dict, spent_before: float, retried: int, limits: dict) -> dict:
    """OUT/ratings.parquet streamed from the shard files, and the summary counted on the way (never
    a frame of the whole run)."""
    c = stream_ratings(out_dir, plan, manifest, out_dir / "ratings.parquet")
    planned = plan.planned_pairs
    usage = merge_usage(usage_before, writer.usage)
    summary = {"pairs": c["pairs"], "planned_pairs": planned, "missing_pairs": planned - c["pairs"],
               "rated": c["rated"], "failed": c["failed"], "failure_reasons": c["failure_reasons"],
               "retryable_failed": c["retryable_failed"], "retried": retried, "duplicates": c["duplicates"],
               "usage": usage, "usage_this_run": writer.usage,
               "spent_usd": max(float(usage["cost_usd"]), spent_before + float(writer.usage["cost_usd"])),
               "elapsed_s": elapsed_s, "resumed": manifest.get("resumed", 0),
               "shards": len(manifest["shards"]), "planned_shards": len(manifest["plan"]), "limits": limits}
    manifest["summary"] = summary
    write_json(out_dir / "manifest.json", manifest)
    return summary
