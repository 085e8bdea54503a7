"""The sim-to-real study: does a more faithful simulated user give a policy that is better for real users?

For each source (bias, MF, the reward model, the offline persona, the hybrid, and an LLM persona pool
when one runs as a simulator actor):
1. its fidelity on the test split (rlsim.simulators.fidelity: micro, macro, discrimination);
2. PPO trained against it for ``seeds`` seeds, every policy for the same number of env steps; a
   seed draws the held-out users, only among users with held-out behaviour (a test rating), and
   every source sees the same draw (run.json's held-out ids are the truth);
3. every policy judged on that seed's held-out users by every source (the matrix: the mean rating
   each source gives its picks) and by real held-out behaviour, per user (rlsim.study_real: hit,
   watched, slate NDCG, coverage), beside references on the same users and candidates:
   popularity-first, random, the real oracle, explicit MF top-1, BPR top-1, reward-model greedy;
4. the answer (rlsim.study_stats): every source's paired difference from popularity-first with a
   two-level bootstrap interval (seeds, then users), Holm-corrected across all sources (no best-of
   selection); Spearman across sources between each fidelity measure (signed so that higher means
   more faithful) and the real hit rate, with the same paired resampling; the hybrid beside both
   of its ends (persona-only, reward-model-only).

Ray must be running (the CLI starts it): each policy's simulator lives in a named actor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rlsim.config import to_dict
from rlsim.errors import ConfigError, DataError
from rlsim.io import write_json
from rlsim.study_steps import candidates_stage, held_out_rows, judge_policy, mean_ci, policy_base, reward_stage

if TYPE_CHECKING:
    from rlsim.run_config import RunConfig

log = logging.getLogger(__name__)

from rlsim.simulators.registry import names as _simulator_names

# A study source is any registered simulated user (a running actor is how llm_persona is reached).
SOURCES = tuple(n for n in _simulator_names() if n != "actor")
# Fidelity measures and their sign: +1 when higher is more faithful.
MEASURES = {"nll": -1, "rmse": -1, "tv_sampled": -1, "like_acc_1to9": +1}


@dataclass
class StudyConfig:
    """The `study:` YAML section."""

    sources: list[str] = field(default_factory=lambda: ["bias", "mf", "reward_model", "offline_persona", "hybrid"])
    # Policies per source; the bootstrap resamples seeds, so few seeds give wide intervals.
    seeds: int = 5
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
    # BPR settings to choose from on a training validation slice (empty: rlsim.bpr.select_bpr's grid).
    bpr_grid: list = field(default_factory=list)
    # Settings of the hybrid source (rlsim.simulators.hybrid.HybridConfig fields).
    hybrid: dict = field(default_factory=dict)
    # When set, also trace the hybrid's curve over these entropy thresholds (0 = persona-only):
    # persona calls saved against real held-out hit rate (OUT/hybrid.json, in the report).
    hybrid_thresholds: list = field(default_factory=list)
    # Sources whose fidelity coverage (answered / asked test pairs) is below this are left out of the
    # fidelity-vs-real correlation (their NLL covers only the pairs they answered) and named there.
    min_fidelity_coverage: float = 1.0

    def validate(self) -> "StudyConfig":
        bad = [s for s in self.sources if s not in SOURCES]
        if bad:
            raise ConfigError(f"study.sources: unknown source(s) {bad} (known: {', '.join(SOURCES)})")
        if len(set(self.sources)) < 2:
            raise ConfigError("study.sources needs at least two sources to compare")
        if "llm_persona" in self.sources and not self.llm_persona_actor:
            raise ConfigError("study source 'llm_persona' needs study.llm_persona_actor (a running persona simulator)")
        from dataclasses import fields

        from rlsim.bpr import BPR

        known = {f.name for f in fields(BPR)}
        bad = [g for g in self.bpr_grid if not isinstance(g, dict) or set(g) - known]
        if bad:
            raise ConfigError(f"study.bpr_grid: each entry is a mapping of {sorted(known)}, got {bad[0]!r}")
        if not 0.0 <= self.min_fidelity_coverage <= 1.0:
            raise ConfigError(f"study.min_fidelity_coverage must be in [0, 1], got {self.min_fidelity_coverage}")
        if self.seeds < 1 or self.env_steps < 1 or self.bootstrap < 1:
            raise ConfigError("study.seeds, study.env_steps and study.bootstrap must be >= 1")
        return self


def _spec(name: str, ckpt: str, scfg: StudyConfig, judging: bool = False):
    """The source's SimulatorSpec. The judging copy of the hybrid never distils: the fidelity
    table and the matrix score every policy with the same, unchanging simulator."""
    from rlsim.simulators.factory import SimulatorSpec
    from rlsim.simulators.registry import entry

    hybrid = {**scfg.hybrid, **({"distill_every": 0} if judging else {})}
    if name == "llm_persona":  # the study reaches its LLM personas as a running simulator actor
        return SimulatorSpec("actor", actor=scfg.llm_persona_actor, namespace=scfg.llm_persona_namespace)
    return SimulatorSpec(name, ckpt if "checkpoint" in entry(name).needs else None,
                         options=hybrid if name == "hybrid" else {})


def choice_summary(sim, train, test, seed: int) -> dict | None:
    """Agent4Rec's trials of a source's choice (a held-out watched movie among 1/3/9 never-rated ones):
    accuracy at each ratio, AUC and F1 at 1:9; None for a source that only rates."""
    from rlsim.simulators.choice_fidelity import choice_fidelity

    if not sim.has_choice:
        return None
    return choice_fidelity(lambda u, i: sim.choice(u, i), train, test, seed=seed)["summary"]


def popularity_choice_summary(train, test, seed: int) -> dict:
    from rlsim.simulators.choice import PopularityChoice
    from rlsim.simulators.choice_fidelity import choice_fidelity

    model = PopularityChoice(seed=seed).fit(train)
    return choice_fidelity(model.probability, train, test, seed=seed)["summary"]


def fidelity_for_correlation(fid: dict[str, dict], min_coverage: float) -> tuple[dict, dict]:
    """(the sources whose fidelity enters the correlation, {left-out source: its coverage})."""
    low = {n: f.get("coverage") for n, f in fid.items() if f.get("coverage") is not None and f["coverage"] < min_coverage}
    return {n: f for n, f in fid.items() if n not in low}, low


def source_accounting(runs: list[dict]) -> dict:
    """A source's training rewards over its policies: asked, answered, failed (by reason)."""
    from rlsim.vector_env import reward_accounting

    return reward_accounting([r["reward_accounting"] for r in runs if "answered" in r.get("reward_accounting", {})])


def run_study(run: "RunConfig", out: str | Path, progress: bool = True, llm_persona: dict | None = None) -> dict:
    """Run the whole study into OUT (one folder per policy, study.json, matrix.png, report.html), with
    run.study's sources and seeds; the reward model and candidates come from the pipeline's own stages
    (rlsim.pipeline.STAGES: OUT/reward, OUT/candidates), trained with run's sections.

    ``llm_persona``: {"persona_cfg", "api_key", "options"} to START the LLM persona simulator actor
    named ``scfg.llm_persona_actor`` for this study (rlsim.simulators.llm_build.start_llm_persona_actor)
    and stop it at the end; without it that actor must already be running."""
    dcfg, scfg = run.data, run.study
    if llm_persona is not None:
        from rlsim.data import load_split
        from rlsim.simulators.actor import stop_simulator_actor
        from rlsim.simulators.llm_build import start_llm_persona_actor

        ds, split = load_split(dcfg)
        actor = start_llm_persona_actor(scfg.llm_persona_actor, ds, split.train, llm_persona["persona_cfg"],
                                        llm_persona.get("api_key"), llm_persona.get("options"),
                                        namespace=scfg.llm_persona_namespace, seed=dcfg.seed,
                                        text_model=dcfg.text_model, cache_dir=dcfg.cache_dir)
        try:
            result = run_study(run, out, progress)
            # The actor served the whole study (fidelity, every policy, the matrix) and the policy runs
            # record nothing of a simulator they did not start: its requests, usage and cost, once, here.
            import ray

            result["llm_persona"] = ray.get(actor.stats.remote())
            write_json(Path(out) / "study.json", result)
            return result
        finally:
            stop_simulator_actor(actor)
    from rlsim.data import load_split
    from rlsim.env import EnvData, score_all
    from rlsim.errors import require_ray
    from rlsim.pipeline import FIDELITY_KEYS
    from rlsim.policy.evaluate import held_out_ratings
    from rlsim.policy.run import held_out_eligible, train_policy
    from rlsim.policy.train import load_policy_module
    from rlsim.simulators.factory import SimulatorSpec, local_simulator
    from rlsim.simulators.fidelity import fidelity
    from rlsim.study_real import answer, reference_scores, references_for_users, summarize_outcomes

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
    timing: dict = {}  # wall seconds per phase (study.json "timing"): where the study's time goes
    mark = time.perf_counter()
    if ckpt is None and {"reward_model", "hybrid"} & set(sources):
        ckpt = reward_stage(run, out, (ds, split), progress)
    cand_metrics, cands = candidates_stage(run, out, (ds, split))
    timing["reward_and_candidates"], mark = time.perf_counter() - mark, time.perf_counter()
    base = policy_base(run)
    kw = dict(seed=dcfg.seed, persona_cfg=run.personas, text_model=dcfg.text_model, cache_dir=dcfg.cache_dir)
    specs = {n: _spec(n, ckpt, scfg) for n in sources}

    # 1. Fidelity of each source, and its expected rating of every candidate (the matrix's columns).
    sims = {n: local_simulator(_spec(n, ckpt, scfg, judging=True), ds, split.train, **kw) for n in sources}
    fid, notes = {}, set()
    for n, sim in sims.items():
        f = fidelity(sim, split.train, split.test, seed=dcfg.seed)
        notes.update(x for x in [f["session"].get("note")] if x)
        fid[n] = {"method": f["simulator"].get("method"), **{m: f[m] for m in ("coverage", *FIDELITY_KEYS)},
                  "choice": choice_summary(sim, split.train, split.test, dcfg.seed)}
        log.info("fidelity %s: %s", n, fid[n])
        timing.setdefault("fidelity", {})[n], mark = time.perf_counter() - mark, time.perf_counter()
    # Choice fidelity's reference: popularity's picks in the same trials (rlsim.simulators.choice).
    choice_reference = popularity_choice_summary(split.train, split.test, dcfg.seed)
    # 2. Policies.
    from tqdm.auto import tqdm

    runs: dict[str, list[dict]] = {n: [] for n in sources}
    bar = tqdm(total=len(sources) * scfg.seeds, desc="study policies", unit="policy", disable=not progress)
    data = tables = ref_scores = None
    outcomes: dict[str, dict[str, list]] = {key: {} for key in ("hit", "watched", "ndcg")}
    cover: dict[str, list] = {}
    held_ids, eligible = [], None
    for seed in range(scfg.seeds):
        seed_rows = None
        for n in sources:
            run_dir = out / "policies" / f"{n}-seed{seed}"
            pcfg = replace(base, seed=seed)
            tm = train_policy(dcfg, pcfg, specs[n], run_dir, candidates=cands, ccfg=run.candidates,
                              persona_cfg=run.personas, dataset=ds, split=split, progress=False, source=n,
                              env_data=data)
            if data is None:  # the env tables are the same for every run (same candidates and training ratings)
                data = EnvData.load(run_dir / "env_data")
                tables = {m: score_all(data, sims[m]) for m in sources}
                eligible = held_out_eligible(data, split.test)
                rm = tables.get("reward_model")
                if rm is None and ckpt:
                    rm = score_all(data, local_simulator(SimulatorSpec("model", ckpt), ds, split.train, **kw))
                ref_scores, ref_info = reference_scores(data, split.train, ds.scale, dcfg.seed, rm, scfg.bpr_grid)
            held = held_out_rows(data, run_dir)
            if seed_rows is None:
                seed_rows = held
            elif not np.array_equal(held, seed_rows):
                raise DataError(f"seed {seed}: {n}'s held-out users differ from {sources[0]}'s; the comparison "
                                "would not be paired")
            res = judge_policy(data, held, load_policy_module(run_dir / "checkpoint"), pcfg.env_history(), tables,
                               tables[n], split.test, scfg.like_threshold, scfg.ndcg_k)
            for key, v in res.pop("outcomes").items():
                outcomes[key].setdefault(n, []).append(v)
            cover.setdefault(n, []).append(res.pop("coverage"))
            res.update({"seed": seed, "env_steps": tm["env_steps"], "wall_seconds": tm["wall_seconds"],
                        "reward_accounting": tm["reward_accounting"],
                        "held_out_users": int(len(held)), "simulator": tm.get("simulator", {}).get("simulator", {})})
            runs[n].append(res)
            bar.update(1)
            # Training (tm's own wall time) and the rest: judging, and the first run's env tables and references.
            spent = time.perf_counter() - mark
            timing.setdefault("policy_training", {}).setdefault(n, []).append(round(tm["wall_seconds"], 1))
            timing.setdefault("policy_other", {}).setdefault(n, []).append(round(spent - tm["wall_seconds"], 1))
            mark = time.perf_counter()
        # The references on the same users and candidates as this seed's policies.
        sub = data.subset(seed_rows)
        refs, ref_cov = references_for_users(sub, held_out_ratings(sub, split.test),
                                             {m: v[seed_rows] for m, v in ref_scores.items()},
                                             scfg.like_threshold, scfg.ndcg_k)
        for name, o in refs.items():
            for key, v in o.items():
                outcomes[key].setdefault(name, []).append(v)
            cover.setdefault(name, []).append(ref_cov[name])
        held_ids.append([int(u) for u in data.user_ids[seed_rows]])
        timing["references"] = timing.get("references", 0.0) + time.perf_counter() - mark
        mark = time.perf_counter()
    bar.close()
    if len({len(h) for h in held_ids}) != 1:
        raise DataError("the seeds hold out different numbers of users; the bootstrap needs the same count")
    # 3. Aggregate: two-level paired bootstrap over seeds and held-out users (rlsim.study_stats).
    arrays = {key: {n: np.stack(v) for n, v in by.items()} for key, by in outcomes.items()}
    np.savez_compressed(out / "outcomes.npz", held_out_user_ids=np.array(held_ids),
                        **{f"{key}/{n}": a for key, by in arrays.items() for n, a in by.items()})
    # A source whose fidelity covers fewer test pairs than min_fidelity_coverage (an LLM that failed
    # some) has an NLL/RMSE over the pairs it answered: not comparable, so out of the correlation.
    kept, low = fidelity_for_correlation(fid, scfg.min_fidelity_coverage)
    summary = summarize_outcomes(arrays, cover, sources, kept, MEASURES, scfg.bootstrap, dcfg.seed)
    for c in summary["fidelity_vs_real_spearman"].values():
        c.update(excluded_low_coverage=low, min_coverage=scfg.min_fidelity_coverage)
    matrix = {n: {m: mean_ci([r["by_source"][m] for r in runs[n]])["mean"] for m in sources} for n in sources}
    test_users = set(split.test["user_id"].unique())
    held = {"users_per_seed": len(held_ids[0]), "seeds": scfg.seeds, "eligible_users": int(eligible.sum()),
            "env_users": int(len(data.user_ids)), "eligibility": "users with at least one held-out (test) rating",
            "with_held_out_behaviour_per_seed": [sum(u in test_users for u in h) for h in held_ids],
            "with_held_out_rated_candidate_per_seed": [int(np.isfinite(a).sum()) for a in arrays["ndcg"][sources[0]]]}
    result = {"dataset": dcfg.dataset, "split": split.name, "source_names": sources, "seeds": scfg.seeds,
              "env_steps_per_policy": scfg.env_steps, "iterations_per_policy": base.iterations,
              "held_out_users": held["users_per_seed"],
              "held_out_users_with_behaviour": min(held["with_held_out_behaviour_per_seed"]),
              "held_out": held, "like_threshold": scfg.like_threshold, "ndcg_k": scfg.ndcg_k,
              "fidelity": fid, "choice_reference": {"popularity": choice_reference}, "reward_accounting": {n: source_accounting(runs[n]) for n in sources},
              "matrix": matrix, **summary, "reference_settings": ref_info,
              "env_steps": {n: int(round(float(np.mean([r["env_steps"] for r in runs[n]])))) for n in sources},
              "answer": answer(summary, sources, held),
              "candidates_recall": cand_metrics["candidates"]["blend"]["recall"],
              "reward_checkpoint": ckpt, "config": {"study": to_dict(scfg), "policy": asdict(base)},
              "runs": runs, "notes": sorted(notes), "seconds": round(time.perf_counter() - t0, 1)}
    timing["aggregate"] = time.perf_counter() - mark
    result["timing"] = {k: round(v, 1) if isinstance(v, float) else
                        {n: round(x, 1) if isinstance(x, float) else x for n, x in v.items()}
                        for k, v in timing.items()}
    write_json(out / "study.json", result)
    hybrid = None
    if scfg.hybrid_thresholds:
        from rlsim.study_hybrid import hybrid_curve

        hybrid = hybrid_curve(run, ckpt, out / "hybrid", dataset=ds, split=split, progress=progress)
        write_json(out / "hybrid.json", hybrid)
    from rlsim.report_study import write_study_report

    write_study_report(result, out, hybrid=hybrid)
    return result
