"""What one movie per prompt costs the LLM persona simulator -> bench/results/llm_batching.json.

rlsim.simulators.llm rates ``llm_persona.movies_per_prompt`` movies per prompt (default 1), so that a
(user, session, movie)'s distribution never depends on the movies asked beside it. This measures, against
the test server (tests/fake_openai.py, logprobs), requests and prompt tokens per rating for 1 and for 10
movies per prompt (the persona stage's batch size) in two call patterns:

- ``env_steps``: 32 envs stepping 5-rating sessions of seeded users (each env's pick given its own session),
  as SessionVectorEnv asks: one call per step;
- ``no_session_scoring``: every one of K=10 candidates of 20 users with no session, as score_all and
  fidelity ask.

Run: python bench/llm_batching.py  (a few seconds; the server's formula ratings say nothing about fidelity)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def env_steps(sim, n_envs: int = 32, horizon: int = 5, seed: int = 0) -> int:
    from rlsim.simulators.base import EMPTY

    rng = np.random.default_rng(seed)
    users = rng.integers(1, 21, n_envs)
    sessions = [EMPTY] * n_envs
    asked = 0
    for _ in range(horizon):
        items = rng.integers(1, 61, n_envs)
        p = sim.distribution(users, items, sessions)
        asked += n_envs
        ratings = p.argmax(1) + 1.0
        sessions = [s.extend(int(i), float(r)) for s, i, r in zip(sessions, items, ratings)]
    return asked


def no_session_scoring(sim, n_users: int = 20, k: int = 10, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(1, n_users + 1), k)
    items = np.concatenate([rng.choice(np.arange(1, 61), k, replace=False) for _ in range(n_users)])
    sim.distribution(users, items)
    return len(users)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "llm_batching.json"))
    a = ap.parse_args()
    from rlsim.io import write_json
    from tests.fake_openai import FakeOpenAI, FaultConfig
    from tests.test_llm_simulator import make_sim

    result = {}
    for pattern, run in (("env_steps", env_steps), ("no_session_scoring", no_session_scoring)):
        for m in (1, 10):
            with FakeOpenAI(FaultConfig()) as srv:
                sim = make_sim(srv, method="logprobs", movies_per_prompt=m)
                ratings = run(sim)
                reqs = [r for r in srv.log if r.status == 200]
                result[f"{pattern}_movies_per_prompt_{m}"] = {
                    "ratings": ratings, "requests": len(reqs), "requests_per_rating": round(len(reqs) / ratings, 3),
                    "prompt_tokens_per_rating": round(sum(r.prompt_tokens for r in reqs) / ratings, 1)}
    for pattern in ("env_steps", "no_session_scoring"):
        one, ten = result[f"{pattern}_movies_per_prompt_1"], result[f"{pattern}_movies_per_prompt_10"]
        result[f"{pattern}_request_factor"] = round(one["requests"] / ten["requests"], 2)
    write_json(a.out, result)
    print(result)


if __name__ == "__main__":
    main()
