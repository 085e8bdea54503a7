"""Benchmarks measure each case in a fresh process (its own peak memory): run one, read its RESULT line."""

from __future__ import annotations

import json
import subprocess
import time


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
