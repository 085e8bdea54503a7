"""Benchmarks measure each case in a fresh process (its own peak memory): run one, read its RESULT line.
Also what the benchmarks share to read settings from their command line."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path


def write_result(out: dict, path, script: str, argv, t0: float) -> int:
    """Stamp a benchmark's JSON with its command line, wall time and machine, write it, say where."""
    import platform
    import sys

    from rlsim.io import write_json

    out.update(command=f"python bench/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
               wall_seconds=round(time.perf_counter() - t0, 1), machine=platform.machine(), cores=os.cpu_count())
    write_json(path, out)
    print(f"wrote {path}")
    return 0


def reward_settings(items: list[str]) -> dict[str, dict]:
    """["NAME:KEY=VALUE" or "KEY=VALUE" (NAME "")] -> {NAME: {KEY: VALUE}}, typed as RewardConfig's field."""
    from rlsim.reward.config import RewardConfig

    out: dict[str, dict] = {}
    for item in items:
        name, kv = item.split(":", 1) if ":" in item.split("=", 1)[0] else ("", item)
        key, value = kv.split("=", 1)
        kind = type(getattr(RewardConfig(), key))
        out.setdefault(name, {})[key] = value.lower() in ("1", "true") if kind is bool else kind(value)
    return out


def measure_child(cmd: list[str], env: dict, timeout: float) -> dict:
    """The JSON after the child's ``RESULT `` line, or {"error": ...}; with process_seconds."""
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        res = json.loads(line[7:]) if line else {"error": (r.stderr or r.stdout)[-1500:]}
    except subprocess.TimeoutExpired:
        res = {"error": f"timed out after {timeout} s"}
    res["process_seconds"] = round(time.perf_counter() - t0, 1)
    return res


# ---------------------------------------------------------------- /proc sampling of a process tree

def proc_status(pid: int) -> dict:
    """VmRSS and VmHWM (MB) of one process; {} once it has gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def descendants(root: int) -> list[int]:
    """Every process under ``root`` (children, grandchildren, ...), from /proc's parent links."""
    kids: dict[int, list[int]] = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(p))
    out, todo = [], list(kids.get(root, []))
    while todo:
        x = todo.pop()
        out.append(x)
        todo.extend(kids.get(x, []))
    return out


def proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="ignore")
    except OSError:
        return ""
