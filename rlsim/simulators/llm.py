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
- **It chooses by pages** (Agent4Rec): ``choice`` asks one page prompt per (user, session), "would you
  watch each of these now: yes/no", through the same gate, cache and budget (``LLMPageChoice`` in
  rlsim.simulators.llm_choice; its own usage line, ``usage.choice``). Then it rates as above.
- **Failures are NaN rows, never a guess.** A pair the persona could not rate (budget, permanent
  errors, transient errors or unusable answers after all retries) comes back as a row of NaN;
  every requested pair is counted as answered or failed by reason (and how many came from the
  cache), so requested == answered + failed always.

Its pieces: llm_config (settings), llm_logprobs, llm_requests (one request; a prompt's ratings),
llm_summaries, llm_probe (probe and calibration), llm_choice, llm_build (building it anywhere).

The API key travels only inside the ``BackendSpec`` (its repr hides it) handed to the factory at
the CLI edge; it is never part of ``describe()``, the cache, run.json or any log. Library code here
never reads environment variables.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Callable

import numpy as np
import pandas as pd

from rlsim.errors import ConfigError
from rlsim.simulators.base import EMPTY, Session, Sessions, Simulator, check_sessions
from rlsim.simulators.llm_choice import LLMPageChoice
from rlsim.simulators.llm_config import LOGPROB_GAPS, METHOD_NAMES, LLMSimConfig
from rlsim.simulators.llm_logprobs import is_integer_scale
from rlsim.simulators.llm_probe import MethodProbe
from rlsim.simulators.llm_requests import GatedRequests
from rlsim.simulators.llm_summaries import SessionSummaries

log = logging.getLogger(__name__)


class LLMPersonaSimulator(GatedRequests, SessionSummaries, MethodProbe, Simulator):
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
        # It chooses as Agent4Rec's users do: a page of movies, "would you watch it now" (llm_choice).
        self.choice_model = LLMPageChoice(self)

    @property
    def method(self) -> str:  # what describe() and the contract report
        if self._method is None:
            return "auto (not probed yet)"
        return METHOD_NAMES[self._method]

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
        summary = await self.summary_for(user, session) if self.cfg.summary_every else ""
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

    async def achoice_with_reasons(self, users, items, sessions: Sessions = None) -> tuple[np.ndarray, list[str]]:
        """[n] P(watch it now) by page choice and each pair's failure reason (the simulator actor awaits it)."""
        return await self.choice_model.aprobability_with_reasons(users, items, sessions)

    def choice_with_reasons(self, users, items, sessions: Sessions = None) -> tuple[np.ndarray, list[str]]:
        return self.choice_model.probability_with_reasons(users, items, check_sessions(sessions, len(users)))

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

        total = merge_usage(merge_usage(merge_usage(self.usage, self.summary_usage), self.setup_usage),
                            self.choice_model.usage)
        span = (self.t_last - self.t_first) if self.t_first and self.t_last else 0.0
        return {**self.counts, "failed_by_reason": dict(self.failed_by_reason),
                "answered_by_method": dict(self.answered_by_method),
                "summary_failures": dict(self.summary_failures),
                "page_choice": self.choice_model.stats(),
                "usage": {"ratings": self.usage, "summaries": self.summary_usage, "probe_and_calibration":
                          self.setup_usage, "choice": self.choice_model.usage, "total": total},
                "requests_sent": int(total["requests"]), "cost_usd": float(total["cost_usd"]),
                "sent_span_s": round(span, 3)}

    def describe(self) -> dict:
        d = {**super().describe(), "configured_method": self.cfg.method, "probe": self.probe,
             "backend": self.spec.kind, "model": self.spec.model, "base_url": self.spec.base_url,
             "summary_every": self.cfg.summary_every, "session_max": self.cfg.session_max,
             "movies_per_prompt": self.cfg.movies_per_prompt, "rpm": self.pcfg.rpm, "tpm": self.pcfg.tpm,
             "budget_usd": self.pcfg.budget_usd, "limiter": self.limiter_info, "choice_method":
             self.choice_model.method, "page_size": self.cfg.page_size, **self.stats()}
        if self._method == "logprobs":
            d["top_logprobs"] = self.cfg.top_logprobs
        elif self._method == "samples":
            d.update(samples=self.cfg.samples, sample_temperature=self.cfg.sample_temperature,
                     smoothing=self.cfg.smoothing)
        elif self._method == "noise":
            d["noise"] = self.noise.to_dict() if self.noise is not None else None
            d["calibration"] = self.calibration
        return d
