"""A private Ray for a test module, and a barrier actor that releases its callers together."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile


@contextlib.contextmanager
def private_ray(prefix: str, num_cpus: int = 2):
    """Ray in this process with its own temp dir (joined, and left running, when one already is)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _temp_dir=tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield ray
    finally:
        ray.shutdown()


def barrier(ray, n: int):
    """An actor whose ``wait`` returns once ``n`` callers are waiting, however late each one started."""

    @ray.remote(num_cpus=0)
    class Barrier:
        def __init__(self, n):
            self.n, self.event = n, asyncio.Event()

        async def wait(self):
            self.n -= 1
            if self.n <= 0:
                self.event.set()
            await self.event.wait()

    return Barrier.remote(n)
