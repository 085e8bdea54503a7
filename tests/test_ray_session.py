"""The private Ray a command starts: no dashboard, no idle workers kept warm (memory at rest)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_private_ray_keeps_no_idle_workers_and_no_dashboard(monkeypatch):
    import shutil
    import tempfile

    from rlsim.commands.ray_session import cli_ray

    tmp = tempfile.mkdtemp(prefix="rlsim-rs-", dir="/tmp")  # Ray's socket paths must stay short
    monkeypatch.setenv("RLSIM_RAY_TEMP_DIR", tmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        _check(cli_ray)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check(cli_ray):
    with cli_ray(argparse.Namespace(verbose=False), num_cpus=2) as ray:
        time.sleep(8)  # Ray prestarts one idle worker per CPU within a few seconds when allowed to
        procs = [_cmdline(p) for p in _descendants(os.getpid())]
        assert not [c for c in procs if c.startswith("ray::IDLE")], procs
        # Ray keeps a minimal dashboard process (usage stats, no frontend) either way; the full one
        # adds a ~100 MB process per module (ray-dashboard-NodeHead-0, ...).
        assert not [c for c in procs if "ray-dashboard-" in c], procs

        @ray.remote
        def square(x):
            return x * x

        assert ray.get(square.remote(7)) == 49  # tasks still start their own worker
