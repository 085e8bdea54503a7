"""The plan of a rating job: its shards (consecutive users, in id order), the manifest's digest of
them, the identity a rerun must match to resume, and the manifest's load-or-create."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from rlsim.errors import ConfigError
from rlsim.io import read_json
from rlsim.personas.backends import BackendSpec
from rlsim.personas.config import PersonaConfig
from rlsim.personas.grounding import UnitSource, WorkUnit

IDENTITY_ADDED = ("prompts_sha256", "text_model")  # identity keys later rlsim versions added
JOB_FORMAT = 2  # bumped when the job folder's layout changes (older folders are refused)


def plan_shards(units: list[WorkUnit], shard_users: int) -> dict[str, list[WorkUnit]]:
    users = sorted({u.user_id for u in units})
    shard_of = {u: f"shard-{j // max(1, shard_users):05d}" for j, u in enumerate(users)}
    out: dict[str, list[WorkUnit]] = {}
    for u in units:
        out.setdefault(shard_of[u.user_id], []).append(u)
    return out


def plan_entry(unit_ids) -> str:
    """A shard's entry in the manifest's plan: '<units>:<digest of its sorted unit ids>' (the ids
    themselves would make the manifest as large as the run)."""
    ids = sorted(set(unit_ids))
    return f"{len(ids)}:{hashlib.sha1(chr(10).join(ids).encode()).hexdigest()[:16]}"


class JobPlan:
    """The shards of a job: ``shard_users`` consecutive users each (in id order), and their units,
    built when a shard's turn comes (a ``UnitSource``) or taken from a list."""

    def __init__(self, units: "list[WorkUnit] | UnitSource", shard_users: int):
        self.k = max(1, int(shard_users))
        if isinstance(units, UnitSource):
            self.source, self.lists = units, None
            self.users = units.users
        else:
            units = list(units)
            self.source = None
            self.lists = plan_shards(units, self.k)
            self.users = np.array(sorted({int(u.user_id) for u in units}), dtype=np.int64)
        self.names = [f"shard-{j:05d}" for j in range((len(self.users) + self.k - 1) // self.k)]
        self.index = {s: j for j, s in enumerate(self.names)}
        self.sizes: dict[str, int] = {}  # units per shard (with repeats), from entries()
        self.planned_pairs = 0

    def users_of(self, shard: str) -> np.ndarray:
        j = self.index[shard]
        return self.users[j * self.k:(j + 1) * self.k]

    def units(self, shard: str) -> list[WorkUnit]:
        if self.lists is not None:
            return self.lists.get(shard, [])
        return self.source.build(self.users_of(shard))

    def unit_ids(self, shard: str) -> list[tuple[str, int]]:
        if self.lists is not None:
            return [(u.unit_id, len(u.item_ids)) for u in self.lists.get(shard, [])]
        return self.source.unit_ids(self.users_of(shard))

    def entries(self) -> dict[str, str]:
        """The manifest's plan, one shard at a time; counts the planned pairs on the way."""
        plan, self.planned_pairs = {}, 0
        for s in self.names:
            ids = self.unit_ids(s)
            plan[s] = plan_entry(i for i, _ in ids)
            self.sizes[s] = len(ids)
            self.planned_pairs += sum(n for _, n in ids)
        return plan

    def shard_of_user(self, user_id: int) -> str | None:
        p = int(np.searchsorted(self.users, user_id))
        if p < len(self.users) and self.users[p] == user_id:
            return self.names[p // self.k]
        return None


def job_identity(spec: BackendSpec, cfg: PersonaConfig, context: dict | None = None) -> dict:
    """What must match for a rerun into the same folder to resume (never the key, budget or limits)."""
    from rlsim.personas.prompts import rating_prompts_sha256

    ident = {"format": JOB_FORMAT, **spec.cache_identity(), "batch_size": cfg.batch_size,
             "k_similar": cfg.k_similar, "profile": cfg.profile, "temperature": cfg.temperature,
             "max_output_tokens": cfg.max_output_tokens, "seed": cfg.seed, "prompts_sha256": rating_prompts_sha256()}
    if spec.kind == "offline":
        ident = {"format": JOB_FORMAT, "backend": "offline", "offline": dict(vars(cfg.offline))}
    return {**ident, **(context or {})}


def load_manifest(out_dir: Path, plan: dict[str, str], identity: dict) -> dict:
    p = out_dir / "manifest.json"
    if p.is_file():
        m = read_json(p)
        old = m.get("identity") or {}
        # A folder written before plans were digests lists each shard's unit ids.
        m["plan"] = {s: plan_entry(v) if isinstance(v, list) else v for s, v in (m.get("plan") or {}).items()}
        if m.get("plan") != plan or old != identity:
            keys = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            # A folder from before the prompts digest / text model were part of the identity cannot
            # show they match: refused like any other older job, saying so.
            older = "format" in keys or any(k in IDENTITY_ADDED and k not in old for k in keys)
            what = ("the pairs (users or items) differ" if m.get("plan") != plan else
                    older and f"it was written by an older rlsim ({', '.join(keys)} differ)"
                    or f"{', '.join(keys)} differ")
            raise ConfigError(f"{out_dir} holds a different rating job ({what}); use a new --out folder")
        m["resumed"] = m.get("resumed", 0) + 1
        return m
    return {"plan": plan, "identity": identity, "shards": {}, "resumed": 0, "created": time.time()}


def job_key(out_dir: Path, identity: dict) -> str:
    blob = json.dumps({"out": str(out_dir.resolve()), "identity": identity}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
