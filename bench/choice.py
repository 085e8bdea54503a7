"""Choice fidelity of every simulated user on ML-100K u1 -> bench/results/choice.json.

Would a simulated user pick what real users went on to watch? Agent4Rec's trials: one movie the
user rated in the test split among 1, 3 or 9 movies they never rated (rlsim.simulators.choice_fidelity).
`reference.popularity` is the popularity/activity choice model (the reference every source must
beat); `sources.<name>` is each registered simulated user's own choice model, or null with the
reason when it has none yet (it only rates); `needs_endpoint` names the sources whose choice needs an
LLM endpoint to measure (llm_persona's page choice). Choice models are fitted on the training ratings
only; their settings are chosen on a validation slice of them. `session` replays ml-latest-small's
temporal split: does what the user just watched help predict their next pick (AUC with and without)?

    python bench/choice.py [--data-dir ../shared/datasets] [--cache-dir .cache] [--train-reward | --reward-checkpoint CKPT]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/

from rlsim.config import DataConfig  # noqa: E402
from rlsim.data import load_split  # noqa: E402
from _child import write_result  # noqa: E402

KEYS = ("auc", "acc_1to1", "acc_1to3", "acc_1to9", "f1_1to9")


def summary(f: dict) -> dict:
    s = f["summary"]
    return {**{k: s[k] for k in KEYS}, "trials_1to9": s["trials_1to9"], "users": f["1to9"]["users"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("RLSIM_DATA_DIR", str(REPO.parent / "shared" / "datasets")))
    p.add_argument("--cache-dir", default=os.environ.get("RLSIM_CACHE_DIR", str(REPO / ".cache")))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "choice.json"))
    p.add_argument("--reward-checkpoint", help="a reward model trained with reward.choice_weight > 0 (its choice head)")
    p.add_argument("--train-reward", action="store_true",
                   help="train one first (library defaults + choice_weight 1.0) into .cache/bench-choice-reward")
    args = p.parse_args(argv)
    from rlsim.simulators import registry
    from rlsim.simulators.choice import PopularityChoice
    from rlsim.simulators.choice_fidelity import choice_fidelity, choice_session_gain
    from rlsim.simulators.factory import SimulatorSpec, local_simulator

    t0 = time.perf_counter()
    dcfg = DataConfig(dataset="ml-100k", split="u1", data_dir=args.data_dir, cache_dir=args.cache_dir,
                      download=False)
    ds, split = load_split(dcfg)
    ref = PopularityChoice(seed=dcfg.seed).fit(split.train)
    out = {"dataset": "ml-100k/u1", "reference": {"popularity": summary(choice_fidelity(ref.probability, split.train,
                                                                                          split.test, seed=dcfg.seed))},
           "sources": {}}
    print("reference popularity", out["reference"]["popularity"])
    ckpt = args.reward_checkpoint
    if args.train_reward and not ckpt:
        from rlsim.reward.config import RewardConfig
        from rlsim.reward.train import train_reward_model

        work = Path(args.cache_dir) / "bench-choice-reward"
        res = train_reward_model(dcfg, RewardConfig(choice_weight=1.0), work, dataset=ds, split=split)
        ckpt = str(work / "checkpoint")
        out["reward_model_training"] = {"config": "library defaults + choice_weight 1.0",
                                        "test_rmse": res["model"]["rmse"], "best_epoch": res["best_epoch"]}
    if ckpt and "reward_model_training" not in out and (Path(ckpt).parent / "metrics.json").is_file():
        import json

        m = json.loads((Path(ckpt).parent / "metrics.json").read_text())
        out["reward_model_training"] = {"config": f"choice_weight {m['reward'].get('choice_weight')}",
                                        "test_rmse": m["model"]["rmse"], "best_epoch": m.get("best_epoch")}
    for name in registry.names():
        e = registry.entry(name)
        if name == "reward_model" and ckpt:
            sim = local_simulator(SimulatorSpec(name, ckpt), ds, split.train, seed=dcfg.seed, cache_dir=args.cache_dir)
            if sim.has_choice:
                f = choice_fidelity(sim.choice, split.train, split.test, seed=dcfg.seed)
                out["sources"][name] = {**summary(f), "choice_model": "head", "checkpoint": ckpt}
                print(name, out["sources"][name])
                continue
        if "endpoint" in e.needs:
            # An LLM persona's page choice costs one request per page and trial: its fidelity means something
            # only against a real model's endpoint (tests/test_real_llm.py checks it runs on SmolLM2).
            out.setdefault("needs_endpoint", {})[name] = ("chooses by its page prompt (rlsim.simulators.llm_choice); "
                                                          "measuring it needs an LLM endpoint, not run here")
            out["sources"][name] = None
            continue
        if e.build is None or "checkpoint" in e.needs:
            # Sources whose choice is not built yet (or a running actor, which is one of the others).
            out["sources"][name] = None if name != "actor" else "a running actor: any of the others"
            continue
        sim = local_simulator(SimulatorSpec(name), ds, split.train, seed=dcfg.seed, cache_dir=args.cache_dir)
        if not sim.has_choice:
            out["sources"][name] = None
            continue
        f = choice_fidelity(sim.choice, split.train, split.test, seed=dcfg.seed)
        out["sources"][name] = {**summary(f), "choice_model": sim.describe()["choice"]}
        print(name, out["sources"][name])
    out["no_choice_yet"] = [n for n in registry.names() if n not in registry.choosing() and n != "actor"]
    out["not_measured_here"] = [n for n, v in out["sources"].items() if v is None and n not in out["no_choice_yet"]
                                and n not in out.get("needs_endpoint", {})]
    # Sessions: ml-latest-small's temporal split replayed in time order (ML-100K u1 is not temporal).
    tcfg = DataConfig(dataset="ml-latest-small", split="temporal", data_dir=args.data_dir, cache_dir=args.cache_dir,
                      download=False)
    tds, tsplit = load_split(tcfg)
    sess = {"dataset": "ml-latest-small/temporal", "reference": {
        "popularity": choice_session_gain(PopularityChoice(seed=tcfg.seed).fit(tsplit.train).probability,
                                          tsplit.train, tsplit.test, seed=tcfg.seed)}, "sources": {}}
    for name, v in out["sources"].items():
        # A checkpoint is trained on ML-100K: the reward model's session replay needs one of its own.
        if isinstance(v, dict) and "checkpoint" not in registry.entry(name).needs:
            sim = local_simulator(SimulatorSpec(name), tds, tsplit.train, seed=tcfg.seed, cache_dir=args.cache_dir)
            sess["sources"][name] = choice_session_gain(sim.choice, tsplit.train, tsplit.test, seed=tcfg.seed)
            print("session", name, {k: sess["sources"][name][k] for k in ("auc_gain", "accuracy_gain", "trials")})
    out["session"] = sess
    return write_result(out, args.out, "choice.py", argv, t0)


if __name__ == "__main__":
    raise SystemExit(main())
