"""Port blocks for private Ray heads in tests.

A head started by cluster/local_head.sh derives every port from --port: base..base+7 for its
services and base+100..base+400 for workers; the dashboard port is taken inside the block
(base+8) so no other free-port pick can land in the worker range. Blocks are chosen below the
kernel's ephemeral range, where outgoing connections of unrelated processes never take ports.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

BLOCK = 401  # base .. base+400


def ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def head_ports(rng: random.Random | None = None, tries: int = 200) -> dict[str, int]:
    """{"port", "dashboard_port"}: a free block below the ephemeral range, dashboard inside it."""
    rng = rng or random.Random()
    lo_eph, hi_eph = ephemeral_range()
    # Below the ephemeral range if there is room, else above it.
    spans = [(10000, lo_eph - BLOCK)] if lo_eph - BLOCK > 10000 else [(hi_eph + 1, 65535 - BLOCK)]
    for _ in range(tries):
        lo, hi = rng.choice(spans)
        base = rng.randrange(lo, hi) // 10 * 10
        needed = list(range(base, base + 9)) + list(range(base + 100, base + BLOCK))
        if all(_bindable(p) for p in needed):
            return {"port": base, "dashboard_port": base + 8}
    raise RuntimeError("no free port block for a Ray head")


def node_blocks(n: int, rng: random.Random | None = None, tries: int = 200) -> list[int]:
    """Bases of n disjoint free port blocks (a head's and its worker nodes'), below the ephemeral range."""
    rng = rng or random.Random()
    lo_eph, _ = ephemeral_range()
    for _ in range(tries):
        base = rng.randrange(10000, max(10001, lo_eph - n * (BLOCK + 100))) // 10 * 10
        bases = [base + k * (BLOCK + 100) for k in range(n)]
        if all(_bindable(p) for b in bases for p in list(range(b, b + 9)) + list(range(b + 100, b + BLOCK))):
            return bases
    raise RuntimeError(f"no {n} free port blocks for Ray nodes")
