"""How the LLM persona simulator gets its distributions: the probe of the endpoint (``auto``) and the
noise model's calibration on a training hold-out (``noise``)."""

from __future__ import annotations

import asyncio

import numpy as np

from rlsim.errors import ConfigError
from rlsim.simulators.base import EMPTY
from rlsim.simulators.llm_config import METHOD_NAMES, MIN_CALIBRATION
from rlsim.simulators.llm_logprobs import is_integer_scale, logprob_distributions


class MethodProbe:
    """Mixin of LLMPersonaSimulator (rlsim.simulators.llm): resolves its method, fits its noise model."""

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
            params = self.params_for(method)
            res = exc = None
            for attempt in range(self.pcfg.max_retries + 1):
                res, exc, _ = await self.request(msgs, rf, params, self.setup_usage, 0)
                if res is not None:
                    break
                why, final = await self.after_error(exc, self.setup_usage, attempt)
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
