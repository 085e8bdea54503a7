"""cluster/local_head.sh argument checks and the tests' port blocks (no Ray is started here)."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from tests.ports import BLOCK, ephemeral_range, head_ports

SCRIPT = Path(__file__).resolve().parent.parent / "cluster" / "local_head.sh"


@pytest.mark.parametrize("dash_offset", [0, 3, 7, 100, 250, 400])
def test_refuses_dashboard_inside_derived_ports(tmp_path, dash_offset):
    base = 20000
    r = subprocess.run(["bash", str(SCRIPT), "start", "--temp-dir", str(tmp_path / "h"), "--port", str(base),
                        "--dashboard-port", str(base + dash_offset)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "overlaps the ports derived from --port 20000" in lines[0]
    assert not (tmp_path / "h" / "head.env").exists()


def test_refuses_bad_port_values(tmp_path):
    for args in (["--port", "65300"], ["--port", "abc"], ["--dashboard-port", "0"]):
        r = subprocess.run(["bash", str(SCRIPT), "start", "--temp-dir", str(tmp_path / "h"), *args],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, args
        assert len(r.stderr.strip().splitlines()) == 1


def test_port_blocks_are_disjoint_from_their_dashboard_and_ephemeral_ports():
    lo_eph, hi_eph = ephemeral_range()
    for seed in range(20):
        p = head_ports(random.Random(seed))
        base, dash = p["port"], p["dashboard_port"]
        workers = range(base + 100, base + BLOCK)
        services = range(base, base + 8)
        assert dash not in workers and dash not in services
        # Outgoing connections of other processes take ephemeral ports: the block stays clear of them.
        assert base + BLOCK <= lo_eph or base > hi_eph
