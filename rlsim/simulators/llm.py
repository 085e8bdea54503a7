"""LLM personas as simulated users in the RL loop: stateful, stochastic, and paced by the cluster's limiter.

``LLMPersonaSimulator`` speaks the simulator contract (rlsim.simulators.base) through the persona
stage's pieces: the PromptBuilder's profile and grounding (rlsim.personas.grounding), the rating
engine's gate to the cluster-wide limiter and budget (rlsim.personas.gate / limiter), the response
cache, and the same JSON schema and validation as `rlsim personas rate`. The simulator is one job at
the limiter with a stable id (``simulator_job``) and a spend ledger under the cache folder, so a rerun
of the same simulator finds what it spent before: its budget does not start again at $0.

- **Grouping.** The pairs of one call are grouped by (user, session): pairs with the same user and
  the same session so far may share one prompt (up to ``llm_persona.movies_per_prompt`` movies,
  default 1: a distribution then depends on its (user, session, movie) only, never on the movies
  asked beside it or their order); different sessions are different prompts. A pair is asked
  once: repeated within a call, asked by another call in flight, or answered before in another
  prompt of the same session (an in-memory memo of (user, session, movie) -> distribution; the
  response cache is per prompt; a failure is never memoised). All prompts of a call
  are sent concurrently; the limiter paces them, so many env runners' steps overlap under one
  rate limit (the SimulatorActor awaits ``adistribution``).
- **The session is in the prompt**: "In this session you were shown, in order: <title> — you rated
  4; ..." (the last ``session_max`` ratings), after the movies to rate. It is part of the messages,
  hence of the cache key: the same user, movie and session is answered once, a new session is a
  new request.
- **Dynamic users (Lusifer-style summaries).** With ``summary_every`` N > 0, after every N ratings
  of a session the persona's summary is updated through the pool (``summary_messages``: the
  previous summary, the user's profile for the first one, plus the N new ratings), and later
  prompts of that session carry it ("Your tastes as they stand now, updated during this session:
  ..."). Summaries are memoised by (user, session prefix) and cached by their messages; a failed
  update keeps the previous summary and is counted. Summary requests count in ``usage`` (their
  own line) and cost.
- **The distribution, and ``method`` says how it was obtained.**
  ``logprobs``: the answer is requested with ``logprobs=True, top_logprobs=k``; at each rating's
  token in the JSON answer the alternatives that are rating values give the distribution
  (renormalised over the scale; mass on other tokens is dropped). Integer scales only: on a
  half-star scale a rating is several tokens ("3", ".", "5") and one position does not carry its
  distribution, so ``auto`` skips logprobs there and an explicit ``logprobs`` is refused.
  ``samples``: ``n`` completions at ``sample_temperature`` -> the histogram of their ratings,
  smoothed by ``smoothing`` pseudo-counts spread evenly over the scale.
  ``answer + ordinal noise``: the plain answer (the same request `rlsim personas rate` sends, so
  the two share cache entries) plus ``rlsim.simulators.noise.OrdinalNoise`` fitted by asking the
  persona on a seeded hold-out of the training ratings (at most ``calibration_pairs`` pairs, with
  prompts built from the remaining ratings only, through the same cache, limiter and budget): the
  same calibration as ``PointSimulator``.
  ``auto`` probes the endpoint once (one real rating request): logprobs if the answer carries them
  at the rating token, else samples if ``n`` completions come back, else the noise model.
  A logprobs answer whose rating token holds fewer than two rating values among its alternatives
  is an answer, not a distribution: those movies are asked again by samples (NaN with reason
  ``point_mass_logprobs`` when the endpoint returns one completion), never a one-hot row.
  ``describe()`` reports the method actually used, what the probe saw, and ``answered_by_method``.
- **Failures are NaN rows, never a guess.** A pair the persona could not rate (budget, permanent
  errors, transient errors or unusable answers after all retries) comes back as a row of NaN;
  every requested pair is counted as answered or failed by reason (and how many came from the
  cache), so requested == answered + failed always.

The API key travels only inside the ``BackendSpec`` (its repr hides it) handed to the factory at
the CLI edge; it is never part of ``describe()``, the cache, run.json or any log. Library code here
never reads environment variables.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from rlsim.errors import ConfigError
from rlsim.simulators.base import EMPTY, Session, Sessions, Simulator, check_sessions

log = logging.getLogger(__name__)

METHODS = ("auto", "logprobs", "samples", "noise")
METHOD_NAMES = {"logprobs": "logprobs", "samples": "samples", "noise": "answer + ordinal noise"}
MIN_CALIBRATION = 10  # answered hold-out pairs needed to fit the noise model
# An answer whose rating token carried no distribution: that pair is asked again by the next method.
LOGPROB_GAPS = ("no_logprobs", "point_mass_logprobs")


@dataclass
class LLMSimConfig:
    """The `llm_persona:` YAML section (the endpoint, rate limits and budget are `personas:`'s)."""

    method: str = "auto"  # auto | logprobs | samples | noise
    top_logprobs: int = 10  # alternatives asked per token (the rating values must be among them)
    samples: int = 8  # completions per prompt for "samples" (and what the probe asks for)
    sample_temperature: float = 1.0
    smoothing: float = 0.5  # pseudo-counts spread evenly over the scale (the samples histogram)
    summary_every: int = 0  # update the persona's summary every N ratings of a session (0 = never)
    session_max: int = 20  # most recent session ratings shown in a prompt
    calibration_pairs: int = 200  # hold-out pairs asked to fit the noise model ("noise")
    calibration_frac: float = 0.1  # share of each user's training ratings held out for it
    max_summaries: int = 100_000  # summaries kept in memory (least recently used dropped)
    max_answers: int = 200_000  # (user, session, movie) distributions kept in memory (LRU)
    # Movies rated in one prompt. 1 (the default) makes a (user, session, movie)'s distribution
    # reproducible: in a batched JSON answer a later movie's rating is conditioned on the ratings
    # written before it and on which movies share the prompt (its grounding lines too), so the same
    # pair would get another distribution in another env step's batch. > 1 is cheaper (fewer
    # requests, the profile sent once per batch) but batch-dependent.
    movies_per_prompt: int = 1

    def validate(self) -> "LLMSimConfig":
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"llm_persona: {what}")

        need(self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name, lo in (("top_logprobs", 1), ("samples", 1), ("summary_every", 0), ("session_max", 0),
                         ("calibration_pairs", MIN_CALIBRATION), ("max_summaries", 1), ("max_answers", 1),
                         ("movies_per_prompt", 1)):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"{name} must be an integer >= {lo}, "
                 f"got {v!r}")
        need(self.top_logprobs <= 20, "top_logprobs must be <= 20 (the OpenAI API's limit)")
        need(self.sample_temperature > 0, "sample_temperature must be > 0")
        need(self.smoothing >= 0, "smoothing must be >= 0")
        need(0 < self.calibration_frac < 1, "calibration_frac must be in (0, 1)")
        return self


def is_integer_scale(scale) -> bool:
    return float(scale.step).is_integer() and float(scale.min).is_integer()


def _number(token: str) -> float | None:
    t = str(token).strip().strip('",}]:').strip()
    try:
        x = float(t)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def logprob_distributions(tokens: list, item_ids: list[int], scale) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """{item: distribution} read at each rating's token of a JSON answer, and {item: why not}.

    tokens: [[token, logprob, [[alternative, logprob], ...]], ...] of one completion. The answer is
    the tokens' concatenation; each "<id>": <value> is located in it and the token that starts the
    value gives the distribution: exp(logprob) of each alternative that is a rating value on the
    scale, renormalised (alternatives that are not rating values are dropped). A token whose
    alternatives hold fewer than two rating values (none, or the token alone) carries no distribution,
    only the answer: that item is "point_mass_logprobs", never a one-hot row labelled logprobs."""
    import re

    text = "".join(str(t[0]) for t in tokens)
    starts = np.cumsum([0] + [len(str(t[0])) for t in tokens])
    want = {int(i) for i in item_ids}
    out: dict[int, np.ndarray] = {}
    why: dict[int, str] = {}
    for m in re.finditer(r'"?(\d+)"?\s*:\s*"?(-?\d+(?:\.\d+)?)', text):
        iid = int(m.group(1))
        if iid not in want or iid in out:
            continue
        pos = m.start(2)
        j = int(np.searchsorted(starts, pos, side="right") - 1)
        if j < 0 or j >= len(tokens):
            why[iid] = "no_logprobs"
            continue
        alts = tokens[j][2] if len(tokens[j]) > 2 else []
        p = np.zeros(scale.n_classes)
        for a, alp in alts:
            x = _number(a)
            if x is None or x < scale.min or x > scale.max or float(scale.round(x)) != x:
                continue
            p[int(scale.to_class(x))] += math.exp(float(alp))
        if (p > 0).sum() < 2:
            why[iid] = "point_mass_logprobs"
            continue
        out[iid] = p / p.sum()
    for i in want - set(out):
        why.setdefault(i, "no_logprobs")
    return out, why


class LLMPersonaSimulator(Simulator):
    """An LLM persona pool as a simulator (see the module docstring)."""

    name = "llm_persona"
    conditions_on_session = True

    def __init__(self, builder, engine, scale, cfg: LLMSimConfig | None = None, *, train: pd.DataFrame | None = None,
                 make_builder: Callable[[pd.DataFrame], object] | None = None, seed: int = 0,
                 limiter_info: dict | None = None, on_close: Callable | None = None):
        from rlsim.personas.usage import empty_usage

        self.builder = builder
        self.engine = engine
        self.scale = scale
        self.cfg = (cfg or LLMSimConfig()).validate()
        self.pcfg = engine.cfg
        self.spec = engine.spec
        self.train = train
        self.make_builder = make_builder
        self.seed = seed
        self.limiter_info = limiter_info or {}
        self._on_close = on_close
        if self.cfg.method == "logprobs" and not is_integer_scale(scale):
            raise ConfigError("llm_persona.method logprobs needs an integer rating scale (a half-star rating is "
                              "several tokens); use samples, noise or auto")
        if self.cfg.method == "noise" and train is None:
            raise ConfigError("llm_persona.method noise needs the training ratings to calibrate on")
        self._method: str | None = None if self.cfg.method == "auto" else self.cfg.method
        self.probe: dict = {}
        self.noise = None
        self.calibration: dict = {}
        self.usage = empty_usage()  # rating requests of the simulator's answers
        self.summary_usage = empty_usage()  # Lusifer summary updates
        self.setup_usage = empty_usage()  # the probe and the noise model's calibration
        self.counts = {"requested": 0, "answered": 0, "failed": 0, "from_cache": 0, "from_memo": 0,
                       "repeated_in_call": 0,
                       "prompts": 0, "calls": 0, "summary_updates": 0, "summary_failed": 0,
                       "summaries_memoised": 0}
        self.failed_by_reason: dict[str, int] = {}
        self.answered_by_method: dict[str, int] = {}  # rows answered, by how their distribution was obtained
        self.summary_failures: dict[str, int] = {}
        self._summaries: collections.OrderedDict = collections.OrderedDict()
        # (user, session, item) -> distribution: a pair answered in one prompt is not asked again in
        # another (the response cache is per prompt, and a prompt batches a session's movies).
        self._answers: collections.OrderedDict = collections.OrderedDict()
        self._loop = None
        self.t_first = self.t_last = None

    # ------------------------------------------------------------------ per event loop state
    def _state(self):
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._sem = asyncio.Semaphore(max(1, self.pcfg.max_concurrency * self.pcfg.n_workers))
            self._probe_lock = asyncio.Lock()
            self._calib_lock = asyncio.Lock()
            self._summary_tasks: dict = {}
            self._inflight: dict = {}
        return self

    @property
    def method(self) -> str:  # what describe() and the contract report
        if self._method is None:
            return "auto (not probed yet)"
        return METHOD_NAMES[self._method]

    # ------------------------------------------------------------------ one request
    def _params(self, method: str) -> dict:
        p = self.pcfg
        params = {"temperature": p.temperature, "max_tokens": p.max_output_tokens, "seed": p.seed}
        if method == "logprobs":
            params.update(logprobs=True, top_logprobs=self.cfg.top_logprobs)
        elif method == "samples":
            params.update(temperature=self.cfg.sample_temperature, n=self.cfg.samples)
        return params

    async def _once(self, msgs: list[dict], rf: dict | None, params: dict, usage: dict,
                    answer: int) -> tuple[dict | None, Exception | None, bool]:
        """One answer to msgs: from the cache, else one request through the limiter (the gate).
        (answer, None, from_cache) or (None, error, False)."""
        from rlsim.personas.cache import request_key
        from rlsim.personas.gate import LimiterGate

        key = request_key(self.spec.kind, self.spec.model, self.spec.base_url, {**params, "response_format": rf},
                          msgs) + f":{answer}"
        cache = self.engine.cache if self.pcfg.cache else None
        if cache is not None:
            hit = cache.get(key)
            if hit is not None:
                usage["cached_requests"] += 1
                return hit, None, True
        gate = LimiterGate(self.engine.limiter, self.pcfg.prices, self.spec.model, usage)
        async with self._sem:
            try:
                res = await self.engine._chat(gate, msgs, rf, params)
            except Exception as exc:  # noqa: BLE001 - classified by the caller
                return None, exc, False
        now = time.monotonic()
        self.t_first = self.t_first or now
        self.t_last = now
        value = {"text": res.text, "choices": res.choices or [res.text], "logprobs": res.logprobs,
                 "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens}
        if cache is not None:
            await asyncio.to_thread(cache.put, key, value)
        return value, None, False

    async def _after_error(self, exc: Exception, usage: dict, attempt: int) -> tuple[str, bool]:
        """(reason, final): final for the budget and permanent errors; transient ones wait their backoff."""
        from rlsim.personas.backends import BudgetExceeded, PermanentError, TransientError

        if isinstance(exc, BudgetExceeded):
            return "budget", True
        if isinstance(exc, PermanentError):
            usage["errors"][exc.reason] = usage["errors"].get(exc.reason, 0) + 1
            return exc.reason, True
        if isinstance(exc, TransientError):
            usage["errors"][exc.reason] = usage["errors"].get(exc.reason, 0) + 1
            if exc.status == 429 and exc.retry_after:
                await self.engine.limiter.pause(exc.retry_after)
            if attempt < self.pcfg.max_retries:
                await asyncio.sleep(self.engine._backoff(attempt, exc.retry_after))
            return exc.reason, False
        raise exc

    # ------------------------------------------------------------------ rating one prompt
    def _unit(self, builder, user: int, item_ids: list[int], session: Session, summary: str):
        from rlsim.personas.grounding import WorkUnit

        sc = (float(self.scale.min), float(self.scale.max), float(self.scale.step))
        items = [builder.item_rows.get(i, {"item_id": i, "title": f"movie {i}", "year": None, "genres": ""})
                 for i in item_ids]
        ground = builder.similar_rated(user, item_ids)
        shown = []
        if self.cfg.session_max and len(session):
            last = session.last(self.cfg.session_max)
            shown = [(builder.labels.get(int(i), f"movie {int(i)}"), float(r)) for i, r in zip(last.items, last.ratings)]
        return WorkUnit(int(user), list(item_ids), builder.profiles.get(int(user), "A movie viewer."), items,
                        {i: ground[i] for i in item_ids if i in ground}, sc, session=shown, summary=summary)

    async def _ask(self, unit, method: str, usage: dict) -> dict[int, tuple[object, str, bool]]:
        """{item: (distribution | rating | None, failure reason, from_cache)} for one prompt's movies.

        method: logprobs | samples | noise (a distribution) or answer (the plain rating, for calibration).
        Items missing from an answer are asked again (alone) until max_retries; the n-th answer to the
        same prompt has its own cache key, so a rerun replays answers and their retries exactly."""
        from rlsim.personas.prompts import rating_schema
        from rlsim.personas.validate import parse_ratings

        scale = self.scale
        req = "answer" if method in ("noise", "answer") else method
        params = self._params(req)
        got: dict[int, tuple] = {}
        reason = {i: "not attempted" for i in unit.item_ids}
        pending = list(unit.item_ids)
        answers_seen: dict[tuple, int] = {}  # answers so far to each prompt (its movies)
        tries = 0
        while pending and tries <= self.pcfg.max_retries:
            sub = unit if len(pending) == len(unit.item_ids) else unit.subset(pending)
            msgs, rf = sub.messages(), rating_schema(sub.item_ids, scale)
            n_before = answers_seen.get(tuple(pending), 0)
            res, exc, hit = await self._once(msgs, rf, params, usage, n_before + unit.answer_offset)
            tries += 1
            if res is None:
                why, final = await self._after_error(exc, usage, tries - 1)
                for i in pending:
                    reason[i] = why
                if final:
                    break
                continue
            answers_seen[tuple(pending)] = n_before + 1
            texts = res.get("choices") or [res.get("text", "")]
            parsed = [parse_ratings(t, pending, scale) for t in texts]
            first = parsed[0]
            if first.parse == "failed":
                usage["errors"]["malformed_json"] = usage["errors"].get("malformed_json", 0) + 1
            for i in pending:
                if i in first.invalid:
                    reason[i] = first.invalid[i]
                elif i not in first.ratings:
                    reason[i] = "malformed_json" if first.parse == "failed" else (
                        "truncated_json" if first.parse == "regex" else "missing_from_answer")
            if req == "logprobs":
                lps = (res.get("logprobs") or [None])[0]
                if lps:
                    dists, no = logprob_distributions(lps, [i for i in pending if i in first.ratings], scale)
                    for i, p in dists.items():
                        got[i] = (p, "", hit)
                    for i, w in no.items():
                        if i in first.ratings:
                            reason[i] = w
                else:
                    for i in pending:
                        if i in first.ratings:
                            reason[i] = "no_logprobs"
            elif req == "samples":
                C = scale.n_classes
                if len(texts) < min(2, self.cfg.samples):  # n ignored: one answer is no histogram
                    for i in pending:
                        reason[i] = "single_completion"
                    break
                for i in pending:
                    vals = [pp.ratings[i] for pp in parsed if i in pp.ratings]
                    if not vals:
                        continue
                    counts = np.bincount(scale.to_class(np.array(vals)), minlength=C).astype(np.float64)
                    p = counts + self.cfg.smoothing / C
                    got[i] = (p / p.sum(), "", hit)
            else:
                for i in pending:
                    if i in first.ratings:
                        got[i] = (float(first.ratings[i]), "", hit)
            # An answer without a distribution at its rating token is not asked again the same way:
            # the caller asks for those movies by the next method.
            pending = [i for i in pending if i not in got and reason[i] not in LOGPROB_GAPS]
        for i in unit.item_ids:
            if i not in got:
                got[i] = (None, reason[i], False)
        return got

    # ------------------------------------------------------------------ summaries (dynamic users)
    def _summary_lines(self, items: tuple, ratings: tuple) -> list[str]:
        labels = self.builder.labels
        return [f"{labels.get(int(i), f'movie {int(i)}')}: {round(float(r), 1):g}" for i, r in zip(items, ratings)]

    async def _summary_for(self, user: int, session: Session) -> str:
        """The persona's summary after the session's first floor(len / N) * N ratings ("" before N)."""
        N = self.cfg.summary_every
        k = (len(session) // N) * N if N else 0
        if k == 0:
            return ""
        return await self._summary_at(int(user), session.items[:k], session.ratings[:k])

    async def _summary_at(self, user: int, items: tuple, ratings: tuple) -> str:
        key = (user, tuple(int(i) for i in items), tuple(float(r) for r in ratings))
        if key in self._summaries:
            self._summaries.move_to_end(key)
            self.counts["summaries_memoised"] += 1
            return self._summaries[key]
        st = self._state()
        task = st._summary_tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(self._update_summary(user, key[1], key[2]))
            st._summary_tasks[key] = task
            task.add_done_callback(lambda _t, k=key, d=st._summary_tasks: d.pop(k, None))
        return await asyncio.shield(task)

    async def _update_summary(self, user: int, items: tuple, ratings: tuple) -> str:
        from rlsim.personas.prompts import SUMMARY_SCHEMA, summary_messages

        N = self.cfg.summary_every
        prev = await self._summary_at(user, items[:-N], ratings[:-N]) if len(items) > N else ""
        start = prev or self.builder.profiles.get(user, "")  # the first update starts from the profile
        msgs = summary_messages(start, self._summary_lines(items[-N:], ratings[-N:]))
        p = self.pcfg
        # The same request (and cache key) as RatingEngine.complete.
        params = {"temperature": p.temperature, "max_tokens": max(p.max_output_tokens, 600), "seed": p.seed}
        self.counts["summary_updates"] += 1
        why = "not attempted"
        answers = 0
        for attempt in range(p.max_retries + 1):
            res, exc, _ = await self._once(msgs, SUMMARY_SCHEMA, params, self.summary_usage, answers)
            if res is None:
                why, final = await self._after_error(exc, self.summary_usage, attempt)
                if final:
                    break
                continue
            answers += 1
            try:
                new = json.loads(res["text"])["summary"]
                why = "" if isinstance(new, str) and new.strip() else "empty_summary"
            except (json.JSONDecodeError, TypeError, KeyError):
                why = "malformed_json"
            if not why:
                self._summaries[(user, items, ratings)] = new.strip()
                while len(self._summaries) > self.cfg.max_summaries:
                    self._summaries.popitem(last=False)
                return new.strip()
        # Not memoised: a later prompt asks again; this one keeps the previous summary.
        self.counts["summary_failed"] += 1
        self.summary_failures[why] = self.summary_failures.get(why, 0) + 1
        return prev

    # ------------------------------------------------------------------ method: probe and calibration
    async def _resolve_method(self) -> tuple[str | None, str]:
        if self._method is not None:
            return self._method, ""
        async with self._state()._probe_lock:
            if self._method is not None:
                return self._method, ""
            return await self._probe()

    async def _probe(self) -> tuple[str | None, str]:
        """auto: one real rating request with logprobs; if they are missing, one with n completions."""
        from rlsim.personas.prompts import rating_schema

        users = sorted(self.builder.history) or sorted(self.builder.profiles)
        if not users:
            raise ConfigError("llm_persona: no users to probe the endpoint with")
        u = int(users[0])
        hist = self.builder.history.get(u)
        item = int(hist["item_id"].iloc[0]) if hist is not None and len(hist) else int(next(iter(self.builder.item_rows)))
        unit = self._unit(self.builder, u, [item], EMPTY, "")
        msgs, rf = unit.messages(), rating_schema([item], self.scale)
        tried = []
        for method in (["logprobs"] if is_integer_scale(self.scale) else []) + ["samples"]:
            params = self._params(method)
            res = exc = None
            for attempt in range(self.pcfg.max_retries + 1):
                res, exc, _ = await self._once(msgs, rf, params, self.setup_usage, 0)
                if res is not None:
                    break
                why, final = await self._after_error(exc, self.setup_usage, attempt)
                if final:
                    break
            if res is None:
                why = getattr(exc, "reason", str(exc))
                if why == "budget" or not why.startswith("http_4"):
                    self.probe = {"tried": tried, "failed": why}
                    return None, f"probe_failed: {why}" if why != "budget" else "budget"
                tried.append({"method": method, "refused": why})  # the endpoint refused the parameter
                continue
            if method == "logprobs":
                lps = (res.get("logprobs") or [None])[0]
                dists, _ = logprob_distributions(lps, [item], self.scale) if lps else ({}, {})
                alts = 0
                if lps:
                    alts = max((len(t[2]) for t in lps if len(t) > 2), default=0)
                ok = item in dists and alts >= 2
                tried.append({"method": method, "returned": bool(lps), "alternatives": int(alts)})
            else:
                n = len(res.get("choices") or [])
                ok = n == self.cfg.samples and self.cfg.samples > 1
                tried.append({"method": method, "completions": n, "asked": self.cfg.samples})
            if ok:
                self._method = method
                self.probe = {"tried": tried, "chose": METHOD_NAMES[method]}
                return method, ""
        if self.train is None:
            self.probe = {"tried": tried, "failed": "no logprobs or n, and no training ratings to calibrate on"}
            return None, "probe_failed: no method"
        self._method = "noise"
        self.probe = {"tried": tried, "chose": METHOD_NAMES["noise"]}
        return "noise", ""

    async def _ensure_calibration(self) -> tuple[bool, str]:
        if self.noise is not None:
            return True, ""
        async with self._state()._calib_lock:
            if self.noise is not None:
                return True, ""
            return await self._calibrate()

    async def _calibrate(self) -> tuple[bool, str]:
        """Fit OrdinalNoise on the persona's answers to a seeded hold-out of training ratings (prompts
        built from the other training ratings only), like PointSimulator.fit."""
        from rlsim.data.splits import holdout_validation
        from rlsim.simulators.noise import OrdinalNoise, user_spread

        tr, va = holdout_validation(self.train, self.cfg.calibration_frac, self.seed)
        va = va.sample(n=min(self.cfg.calibration_pairs, len(va)), random_state=self.seed)
        builder = self.make_builder(tr) if self.make_builder is not None else self.builder
        b = self.cfg.movies_per_prompt  # answers obtained as the ones the noise model will perturb
        prompts = []  # (user, movies) of each calibration prompt
        for u, g in va.groupby("user_id", sort=True):
            ids = [int(i) for i in dict.fromkeys(g["item_id"].tolist())]
            prompts += [(int(u), ids[s:s + b]) for s in range(0, len(ids), b)]
        answers: dict[tuple[int, int], float] = {}
        reasons: dict[str, int] = {}
        got = await asyncio.gather(*[self._ask(self._unit(builder, u, ids, EMPTY, ""), "answer", self.setup_usage)
                                     for u, ids in prompts])
        for (u, _), res in zip(prompts, got):
            for i, (r, why, _hit) in res.items():
                if r is None:
                    reasons[why] = reasons.get(why, 0) + 1
                else:
                    answers[(u, i)] = float(r)
        va = va[[(int(u), int(i)) in answers for u, i in zip(va["user_id"], va["item_id"])]]
        self.calibration = {"pairs": int(sum(reasons.values()) + len(answers)), "answered": len(answers),
                            "failed": reasons, "holdout_frac": self.cfg.calibration_frac, "seed": self.seed}
        if len(va) < MIN_CALIBRATION:
            why = "budget" if "budget" in reasons else "calibration_failed"
            self.calibration["note"] = f"only {len(va)} hold-out pairs answered (needs {MIN_CALIBRATION})"
            return False, why
        mu = np.array([answers[(int(u), int(i))] for u, i in zip(va["user_id"], va["item_id"])])
        noise = OrdinalNoise.fit(mu, va["rating"].to_numpy(float), va["user_id"].to_numpy(), user_spread(tr),
                                 self.scale)
        noise.spread = user_spread(self.train)
        self.calibration["rmse_of_answers"] = float(np.sqrt(np.mean((mu - va["rating"].to_numpy(float)) ** 2)))
        self.noise = noise
        return True, ""

    # ------------------------------------------------------------------ the contract
    async def adistribution(self, users, items, sessions: Sessions = None) -> np.ndarray:
        """[n, C] distributions; NaN rows for pairs the persona could not rate (counted by reason)."""
        return (await self.adistribution_with_reasons(users, items, sessions))[0]

    async def adistribution_with_reasons(self, users, items, sessions: Sessions = None
                                         ) -> tuple[np.ndarray, list[str]]:
        """``adistribution`` and each row's failure reason ("" when answered): the env counts them."""
        users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
        n = len(users)
        check_sessions(sessions, n)
        C = self.scale.n_classes
        out = np.full((n, C), np.nan)
        why = [""] * n
        if n == 0:
            return out, why
        self._state()
        self.counts["requested"] += n
        self.counts["calls"] += 1
        method, reason0 = await self._resolve_method()
        if method == "noise" and reason0 == "":
            ok, reason0 = await self._ensure_calibration()
            if not ok:
                method = None
        if method is None:
            self._fail(n, reason0)
            return out, [reason0] * n
        groups: dict[tuple, dict[int, list[int]]] = {}
        for j in range(n):
            s = EMPTY if sessions is None or sessions[j] is None else sessions[j]
            key = (int(users[j]), tuple(int(x) for x in s.items), tuple(float(x) for x in s.ratings))
            groups.setdefault(key, {}).setdefault(int(items[j]), []).append(j)
        st, loop = self._state(), asyncio.get_running_loop()
        jobs, mine, waiting = [], [], []
        for key, by_item in groups.items():
            ids = []
            for i, rows in by_item.items():
                self.counts["repeated_in_call"] += len(rows) - 1
                pk = (key, i)
                if pk in self._answers:  # answered before, in another prompt of this session
                    self._answers.move_to_end(pk)
                    self.counts["from_memo"] += len(rows)
                    self._deliver(out, why, rows, *self._answers[pk], "", False)
                elif pk in st._inflight:  # being asked by a call in flight (another env runner's)
                    waiting.append((rows, st._inflight[pk]))
                else:
                    st._inflight[pk] = loop.create_future()
                    mine.append(pk)
                    ids.append(i)
            b = self.cfg.movies_per_prompt
            jobs += [(key, ids[s:s + b]) for s in range(0, len(ids), b)]
        self.counts["prompts"] += len(jobs)
        try:
            results = await asyncio.gather(*[self._rate(key, ids, method) for key, ids in jobs])
            for (key, _), res in zip(jobs, results):
                for i, (p, reason, hit, how) in res.items():
                    if p is not None and how == "noise":
                        p = self.noise.distribution(np.array([p]), np.array([key[0]]))[0]
                    if p is not None:
                        self._answers[(key, i)] = (p, how)
                        while len(self._answers) > self.cfg.max_answers:
                            self._answers.popitem(last=False)
                    st._inflight[(key, i)].set_result((p, how, reason, hit))
                    self._deliver(out, why, groups[key][i], p, how, reason, hit)
        finally:
            for pk in mine:  # nobody waits forever, whatever happened
                fut = st._inflight.pop(pk, None)
                if fut is not None and not fut.done():
                    fut.set_result((None, "", "not attempted", False))
        for rows, fut in waiting:
            p, how, reason, _ = await asyncio.shield(fut)
            self.counts["from_memo"] += len(rows) if p is not None else 0
            self._deliver(out, why, rows, p, how, reason, False)
        return out, why

    def _deliver(self, out: np.ndarray, why: list[str], rows: list[int], p, how: str, reason: str, hit: bool) -> None:
        if p is None:
            self._fail(len(rows), reason)
            for r in rows:
                why[r] = reason
            return
        out[rows] = p
        self.counts["answered"] += len(rows)
        name = METHOD_NAMES[how]
        self.answered_by_method[name] = self.answered_by_method.get(name, 0) + len(rows)
        if hit:
            self.counts["from_cache"] += len(rows)

    async def _rate(self, key: tuple, ids: list[int], method: str) -> dict[int, tuple]:
        """{item: (distribution | rating | None, failure reason, from_cache, method that answered it)}."""
        user, s_items, s_ratings = key
        session = Session(s_items, s_ratings)
        summary = await self._summary_for(user, session) if self.cfg.summary_every else ""
        unit = self._unit(self.builder, user, ids, session, summary)
        got = {i: (*r, method) for i, r in (await self._ask(unit, method, self.usage)).items()}
        gaps = [i for i, (p, why, _, _) in got.items() if p is None and why in LOGPROB_GAPS]
        if gaps:
            # The answer carried no distribution at those rating tokens: the next method, n samples,
            # for those movies alone (never a point mass reported as a distribution).
            for i, (p, why, hit) in (await self._ask(unit.subset(gaps), "samples", self.usage)).items():
                got[i] = (p, why if why != "single_completion" else got[i][1], hit, "samples")
        return got

    def _fail(self, n: int, reason: str) -> None:
        self.counts["failed"] += n
        self.failed_by_reason[reason] = self.failed_by_reason.get(reason, 0) + n

    def distribution(self, users, items, sessions: Sessions = None) -> np.ndarray:
        """The same answers in a fresh event loop (fidelity, evaluation); the HTTP client is closed after."""
        return self.distribution_with_reasons(users, items, sessions)[0]

    def distribution_with_reasons(self, users, items, sessions: Sessions = None) -> tuple[np.ndarray, list[str]]:
        async def run():
            try:
                return await self.adistribution_with_reasons(users, items, sessions)
            finally:
                await self.engine.aclose()

        return asyncio.run(run())

    async def aclose(self) -> None:
        await self.engine.aclose()
        if self._on_close is not None:
            try:
                await self._on_close()
            except Exception as exc:  # noqa: BLE001 - best effort at the end
                log.warning("could not unregister from the limiter: %s", exc)

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict:
        from rlsim.personas.usage import merge_usage

        total = merge_usage(merge_usage(self.usage, self.summary_usage), self.setup_usage)
        span = (self.t_last - self.t_first) if self.t_first and self.t_last else 0.0
        return {**self.counts, "failed_by_reason": dict(self.failed_by_reason),
                "answered_by_method": dict(self.answered_by_method),
                "summary_failures": dict(self.summary_failures),
                "usage": {"ratings": self.usage, "summaries": self.summary_usage, "probe_and_calibration":
                          self.setup_usage, "total": total},
                "requests_sent": int(total["requests"]), "cost_usd": float(total["cost_usd"]),
                "sent_span_s": round(span, 3)}

    def describe(self) -> dict:
        d = {**super().describe(), "configured_method": self.cfg.method, "probe": self.probe,
             "backend": self.spec.kind, "model": self.spec.model, "base_url": self.spec.base_url,
             "summary_every": self.cfg.summary_every, "session_max": self.cfg.session_max,
             "movies_per_prompt": self.cfg.movies_per_prompt, "rpm": self.pcfg.rpm, "tpm": self.pcfg.tpm,
             "budget_usd": self.pcfg.budget_usd, "limiter": self.limiter_info, **self.stats()}
        if self._method == "logprobs":
            d["top_logprobs"] = self.cfg.top_logprobs
        elif self._method == "samples":
            d.update(samples=self.cfg.samples, sample_temperature=self.cfg.sample_temperature,
                     smoothing=self.cfg.smoothing)
        elif self._method == "noise":
            d["noise"] = self.noise.to_dict() if self.noise is not None else None
            d["calibration"] = self.calibration
        return d


# ---------------------------------------------------------------------- building it anywhere

def llm_sim_config(options: dict | None) -> LLMSimConfig:
    from rlsim.config import from_dict

    return from_dict(LLMSimConfig, dict(options or {}), "llm_persona").validate()


def _builder(ds, pcfg, vectors, train: pd.DataFrame):
    from rlsim.personas.source import prompt_builder

    return prompt_builder(ds, train, pcfg, vectors)


def simulator_job(spec, options: dict, seed: int, cache_dir: str) -> str:
    """The simulator's job id at the limiter: stable across reruns of the same simulator (endpoint, model,
    options, seed, cache), so a rerun finds its earlier spend instead of starting again at $0."""
    ident = {"endpoint": spec.cache_identity(), "options": options, "seed": int(seed),
             "cache_dir": str(Path(cache_dir).expanduser().resolve())}
    return "llm-persona-" + hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _limiter(pcfg, spec, job: str, ledger: Path) -> tuple[object, dict, Callable | None]:
    """The cluster's limiter of this endpoint and model when Ray is up (registered as ``job``, with the
    budget), else one for this process. ``ledger`` (the job's spend.json, rewritten at every change) holds
    what earlier runs of the same simulator spent: it counts against the budget."""
    from rlsim.personas.limiter import LOCAL_JOB, LocalLimiter, RateLimiter
    from rlsim.personas.journal import SpendLedger

    ledger.parent.mkdir(parents=True, exist_ok=True)
    spent_before = SpendLedger(ledger).read()
    try:
        import ray

        up = ray.is_initialized()
    except ImportError:  # pragma: no cover - ray is a dependency
        up = False
    if not up:
        rl = RateLimiter(pcfg.rpm, pcfg.tpm, pcfg.budget_usd)
        rl.register(LOCAL_JOB, pcfg.rpm, pcfg.tpm, pcfg.budget_usd, spent_before, lease_s=float("inf"),
                    ledger=str(ledger))
        return LocalLimiter(rl), {"scope": "this process", "job": job, "spent_before_usd": spent_before}, None
    from rlsim.personas.limiter import limiter_name
    from rlsim.personas.limiter_actor import RayLimiter, cluster_limiter

    name = limiter_name(spec.base_url, spec.model)
    handle = cluster_limiter(name)
    reg = ray.get(handle.register.remote(job, pcfg.rpm, pcfg.tpm, pcfg.budget_usd, spent_before, None,
                                         str(ledger.resolve())))
    info = {"scope": "cluster", "limiter": name, "job": job, "effective_rpm": reg["rpm"],
            "effective_tpm": reg["tpm"], "other_jobs": reg["other_jobs"], "spent_before_usd": reg["spent_usd"]}

    async def unregister():
        await handle.unregister.remote(job)

    return RayLimiter(handle, job), info, unregister


def build_llm_persona_simulator(ds, train: pd.DataFrame, pcfg, spec, options: dict | None, cache_path: str | None,
                                seed: int = 0, text_model: str = "all-MiniLM-L6-v2",
                                cache_dir: str = "~/.cache/rlsim", limiter=None) -> LLMPersonaSimulator:
    """Build the simulator where it will run (the simulator actor, or this process)."""
    from rlsim.personas.cache import ResponseCache
    from rlsim.personas.engine import RatingEngine

    cfg = llm_sim_config(options)
    vectors = None
    if pcfg.k_similar > 0:
        from rlsim.embeddings import item_text_vectors

        vectors = item_text_vectors(ds.items, text_model, cache_dir)
    make_builder = functools.partial(_builder, ds, pcfg, vectors)
    info, on_close = {"scope": "given"}, None
    if limiter is None:
        job = simulator_job(spec, asdict(cfg), seed, cache_dir)
        ledger = Path(cache_dir).expanduser() / "personas" / "budgets" / f"{job}.json"
        limiter, info, on_close = _limiter(pcfg, spec, job, ledger)
    engine = RatingEngine(spec, pcfg, limiter, ResponseCache(cache_path) if cache_path else None)
    return LLMPersonaSimulator(make_builder(train), engine, ds.scale, cfg, train=train, make_builder=make_builder,
                               seed=seed, limiter_info=info, on_close=on_close)


def llm_persona_factory(ds, train: pd.DataFrame, persona_cfg, api_key: str | None = None,
                        options: dict | None = None, *, seed: int = 0, text_model: str = "all-MiniLM-L6-v2",
                        cache_dir: str = "~/.cache/rlsim") -> Callable[[], LLMPersonaSimulator]:
    """A picklable zero-argument callable building the LLM persona simulator (checked here, at the edge).

    The key is in the BackendSpec only (repr hides it); it reaches the actor as its constructor's argument."""
    from rlsim.personas.backends.factory import check_backend
    from rlsim.personas.stages_common import backend_spec

    if persona_cfg is None:
        raise ConfigError("--reward llm_persona needs the personas: settings (endpoint, model, rpm)")
    pcfg = persona_cfg.validate()
    if pcfg.backend != "openai":
        raise ConfigError(f"--reward llm_persona runs against an OpenAI-compatible endpoint (personas.backend "
                          f"openai), not {pcfg.backend!r}: set --base-url / OPENAI_BASE_URL or personas.backend")
    cfg = llm_sim_config(options)
    if cfg.method == "logprobs" and not is_integer_scale(ds.scale):
        raise ConfigError("llm_persona.method logprobs needs an integer rating scale; use samples, noise or auto")
    spec = backend_spec(pcfg, api_key)
    check_backend(spec)
    cache_path = str(Path(cache_dir).expanduser() / "personas" / "responses.sqlite") if pcfg.cache else None
    return functools.partial(build_llm_persona_simulator, ds, train, pcfg, spec, asdict(cfg), cache_path, seed,
                             text_model, cache_dir)


def start_llm_persona_actor(name: str, ds, train: pd.DataFrame, persona_cfg, api_key: str | None = None,
                            options: dict | None = None, *, namespace: str | None = None, seed: int = 0,
                            text_model: str = "all-MiniLM-L6-v2", cache_dir: str = "~/.cache/rlsim",
                            max_wait_s: float = 0.002):
    """Start a named LLM persona simulator actor (Ray must be up); returns its handle. Stop it with
    ``rlsim.simulators.actor.stop_simulator_actor(handle)`` (closes its client and limiter job)."""
    from rlsim.simulators.actor import start_simulator_actor

    factory = llm_persona_factory(ds, train, persona_cfg, api_key, options, seed=seed, text_model=text_model,
                                  cache_dir=cache_dir)
    return start_simulator_actor(name, factory, namespace, max_wait_s)
