"""What the steps of one alignment run share (``align.run``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from rlsim.data.splits import Split
from rlsim.personas.align.config import AlignConfig
from rlsim.personas.pairs import rate_pairs


@dataclasses.dataclass
class AlignRun:
    """What the steps of one alignment run share (set up by ``prepare``)."""

    data_cfg: object
    cfg: object
    acfg: AlignConfig
    spec: object
    out: Path
    profiles: object
    api_key: str | None
    use_ray: bool
    progress: bool
    ds: object
    split: Split
    msplit: Split  # the prompts of this run (alignment and measurement) see the demonstration pool only
    chosen: object
    pool: pd.DataFrame
    val: pd.DataFrame
    notes: list[str]
    current: dict[int, list[str]]
    cinfo: dict | None
    texts: dict[int, str]
    pinfo: dict
    align_texts: dict[int, str]
    rows: dict[int, dict]
    plans: dict[int, dict]
    skipped: dict[int, str]
    demos: pd.DataFrame
    version: int

    def rate(self, cfg, pairs: pd.DataFrame, job_dir: Path, *, dry_run: bool, progress: bool, lessons):
        return rate_pairs(self.ds, self.msplit, self.data_cfg, cfg, pairs, job_dir, profiles=self.profiles,
                          api_key=self.api_key, use_ray=self.use_ray, dry_run=dry_run, progress=progress,
                          crash_marker=None, lessons=lessons)


@dataclasses.dataclass
class Written:
    """What ``write_lessons`` wrote and counted."""

    entries: list[dict]  # the latest entry of every planned or skipped user, in user order
    ok: dict[int, list[str]]  # the lessons of the aligned users
    answers: pd.DataFrame
    status: dict
    user_fail: dict
    step_fail: dict[str, dict[str, int]]
    lessons_sha: str
