"""The sim-to-real study: does a more faithful simulated user give a policy that is better for real users?

For each source (bias, MF, the reward model, the offline persona, the hybrid, and an LLM persona pool
when one runs as a simulator actor):
1. its fidelity on the test split (rlsim.simulators.fidelity: micro, macro, discrimination);
2. PPO trained against it for ``seeds`` seeds, every policy for the same number of env steps, on
   the same training users (a seed draws the held-out users; every source sees the same draw);
3. every policy judged on that seed's held-out users by every source (the matrix: the mean rating
   each source gives its picks) and by real held-out behaviour (hit rate, mean real rating of
   picks that have one with coverage, NDCG of its candidate ranking), beside random,
   popularity-first and the real oracle;
4. the answer: Spearman across sources between each fidelity measure (signed so that higher means
   more faithful) and the real hit rate of the policy trained on that source, with a bootstrap
   interval over seeds; the best policy's margin over popularity-first with a t-interval.

Ray must be running (the CLI starts it): each policy's simulator lives in a named actor.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from rlsim.config import DataConfig, from_dict, to_dict
from rlsim.errors import ConfigError
from rlsim.io import write_json

log = logging.getLogger(__name__)

SOURCES = ("bias", "mf", "reward_model", "offline_persona", "hybrid", "llm_persona")
# Fidelity measures and their sign: +1 when higher is more faithful.
MEASURES = {"nll": -1, "rmse": -1, "tv_sampled": -1, "like_acc_1to9": +1}


@dataclass
class StudyConfig:
    """The `study:` YAML section."""

    sources: list[str] = field(default_factory=lambda: ["bias", "mf", "reward_model", "offline_persona", "hybrid"])
    seeds: int = 3
    # Every policy trains for this many env steps (iterations = ceil(env_steps / train_batch_size)).
    env_steps: int = 30000
    like_threshold: float = 4.0
    ndcg_k: int = 10
    # An existing reward model (else the study trains one with the `reward:` section).
    reward_checkpoint: str | None = None
    # The LLM persona source: a running simulator actor (rlsim personas serve), added when set.
    llm_persona_actor: str | None = None
    llm_persona_namespace: str | None = None
    bootstrap: int = 2000
    # Settings of the hybrid source (rlsim.simulators.hybrid.HybridConfig fields).
    hybrid: dict = field(default_factory=dict)
    # When set, also trace the hybrid's curve over these entropy thresholds (0 = persona-only):
    # persona calls saved against real held-out hit rate (OUT/hybrid.json, in the report).
    hybrid_thresholds: list = field(default_factory=list)

    def validate(self) -> "StudyConfig":
        bad = [s for s in self.sources if s not in SOURCES]
        if bad:
            raise ConfigError(f"study.sources: unknown source(s) {bad} (known: {', '.join(SOURCES)})")
        if len(set(self.sources)) < 2:
            raise ConfigError("study.sources needs at least two sources to compare")
        if "llm_persona" in self.sources and not self.llm_persona_actor:
            raise ConfigError("study source 'llm_persona' needs study.llm_persona_actor (a running persona simulator)")
        if self.seeds < 1 or self.env_steps < 1:
            raise ConfigError("study.seeds and study.env_steps must be >= 1")
        return self


def mean_ci(xs) -> dict:
    """Mean with a 95% t-interval over seeds (None when there is one seed)."""
    from scipy import stats

    a = np.asarray([x for x in xs if x is not None and np.isfinite(x)], float)
    if not len(a):
        return {"mean": None, "ci95": None, "n": 0}
    half = float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else None
    return {"mean": float(a.mean()), "ci95": None if half is None else [float(a.mean() - half), float(a.mean() + half)],
            "n": int(len(a))}


def spearman_with_ci(fid: dict[str, float], per_seed: dict[str, list[float]], n_boot: int, seed: int = 0) -> dict:
    """Spearman(fidelity, mean real hit rate) across sources, with a bootstrap over seeds."""
    from rlsim.metrics import spearman

    names = [n for n in per_seed if fid.get(n) is not None and len(per_seed[n])]
    if len(names) < 3:
        return {"spearman": None, "ci95": None, "sources": names, "note": "needs at least 3 sources"}
    x = np.array([fid[n] for n in names], float)
    y = np.array([np.mean(per_seed[n]) for n in names])
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        yb = np.array([np.mean(rng.choice(per_seed[n], len(per_seed[n]))) for n in names])
        r = spearman(x, yb)
        if np.isfinite(r):
            boots.append(r)
    ci = [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))] if boots else None
    return {"spearman": spearman(x, y), "ci95": ci, "sources": names}


def _spec(name: str, ckpt: str, scfg: StudyConfig, judging: bool = False):
    """The source's SimulatorSpec. The judging copy of the hybrid never distils: the fidelity
    table and the matrix score every policy with the same, unchanging simulator."""
    from rlsim.simulators.factory import SimulatorSpec

    hybrid = {**scfg.hybrid, **({"distill_every": 0} if judging else {})}
    return {"bias": SimulatorSpec("bias"), "mf": SimulatorSpec("mf"), "reward_model": SimulatorSpec("model", ckpt),
            "offline_persona": SimulatorSpec("personas"),
            "hybrid": SimulatorSpec("hybrid", ckpt, options=hybrid),
            "llm_persona": SimulatorSpec("actor", actor=scfg.llm_persona_actor,
                                         namespace=scfg.llm_persona_namespace)}[name]


def judge_policy(data, rows, module, history, tables: dict[str, np.ndarray], train_table: np.ndarray,
                 test: pd.DataFrame, like: float, k: int) -> dict:
    """One trained policy on one seed's held-out users: the mean rating every source gives its
    picks, and the real view (with random / popularity-first / real oracle on the same users)."""
    from rlsim.policy.run import judge_users

    metrics, _, picks = judge_users(data, rows, train_table, module, history, test, like, k)
    sub = data.subset(rows)
    idx = np.arange(len(rows))
    by_source = {}
    for name, t in tables.items():
        v = t[rows][idx, picks]
        ok = sub.cand_valid[idx, picks] & np.isfinite(v)
        by_source[name] = float(v[ok].mean()) if ok.any() else None
    return {"by_source": by_source, "real": {n: {key: metrics[n].get(key) for key in
                                                 ("hit_rate", "mean_real_rating", "real_coverage")}
                                             for n in ("policy", "random", "popularity", "real_oracle")},
            "ndcg": metrics["ndcg"], "gap_closed_own_simulator": metrics.get("gap_closed")}


def run_study(dcfg: DataConfig, scfg: StudyConfig, sections: dict, out: str | Path, progress: bool = True,
              llm_persona: dict | None = None) -> dict:
    """Run the whole study into OUT (one folder per policy, study.json, matrix.png, report.html).

    ``llm_persona``: {"persona_cfg", "api_key", "options"} to START the LLM persona simulator actor
    named ``scfg.llm_persona_actor`` for this study (rlsim.simulators.llm.start_llm_persona_actor)
    and stop it at the end; without it that actor must already be running."""
    if llm_persona is not None:
        from rlsim.data import load_split
        from rlsim.simulators.actor import stop_simulator_actor
        from rlsim.simulators.llm import start_llm_persona_actor

        ds, split = load_split(dcfg)
        actor = start_llm_persona_actor(scfg.llm_persona_actor, ds, split.train, llm_persona["persona_cfg"],
                                        llm_persona.get("api_key"), llm_persona.get("options"),
                                        namespace=scfg.llm_persona_namespace, seed=dcfg.seed,
                                        text_model=dcfg.text_model, cache_dir=dcfg.cache_dir)
        try:
            result = run_study(dcfg, scfg, sections, out, progress)
            # The actor served the whole study (fidelity, every policy, the matrix) and the policy runs
            # record nothing of a simulator they did not start: its requests, usage and cost, once, here.
            import ray

            result["llm_persona"] = ray.get(actor.stats.remote())
            write_json(Path(out) / "study.json", result)
            return result
        finally:
            stop_simulator_actor(actor)
    from rlsim.candidates import CandidatesConfig, write_candidates
    from rlsim.data import load_split
    from rlsim.env import EnvData, score_all
    from rlsim.errors import require_ray
    from rlsim.personas.config import PersonaConfig
    from rlsim.policy.config import PolicyConfig
    from rlsim.policy.run import split_users, train_policy
    from rlsim.policy.train import load_policy_module
    from rlsim.simulators.factory import local_simulator
    from rlsim.simulators.fidelity import fidelity

    require_ray("the study")
    scfg = scfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ds, split = load_split(dcfg)
    sources = list(scfg.sources)
    if scfg.llm_persona_actor and "llm_persona" not in sources:
        sources.append("llm_persona")
    ckpt = scfg.reward_checkpoint
    if ckpt is None and {"reward_model", "hybrid"} & set(sources):
        from rlsim.reward.config import RewardConfig
        from rlsim.reward.train import train_reward_model

        rcfg = RewardConfig.from_dict(sections.get("reward"))
        rcfg.progress = progress
        if not (out / "reward" / "checkpoint" / "model.pt").is_file():
            train_reward_model(dcfg, rcfg, out / "reward", dataset=ds, split=split)
        ckpt = str(out / "reward" / "checkpoint")
    ccfg = from_dict(CandidatesConfig, sections.get("candidates"), "candidates").validate()
    cand_metrics = write_candidates(dcfg, ccfg, out / "candidates", dataset=ds, split=split)
    cands = pd.read_parquet(out / "candidates" / "candidates.parquet")
    base = from_dict(PolicyConfig, sections.get("policy"), "policy")
    base = replace(base, iterations=max(1, math.ceil(scfg.env_steps / base.train_batch_size))).validate()
    pcfg_personas = from_dict(PersonaConfig, sections.get("personas"), "personas")
    kw = dict(seed=dcfg.seed, persona_cfg=pcfg_personas, text_model=dcfg.text_model, cache_dir=dcfg.cache_dir)
    specs = {n: _spec(n, ckpt, scfg) for n in sources}

    # 1. Fidelity of each source, and its expected rating of every candidate (the matrix's columns).
    sims = {n: local_simulator(_spec(n, ckpt, scfg, judging=True), ds, split.train, **kw) for n in sources}
    fid = {}
    for n, sim in sims.items():
        f = fidelity(sim, split.train, split.test, seed=dcfg.seed)
        fid[n] = {"method": f["simulator"].get("method"), **{m: f[m] for m in ("rmse", "nll", "tv_sampled",
                  "five_star_share", "real_five_star_share", "like_acc_1to1", "like_acc_1to3", "like_acc_1to9",
                  "session_nll_gain")}}
        log.info("fidelity %s: %s", n, fid[n])
    # 2. Policies.
    from tqdm.auto import tqdm

    runs: dict[str, list[dict]] = {n: [] for n in sources}
    bar = tqdm(total=len(sources) * scfg.seeds, desc="study policies", unit="policy", disable=not progress)
    data = None
    tables = None
    for seed in range(scfg.seeds):
        for n in sources:
            run_dir = out / "policies" / f"{n}-seed{seed}"
            pcfg = replace(base, seed=seed)
            tm = train_policy(dcfg, pcfg, specs[n], run_dir, candidates=cands, ccfg=ccfg, sections=sections,
                              dataset=ds, split=split, progress=False)
            if data is None:  # the env tables are the same for every run (same candidates and training ratings)
                data = EnvData.load(run_dir / "env_data")
                tables = {m: score_all(data, sims[m]) for m in sources}
            _, held = split_users(len(data.user_ids), pcfg.holdout_users, seed)
            res = judge_policy(data, held, load_policy_module(run_dir / "checkpoint"), pcfg.env_history(), tables,
                         tables[n], split.test, scfg.like_threshold, scfg.ndcg_k)
            res.update({"seed": seed, "env_steps": tm["env_steps"], "wall_seconds": tm["wall_seconds"],
                        "held_out_users": int(len(held)), "simulator": tm.get("simulator", {}).get("simulator", {})})
            runs[n].append(res)
            bar.update(1)
    bar.close()
    # 3. Aggregate.
    matrix = {n: {m: mean_ci([r["by_source"][m] for r in runs[n]])["mean"] for m in sources} for n in sources}
    real = {n: {"hit_rate": mean_ci([r["real"]["policy"]["hit_rate"] for r in runs[n]]),
                "mean_real_rating": mean_ci([r["real"]["policy"]["mean_real_rating"] for r in runs[n]]),
                "real_coverage": mean_ci([r["real"]["policy"]["real_coverage"] for r in runs[n]]),
                "ndcg": mean_ci([r["ndcg"].get("policy") for r in runs[n]]),
                "env_steps": int(round(mean_ci([r["env_steps"] for r in runs[n]])["mean"]))} for n in sources}
    first = runs[sources[0]]
    reference = {b: {"hit_rate": mean_ci([r["real"][b]["hit_rate"] for r in first]),
                     "mean_real_rating": mean_ci([r["real"][b]["mean_real_rating"] for r in first])}
                 for b in ("random", "popularity", "real_oracle")}
    reference["popularity"]["ndcg"] = mean_ci([r["ndcg"].get("popularity") for r in first])
    reference["floor"] = {"ndcg": mean_ci([r["ndcg"].get("floor") for r in first])}
    hit_per_seed = {n: [r["real"]["policy"]["hit_rate"] for r in runs[n]] for n in sources}
    correlation = {m: spearman_with_ci({n: sign * fid[n][m] for n in sources if fid[n][m] is not None},
                                       hit_per_seed, scfg.bootstrap, dcfg.seed)
                   for m, sign in MEASURES.items()}
    best = max(sources, key=lambda n: real[n]["hit_rate"]["mean"] or -1)
    margin = mean_ci([r["real"]["policy"]["hit_rate"] - r["real"]["popularity"]["hit_rate"] for r in runs[best]])
    beats = margin["mean"] is not None and margin["mean"] > 0
    sure = beats and margin["ci95"] is not None and margin["ci95"][0] > 0
    answer = _answer(correlation, best, margin, beats, sure)
    result = {"dataset": dcfg.dataset, "split": split.name, "sources": sources, "seeds": scfg.seeds,
              "env_steps_per_policy": scfg.env_steps, "iterations_per_policy": base.iterations,
              "held_out_users": first[0]["held_out_users"], "like_threshold": scfg.like_threshold,
              "fidelity": fid, "matrix": matrix, "real": real, "reference": reference,
              "fidelity_vs_real_spearman": correlation,
              "best_source": best, "best_vs_popularity_hit_rate": margin, "best_beats_popularity": beats,
              "best_beats_popularity_with_95pct_confidence": sure, "answer": answer,
              "candidates_recall": cand_metrics["candidates"]["blend"]["recall"],
              "reward_checkpoint": ckpt, "config": {"study": to_dict(scfg), "policy": asdict(base)},
              "runs": runs, "seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "study.json", result)
    hybrid = None
    if scfg.hybrid_thresholds:
        hybrid = hybrid_curve(dcfg, ckpt, scfg.hybrid_thresholds, scfg.seeds, scfg.env_steps, scfg.hybrid, sections,
                              out / "hybrid", dataset=ds, split=split, progress=progress)
        write_json(out / "hybrid.json", hybrid)
    from rlsim.report import write_study_report

    write_study_report(result, out, hybrid=hybrid)
    return result


def hybrid_curve(dcfg: DataConfig, ckpt: str, thresholds, seeds: int, env_steps: int, hybrid: dict, sections: dict,
                 out: str | Path, dataset=None, split=None, like_threshold: float = 4.0, progress: bool = True) -> dict:
    """Persona calls saved against real quality, over the hybrid's entropy threshold.

    For each threshold PPO is trained against the hybrid (same env steps, ``seeds`` seeds) and judged
    on held-out users by their real held-out ratings; threshold 0 is persona-only (every answer from
    the persona, through the same cache), so calls_saved = 1 - calls(threshold) / calls(0). The
    fidelity columns are the judging copy's (it never distils) on the test split."""
    from tqdm.auto import tqdm

    from rlsim.candidates import CandidatesConfig, write_candidates
    from rlsim.data import load_split
    from rlsim.env import EnvData, score_all
    from rlsim.errors import require_ray
    from rlsim.policy.config import PolicyConfig
    from rlsim.policy.run import split_users, train_policy
    from rlsim.policy.train import load_policy_module
    from rlsim.simulators.factory import SimulatorSpec, local_simulator
    from rlsim.simulators.fidelity import micro

    require_ray("the hybrid curve")
    out = Path(out)
    if dataset is None:
        dataset, split = load_split(dcfg)
    ccfg = from_dict(CandidatesConfig, sections.get("candidates"), "candidates").validate()
    write_candidates(dcfg, ccfg, out / "candidates", dataset=dataset, split=split)
    cands = pd.read_parquet(out / "candidates" / "candidates.parquet")
    base = from_dict(PolicyConfig, sections.get("policy"), "policy")
    base = replace(base, iterations=max(1, math.ceil(env_steps / base.train_batch_size))).validate()
    model_table, curve, t0 = None, [], time.perf_counter()
    bar = tqdm(total=len(thresholds) * seeds, desc="hybrid curve", unit="policy", disable=not progress)
    for th in [float(t) for t in thresholds]:
        opts = {**hybrid, "threshold": th}
        fid = micro(local_simulator(SimulatorSpec("hybrid", ckpt, options={**opts, "distill_every": 0}), dataset,
                                    split.train), split.test)
        hits, calls, requested, steps = [], [], [], []
        for seed in range(seeds):
            run = out / f"t{th:g}-seed{seed}"
            pcfg = replace(base, seed=seed)
            tm = train_policy(dcfg, pcfg, SimulatorSpec("hybrid", ckpt, options=opts), run, candidates=cands,
                              ccfg=ccfg, sections=sections, dataset=dataset, split=split, progress=False)
            data = EnvData.load(run / "env_data")
            if model_table is None:  # only its mask matters here: every candidate the reward model rates
                model_table = score_all(data, local_simulator(SimulatorSpec("model", ckpt), dataset, split.train))
            _, held = split_users(len(data.user_ids), pcfg.holdout_users, seed)
            res = judge_policy(data, held, load_policy_module(run / "checkpoint"), pcfg.env_history(), {}, model_table,
                               split.test, like_threshold, 10)
            sim = tm["simulator"]["simulator"]
            hits.append(res["real"]["policy"]["hit_rate"])
            calls.append(sim["persona_calls"])
            requested.append(sim["requested"])
            steps.append(tm["env_steps"])
            log.info("threshold %g seed %d: hit %.4f, persona calls %d of %d", th, seed, hits[-1], calls[-1],
                     requested[-1])
            bar.update(1)
        h = mean_ci(hits)
        curve.append({"threshold": th, "persona_calls": float(np.mean(calls)), "requested": float(np.mean(requested)),
                      "real_hit_rate": h["mean"], "real_hit_rate_ci": h, "real_hit_rate_per_seed": hits,
                      "env_steps": float(np.mean(steps)), "nll": fid["nll"], "rmse": fid["rmse"]})
    bar.close()
    persona_only = next((c for c in curve if c["threshold"] == 0), None)
    for c in curve:
        c["calls_saved"] = None if not persona_only or not persona_only["persona_calls"] else \
            1 - c["persona_calls"] / persona_only["persona_calls"]
        c["hit_rate_loss_vs_persona_only"] = None if not persona_only else \
            persona_only["real_hit_rate"] - c["real_hit_rate"]
    ok = [c["threshold"] for c in curve if c["calls_saved"] is not None and c["calls_saved"] >= 0.8
          and c["hit_rate_loss_vs_persona_only"] <= 0.01]
    return {"dataset": f"{dcfg.dataset} {split.name}", "seeds": seeds, "env_steps_per_policy": env_steps,
            "hybrid": dict(hybrid), "curve": curve, "meets_goal_at": ok,
            "goal": ">= 80% fewer persona calls than persona-only at <= 0.01 loss in real held-out hit rate",
            "seconds": round(time.perf_counter() - t0, 1)}


def _answer(correlation: dict, best: str, margin: dict, beats: bool, sure: bool) -> str:
    c = correlation.get("nll") or {}
    rho, ci = c.get("spearman"), c.get("ci95")
    if rho is None:
        corr = "too few sources to correlate fidelity with real performance"
    else:
        span = f" (95% bootstrap interval {ci[0]:+.2f} to {ci[1]:+.2f})" if ci else ""
        corr = (f"across sources, Spearman between fidelity (lower NLL of real ratings) and the real hit rate "
                f"of the policy trained on that source is {rho:+.2f}{span}")
    m = margin["mean"]
    m_ci = margin.get("ci95")
    tail = f" (95% interval {m_ci[0]:+.4f} to {m_ci[1]:+.4f})" if m_ci else ""
    if beats:
        pop = (f"the best policy (trained on {best}) beats popularity-first on real held-out hit rate by "
               f"{m:+.4f}{tail}" + ("" if sure else ", but the interval includes zero"))
    else:
        pop = (f"no policy beats popularity-first on real held-out hit rate: the best (trained on {best}) is "
               f"{m:+.4f}{tail} behind it")
    return f"{corr}; {pop}."
