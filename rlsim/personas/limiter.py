"""Rate limiter shared by every persona job on a cluster: requests/min, tokens/min, per-job budgets.

``RateLimiter`` is the plain object. In a Ray cluster it runs as ONE detached named actor per
endpoint and model (``limiter_name``: a hash of base URL and model, never of the key) in the
``rlsim`` namespace; every job and every worker finds it by name, so two jobs against one
endpoint share one limit instead of each getting the whole of it.

- Pacing: callers *reserve* capacity and get back how long to wait before sending (the actor
  never blocks). Requests are evenly paced (no burst by default), so a server's own bucket never
  sees more than the limit. The token bucket admits a request when it holds the request's tokens
  (or its whole capacity, when the request is larger) and then takes ALL of them, going into debt
  that later requests wait out: a 500-token request at 600 tokens/min is followed 50 s later by
  the next one. Callers reserve a request's worst case (``gate.request_bound``); after the answer,
  ``settle`` gives back what the server's reported usage did not use, so the server-counted
  requests and tokens of any 60 s window stay within the limits (plus one request's worth).
- A 429 with Retry-After pauses every caller until it has passed; reservations made during the
  pause are paced from its end at the limit rate (no burst when it ends).
- Several jobs: each ``register``s its own limits; the strictest limits of the jobs active now
  apply to everyone (a job is told when another job's limits are stricter than its own). A job
  that stops calling for ``lease_s`` seconds (its driver died) no longer counts.
- Budgets are per job: a job's spend (settled) plus its reservations (worst cases) never exceed its
  cap. A settlement above its reservation (a server reporting more than the worst case) is recorded
  as spent anyway and counted (``overruns``); nothing more is granted once the cap is reached. A
  request that fits only once the job's other requests in flight have settled waits for them.
  A job with a cap or any spend is never forgotten, so an idle job cannot come back uncapped.
- State (buckets, pause, every job's spend and reservations) is saved in Ray's GCS key-value
  store after each change, so a restarted actor (``max_restarts=-1``) picks up where it was and
  spend already made is not forgotten. The actor, its store and its facade ``RayLimiter`` live in
  ``rlsim.personas.limiter_actor``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from urllib.parse import urlsplit

from rlsim.errors import ConfigError

LIMITER_NAMESPACE = "rlsim"
LOCAL_JOB = "local"
DEFAULT_LEASE_S = 120.0
REFUSED, BUSY = -1.0, -2.0  # reserve(): the budget refuses the request / its in-flight reservations hold the rest
BUSY_POLL_S, BUSY_WAIT_S = 0.05, 60.0
TOKEN_HORIZON_S = 1.0  # how far ahead a send time is committed against the token bucket (try_reserve)
LATER_MAX_S = 0.5  # the longest a request held back by the token bucket waits before asking again
KEEP_JOBS = 500  # past this many jobs, finished ones with no cap and no spend are forgotten (oldest first)


LOOPBACK = {"localhost", "127.0.0.1", "::1"}
DEFAULT_PORTS = {"http": 80, "https": 443}


def canonical_endpoint(base_url: str | None) -> str:
    """One spelling per endpoint: lowercase scheme and host, every loopback name as localhost, no
    default port, no trailing '/' or '/v1' (the same server however a user writes its URL)."""
    u = urlsplit((base_url or "https://api.openai.com/v1").strip())
    try:
        port = u.port
    except ValueError as exc:
        raise ConfigError(f"invalid endpoint URL {base_url!r}: {exc}") from None
    scheme = (u.scheme or "https").lower()
    host = (u.hostname or "").lower()
    host = "localhost" if host in LOOPBACK else (f"[{host}]" if ":" in host else host)
    if port is not None and port != DEFAULT_PORTS.get(scheme):
        host += f":{port}"
    path = u.path.rstrip("/")
    if path.lower().endswith("/v1"):
        path = path[:-3].rstrip("/")
    return f"{scheme}://{host}{path}"


def limiter_name(base_url: str | None, model: str) -> str:
    """The cluster-wide limiter of one endpoint and model (Azure: endpoint and deployment)."""
    h = hashlib.sha256(json.dumps([canonical_endpoint(base_url), model]).encode()).hexdigest()[:16]
    return f"rlsim_limiter_{h}"


def _forgettable(j: dict) -> bool:
    """A job with no cap, no spend and nothing reserved: forgetting it loses nothing (it would come back
    as it was). Any other job stays, or its next reserve would start again uncapped at $0."""
    return j.get("cap") is None and not j.get("spent") and not j.get("reserved")


class TokenBucket:
    """Refills at ``rate`` per second up to ``cap``; may go into debt (negative level)."""

    def __init__(self, rate: float, cap: float, level: float | None = None, t: float = 0.0):
        self.rate, self.cap = rate, cap
        self.level = cap if level is None else level
        self.t = t

    def refill(self, now: float) -> None:
        dt = max(0.0, now - self.t)
        self.t = max(self.t, now)
        self.level = min(self.cap, self.level + dt * self.rate)

    def take(self, n: float, now: float) -> float:
        """Seconds until the bucket holds min(n, cap); then all n are taken (debt is allowed)."""
        self.refill(now)
        need = min(float(n), self.cap)
        wait = max(0.0, (need - self.level) / self.rate)
        self.level -= float(n)
        return wait

    def give(self, n: float, now: float) -> None:
        """Return n (negative: take more), e.g. when the server reports fewer tokens than reserved."""
        self.refill(now)
        self.level = min(self.cap, self.level + float(n))

    def state(self) -> dict:
        return {"level": self.level, "t": self.t}


class RateLimiter:
    """Pacing for requests and tokens per minute, a pause after 429s, and per-job budgets.

    ``RateLimiter(rpm, tpm, budget_usd)`` registers one job ("local") with those limits, which is
    what an in-process caller wants. The cluster actor is built with ``rpm=None`` and learns its
    limits from the jobs that ``register``. ``store`` (optional) has ``load() -> dict | None`` and
    ``save(dict)``: the actor's state survives a restart through it.
    """

    def __init__(self, rpm: float | None = None, tpm: float | None = None, budget_usd: float | None = None,
                 burst_s: float = 0.0, clock=time.monotonic, store=None, lease_s: float = DEFAULT_LEASE_S):
        self.clock = clock
        self.burst_s = burst_s
        self.store = store
        self.lease_s = lease_s
        self.jobs: dict[str, dict] = {}
        self.paused_until = 0.0
        self.granted = 0
        self.throttled = 0
        self.restored = False
        self.fresh = True  # buckets start full (at their capacity) until the first reservation
        self.limits = {"rpm": rpm or 60.0, "tpm": tpm or 1e9}
        now = clock()
        self.req = TokenBucket(1.0, 1.0, t=now)
        self.tok = TokenBucket(1.0, 1.0, t=now)
        self._apply_limits(self.limits["rpm"], self.limits["tpm"])
        saved = store.load() if store is not None else None
        if saved:
            self._restore(saved)
        elif rpm is not None:
            self.register(LOCAL_JOB, rpm, tpm if tpm is not None else 1e9, budget_usd, lease_s=float("inf"))

    # ------------------------------------------------------------ state
    def _apply_limits(self, rpm: float, tpm: float) -> None:
        now = self.clock()
        self.limits = {"rpm": float(rpm), "tpm": float(tpm)}
        for b, per_min in ((self.req, rpm), (self.tok, tpm)):
            b.refill(now)
            b.rate = per_min / 60.0
            b.cap = max(1.0, b.rate * self.burst_s)
            b.level = b.cap if self.fresh else min(b.level, b.cap)

    def _effective(self) -> tuple[float, float]:
        now = self.clock()
        active = [j for j in self.jobs.values() if j["active_until"] > now]
        if not active:
            return self.limits["rpm"], self.limits["tpm"]
        return min(j["rpm"] for j in active), min(j["tpm"] for j in active)

    def _recompute(self) -> None:
        rpm, tpm = self._effective()
        if (rpm, tpm) != (self.limits["rpm"], self.limits["tpm"]):
            self._apply_limits(rpm, tpm)
        for j in self.jobs.values():
            if j["active_until"] > self.clock():
                j["min_rpm"] = min(j.get("min_rpm", rpm), rpm)
                j["min_tpm"] = min(j.get("min_tpm", tpm), tpm)

    def _save(self) -> None:
        if self.store is None:
            return
        self.store.save({"limits": self.limits, "req": self.req.state(), "tok": self.tok.state(),
                         "paused_until": self.paused_until, "granted": self.granted, "throttled": self.throttled,
                         "jobs": {k: {kk: (None if vv == float("inf") else vv) for kk, vv in v.items()}
                                  for k, v in self.jobs.items()}})

    def _restore(self, s: dict) -> None:
        self.restored = True
        self.fresh = False
        self.limits = s["limits"]
        self.paused_until = s.get("paused_until", 0.0)
        self.granted, self.throttled = s.get("granted", 0), s.get("throttled", 0)
        self.jobs = {k: {kk: (float("inf") if (kk == "active_until" and vv is None) else vv) for kk, vv in v.items()}
                     for k, v in s.get("jobs", {}).items()}
        self._apply_limits(self.limits["rpm"], self.limits["tpm"])
        self.req.level, self.req.t = s["req"]["level"], s["req"]["t"]
        self.tok.level, self.tok.t = s["tok"]["level"], s["tok"]["t"]

    def _job(self, job: str, refresh: bool = True) -> dict:
        j = self.jobs.get(job)
        if j is None:  # an unregistered caller: paced by the current limits, no budget
            j = self.jobs[job] = {"rpm": self.limits["rpm"], "tpm": self.limits["tpm"], "cap": None, "spent": 0.0,
                                  "reserved": 0.0, "granted": 0, "active_until": 0.0}
        if refresh and j["active_until"] != float("inf"):
            j["active_until"] = self.clock() + self.lease_s
        j["seen"] = self.clock()
        return j

    # ------------------------------------------------------------ jobs
    def register(self, job: str, rpm: float, tpm: float, budget_usd: float | None = None, spent_usd: float = 0.0,
                 lease_s: float | None = None, ledger: str | None = None) -> dict:
        """Join (or rejoin, after a resume) with this job's limits and budget.

        The job's spend is the larger of what it says it spent before (its own records) and what
        this limiter recorded for it, reservations of a dead run included (they may have been sent).
        Returns the limits in force and whether another job's are stricter. ``ledger``: a file
        (the job's spend.json) rewritten with the job's spend and reservations at every change, when
        its folder is reachable from here (same node), so a job killed together with its Ray still
        finds what it spent.
        """
        old = self.jobs.get(job)
        prior = max(float(spent_usd), (old["spent"] + old["reserved"]) if old else 0.0)
        if len(self.jobs) > KEEP_JOBS:  # forget the oldest finished jobs that have nothing to remember
            done = sorted((v.get("seen", 0.0), k) for k, v in self.jobs.items()
                          if v["active_until"] <= self.clock() and _forgettable(v))
            for _, k in done[: len(self.jobs) - KEEP_JOBS]:
                del self.jobs[k]
        lease = self.lease_s if lease_s is None else lease_s
        self.jobs[job] = {"rpm": float(rpm), "tpm": float(tpm), "cap": budget_usd, "spent": prior, "reserved": 0.0,
                          "granted": old["granted"] if old else 0, "overruns": old.get("overruns", 0) if old else 0,
                          "active_until": float("inf") if lease == float("inf") else self.clock() + lease,
                          "min_rpm": float(rpm), "min_tpm": float(tpm), "ledger": ledger, "seen": self.clock()}
        self._recompute()
        self._save()
        self._write_ledger(self.jobs[job])
        rpm_e, tpm_e = self.limits["rpm"], self.limits["tpm"]
        now = self.clock()
        others = sum(1 for k, j in self.jobs.items() if k != job and j["active_until"] > now)
        return {"rpm": rpm_e, "tpm": tpm_e, "asked_rpm": float(rpm), "asked_tpm": float(tpm),
                "stricter_elsewhere": rpm_e < rpm or tpm_e < tpm, "other_jobs": others, "spent_usd": prior,
                "restored": self.restored}

    def _write_ledger(self, j: dict) -> None:
        path = j.get("ledger")
        if not path:
            return
        import os

        folder = os.path.dirname(path)
        if not os.path.isdir(folder):
            return  # not on this node: the spend is still in this limiter's saved state
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w") as fh:
                json.dump({"spent_usd": j["spent"], "reserved_usd": j["reserved"], "t": time.time()}, fh)
            os.replace(tmp, path)
        except OSError:
            pass

    def unregister(self, job: str) -> None:
        j = self.jobs.get(job)
        if j is not None:
            j["active_until"] = 0.0
            self._recompute()
            self._save()

    def job_stats(self, job: str = LOCAL_JOB) -> dict:
        j = self.jobs.get(job) or {}
        return {"spent_usd": j.get("spent", 0.0), "reserved_usd": j.get("reserved", 0.0),
                "granted": j.get("granted", 0), "budget_usd": j.get("cap"), "overruns": j.get("overruns", 0),
                "effective_rpm": self.limits["rpm"],
                "effective_tpm": self.limits["tpm"], "min_rpm": j.get("min_rpm"), "min_tpm": j.get("min_tpm"),
                "restored": self.restored}

    # ------------------------------------------------------------ pacing
    def reserve(self, tokens: int, est_usd: float = 0.0, job: str = LOCAL_JOB) -> float:
        """Seconds to wait before sending; REFUSED (-1.0) when the job's budget would be exceeded even
        with nothing else in flight; BUSY (-2.0) when only the job's other reservations in flight stand
        in the way (ask again once they have settled)."""
        j = self._job(job)
        self._recompute()
        if j["cap"] is not None and j["spent"] + j["reserved"] + est_usd > j["cap"] + 1e-12:
            self._save()
            return REFUSED if j["spent"] + est_usd > j["cap"] + 1e-12 else BUSY
        j["reserved"] += est_usd
        if est_usd:
            self._write_ledger(j)
        self.fresh = False
        now = self.clock()
        # During a 429 pause the buckets are drawn from its end: requests reserved now are paced from
        # there at the limit rate instead of all being sent the moment it ends.
        start = max(now, self.paused_until)
        wait = max(self.req.take(1.0, start), self.tok.take(float(tokens), start)) + (start - now)
        self.granted += 1
        j["granted"] += 1
        self._save()
        return wait

    def try_reserve(self, tokens: int, est_usd: float = 0.0, job: str = LOCAL_JOB,
                    horizon_s: float = TOKEN_HORIZON_S) -> tuple[str, float]:
        """``reserve``, except that a request the TOKEN bucket alone would hold back more than
        ``horizon_s`` takes nothing yet: ("later", seconds until it is worth asking again). Requests
        reserve worst cases that mostly come back when they settle; committing a send time against
        that debt far ahead would pace by the worst case instead of by the tokens really used.
        Else ("ok", wait), ("refused", 0) or ("busy", 0) (see ``reserve``)."""
        j = self._job(job)  # still alive: it keeps its lease and its share of the limits
        if j["cap"] is not None and j["spent"] + j["reserved"] + est_usd > j["cap"] + 1e-12:
            return ("refused" if j["spent"] + est_usd > j["cap"] + 1e-12 else "busy"), 0.0  # before any wait
        now = self.clock()
        start = max(now, self.paused_until)
        self.tok.refill(start)
        tok_wait = max(0.0, (min(float(tokens), self.tok.cap) - self.tok.level) / self.tok.rate)
        self.req.refill(start)
        req_wait = max(0.0, (1.0 - self.req.level) / self.req.rate)
        if tok_wait > horizon_s and tok_wait > req_wait:
            # Ask again soon: settlements give worst cases back, so the wait shrinks faster than it says.
            return "later", min(LATER_MAX_S, max(BUSY_POLL_S, tok_wait - horizon_s))
        wait = self.reserve(tokens, est_usd, job)
        if wait == REFUSED:
            return "refused", 0.0
        if wait == BUSY:
            return "busy", 0.0
        return "ok", wait

    def settle(self, reserved_usd: float, actual_usd: float, reserved_tokens: int = 0,
               actual_tokens: int | None = None, job: str = LOCAL_JOB) -> None:
        """After the call: dollars actually spent, and tokens the server reported (None: keep the estimate)."""
        j = self._job(job, refresh=False)
        j["reserved"] = max(0.0, j["reserved"] - reserved_usd)
        j["spent"] += actual_usd  # what the server billed, even above the reservation: spend is never hidden
        if actual_usd > reserved_usd + 1e-12:
            j["overruns"] = j.get("overruns", 0) + 1
        if actual_tokens is not None:
            self.tok.give(float(reserved_tokens) - float(actual_tokens), self.clock())
        self._save()
        if reserved_usd or actual_usd:
            self._write_ledger(j)

    def pause(self, seconds: float) -> None:
        """A 429 with Retry-After: nobody sends until it has passed."""
        self.throttled += 1
        self.paused_until = max(self.paused_until, self.clock() + seconds)
        self._save()

    def stats(self) -> dict:
        j = self.jobs.get(LOCAL_JOB) or {}
        return {"granted": self.granted, "throttled": self.throttled, "spent_usd": j.get("spent", 0.0),
                "reserved_usd": j.get("reserved", 0.0), "limits": dict(self.limits),
                "active_jobs": sum(1 for x in self.jobs.values() if x["active_until"] > self.clock())}

    @property
    def budget(self):  # backwards-compatible view of the local job's budget
        from rlsim.personas.cost import Budget

        j = self.jobs.get(LOCAL_JOB) or {}
        return Budget(j.get("cap"), j.get("spent", 0.0), j.get("reserved", 0.0))


class LocalLimiter:
    """Async facade over an in-process RateLimiter (same interface as RayLimiter)."""

    def __init__(self, limiter: RateLimiter, job: str = LOCAL_JOB):
        self.limiter = limiter
        self.job = job

    async def reserve(self, tokens: int, est_usd: float = 0.0) -> float:
        return self.limiter.reserve(tokens, est_usd, job=self.job)

    async def try_reserve(self, tokens: int, est_usd: float = 0.0) -> tuple[str, float]:
        return self.limiter.try_reserve(tokens, est_usd, job=self.job)

    async def settle(self, reserved_usd: float, actual_usd: float, reserved_tokens: int = 0,
                     actual_tokens: int | None = None) -> None:
        self.limiter.settle(reserved_usd, actual_usd, reserved_tokens, actual_tokens, job=self.job)

    async def pause(self, seconds: float) -> None:
        self.limiter.pause(seconds)

    async def stats(self) -> dict:
        return self.limiter.job_stats(self.job)


async def sleep_until_allowed(limiter, tokens: int, est_usd: float = 0.0, busy_wait_s: float = BUSY_WAIT_S) -> bool:
    """Reserve and wait; False when the budget refused the request. While only other requests in flight
    hold the rest of the budget (worst cases, mostly given back when they settle), ask again for up
    to ``busy_wait_s`` (a reservation whose worker died is never settled) before giving up."""
    busy = 0.0
    while True:
        status, wait = await limiter.try_reserve(tokens, est_usd)
        if status == "ok":
            break
        if status == "refused" or (status == "busy" and busy >= busy_wait_s):
            return False
        if status == "busy":
            busy += BUSY_POLL_S
            wait = BUSY_POLL_S
        await asyncio.sleep(wait)  # "later": the token bucket is worth asking again then
    if wait > 0:
        await asyncio.sleep(wait)
    return True
