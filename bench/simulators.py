"""Simulator fidelity benchmark -> bench/results/simulators.json.

For each simulator (reward model, offline persona, bias, MF) on ML-100K u1 and ml-latest-small
(temporal split): micro (RMSE of the expectation, NLL of the real rating), macro (sampled-rating
histogram vs the real test histogram: total variation, 5-star share), discrimination (Agent4Rec
1:1, 1:3, 1:9) and session fidelity (next-rating NLL with and without the session so far, real
held-out ratings replayed in time order). See rlsim/simulators/fidelity.py for the definitions.

Run: python bench/simulators.py [--data-dir ../shared/datasets] [--cache-dir .cache] [--work DIR]
The reward models are trained with the library defaults (about 2 min for ML-100K, 5 for
ml-latest-small on 2 cores) unless --reward-checkpoint DATASET=DIR gives one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlsim.config import DataConfig  # noqa: E402
from rlsim.data import load_split  # noqa: E402
from rlsim.io import write_json  # noqa: E402

CASES = [("ml-100k", "u1"), ("ml-latest-small", "temporal")]
KEYS = ("rmse", "nll", "tv_sampled", "five_star_share", "real_five_star_share", "like_acc_1to1", "like_acc_1to3",
        "like_acc_1to9", "session_nll_gain")


def reward_checkpoint(dcfg: DataConfig, given: str | None, work: Path) -> str:
    if given:
        return given
    from rlsim.reward.config import RewardConfig
    from rlsim.reward.train import train_reward_model

    out = work / f"reward-{dcfg.dataset}-{dcfg.split}"
    if not (out / "checkpoint" / "model.pt").is_file():
        train_reward_model(dcfg, RewardConfig(), out)
    return str(out / "checkpoint")


def simulators(dcfg: DataConfig, checkpoint: str):
    from rlsim.embeddings import item_text_vectors
    from rlsim.personas.config import PersonaConfig
    from rlsim.simulators.persona import offline_persona_simulator
    from rlsim.simulators.point import baseline_simulator
    from rlsim.simulators.reward_model import RewardModelSimulator

    ds, split = load_split(dcfg)
    vectors = item_text_vectors(ds.items, dcfg.text_model, dcfg.cache_dir)
    yield "reward_model", RewardModelSimulator.load(checkpoint), split
    yield "offline_persona", offline_persona_simulator(ds, split.train, PersonaConfig(), vectors, dcfg.seed), split
    for name in ("bias", "mf"):
        yield name, baseline_simulator(name, split.train, ds.scale, dcfg.seed), split


def fidelity_case(dcfg: DataConfig, checkpoint: str) -> dict:
    from rlsim.simulators.fidelity import fidelity

    out = {}
    for name, sim, split in simulators(dcfg, checkpoint):
        t0 = time.perf_counter()
        f = fidelity(sim, split.train, split.test, seed=dcfg.seed)
        out[name] = {**{k: f[k] for k in KEYS}, "seconds": round(time.perf_counter() - t0, 2),
                     "details": {k: f[k] for k in ("simulator", "micro", "macro", "discrimination", "session")}}
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out[name].items()
                                if k in KEYS}))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("RLSIM_DATA_DIR", str(REPO.parent / "shared" / "datasets")))
    p.add_argument("--cache-dir", default=os.environ.get("RLSIM_CACHE_DIR", str(REPO / ".cache")))
    p.add_argument("--work", help="folder for trained reward models (default: a temp dir)")
    p.add_argument("--reward-checkpoint", action="append", default=[], help="DATASET=DIR (repeatable)")
    p.add_argument("--only", help="comma-separated datasets to run (default: ml-100k,ml-latest-small)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "simulators.json"))
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="rlsim-bench-sim-"))
    given = dict(x.split("=", 1) for x in args.reward_checkpoint)
    only = set(args.only.split(",")) if args.only else None
    result: dict = {"cases": {}}
    for dataset, split in CASES:
        if only and dataset not in only:
            continue
        dcfg = DataConfig(dataset=dataset, split=split, data_dir=args.data_dir, cache_dir=args.cache_dir,
                          download=False)
        print(f"== {dataset} {split}")
        ckpt = reward_checkpoint(dcfg, given.get(dataset), work)
        result["cases"][f"{dataset} {split}"] = fidelity_case(dcfg, ckpt)
    first = next(iter(result["cases"].values()), {})
    result["sources"] = {name: {k: v[k] for k in KEYS} for name, v in first.items()}
    result["dataset"] = next(iter(result["cases"]), None)
    prev = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    write_json(args.out, {**prev, **result})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
