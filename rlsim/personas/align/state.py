"""What the steps of one alignment run share (``align.run``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from rlsim.config import DataConfig
from rlsim.data.schema import Dataset
from rlsim.data.splits import Split
from rlsim.personas.align.config import AlignConfig
from rlsim.personas.backends import BackendSpec
from rlsim.personas.config import PersonaConfig
from rlsim.personas.pairs import rate_pairs


@dataclasses.dataclass
class AlignRun:
    """What the steps of one alignment run share (set up by ``prepare``)."""

    data_cfg: DataConfig
    cfg: PersonaConfig
    acfg: AlignConfig
    spec: BackendSpec
    out: Path
    profiles: str | Path | None  # a profiles folder, or None (structured profiles built now)
    api_key: str | None
    use_ray: bool
    progress: bool
    ds: Dataset
    split: Split
    msplit: Split  # the prompts of this run (alignment and measurement) see the demonstration pool only
    chosen: np.ndarray  # the users asked for (aligned, failed or skipped)
    pool: pd.DataFrame  # the demonstration pool: the chosen users' training ratings outside validation
    val: pd.DataFrame  # the chosen users' validation slice (before/after are measured there)
    notes: list[str]
    current: dict[int, list[str]]  # earlier lessons per user (--lessons), refined by this run
    cinfo: dict | None  # where the earlier lessons came from
    texts: dict[int, str]
    pinfo: dict
    align_texts: dict[int, str]  # profiles with the earlier lessons: what alignment prompts show
    rows: dict[int, dict]
    plans: dict[int, dict]
    skipped: dict[int, str]
    demos: pd.DataFrame
    version: int  # of the lessons this run writes

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
