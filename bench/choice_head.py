"""The reward model's choice head on ML-100K u1: what it costs per epoch, and how well it chooses on
the validation slice -> bench/results/choice_head.json.

    python bench/choice_head.py [--timing-batches 30] [--rounds 3] [--train NAME ...] [--set NAME:KEY=VALUE ...]

`timing`: seconds per training batch of the reward model without a head, with the "joint" head
(3 negatives per pick, each through the whole transformer: the head as first built) and with the
"dot" head (one shared pool of random movies per batch), measured round-robin in this one process
(`rounds` x `timing-batches` batches each, after a warm-up), so the ratios hold under the shared
machine's load; `epoch_seconds` extrapolates a batch to the whole epoch of the training pairs.
`validation`: each --train variant trained in full on the reward config's training part of u1's
training ratings, its validation RMSE, and its choice fidelity on the validation slice (one held-back
rated movie among 1/3/9 never-rated ones, rlsim.simulators.choice_fidelity): the numbers settings are
chosen by. u1's test ratings are never read here (bench/choice.py measures the chosen checkpoint).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/

import torch  # noqa: E402

from rlsim.config import DataConfig  # noqa: E402
from rlsim.data import holdout_validation  # noqa: E402
from rlsim.io import read_json, write_json  # noqa: E402
from rlsim.reward.config import RewardConfig  # noqa: E402
from rlsim.reward.features import build_features  # noqa: E402
from rlsim.reward.loop import fit_one, steps_per_epoch, train_step  # noqa: E402
from rlsim.reward.train import prepare  # noqa: E402
from _child import reward_settings  # noqa: E402
from reward_step import build  # noqa: E402

VARIANTS = {"no_head": {}, "joint": {"choice_weight": 1.0, "choice_scorer": "joint"},
            "dot": {"choice_weight": 1.0, "choice_scorer": "dot"}}


def timing(ft, fit_train, scale, variants: dict, batches: int, rounds: int) -> dict:
    cfgs = {n: RewardConfig(**kw) for n, kw in variants.items()}
    state = {}
    for name, kw in variants.items():
        s = build(name, kw, ft, fit_train, scale)
        state[name] = (s["model"], s["tr"], s["opt"], s["sched"], s["gen"], s["rows"], [])
        for b in s["rows"][:3]:  # warm-up: allocator, first-step costs
            train_step(s["model"], s["opt"], s["sched"], s["tr"], b, s["cfg"], s["gen"])
    pos = 3
    for _ in range(rounds):
        for name, cfg in cfgs.items():
            model, tr, opt, sched, gen, rows, secs = state[name]
            t0 = time.perf_counter()
            for b in rows[pos:pos + batches]:
                train_step(model, opt, sched, tr, b, cfg, gen)
            secs.append((time.perf_counter() - t0) / batches)
        pos += batches
    n_batches = steps_per_epoch(len(fit_train), RewardConfig())[0]
    out = {}
    for name in cfgs:
        per_batch = sorted(state[name][-1])[len(state[name][-1]) // 2]  # the median round
        choice = {k: v for k, v in vars(cfgs[name]).items() if k.startswith("choice_")}
        out[name] = {"config": choice, "seconds_per_batch": per_batch,
                     "epoch_seconds": per_batch * n_batches, "rounds": state[name][-1]}
    for name in cfgs:
        out[name]["vs_no_head"] = out[name]["seconds_per_batch"] / out["no_head"]["seconds_per_batch"]
    return out


def validate_variant(ds, ft, fit_train, val, kw: dict) -> dict:
    from rlsim.reward.predict import RewardPredictor
    from rlsim.simulators.choice_fidelity import choice_fidelity

    cfg = RewardConfig(**kw).validate()
    t0 = time.perf_counter()
    model, history = fit_one(ft, fit_train, val, ds.scale, cfg, cfg.seed)
    best = min(history, key=lambda r: r["val_rmse"])
    pred = RewardPredictor([model], ft, ds.scale, cfg)
    s = choice_fidelity(pred.choice_proba, fit_train, val)["summary"]
    return {"config": {k: v for k, v in vars(cfg).items() if k.startswith("choice_")}, "val_rmse": best["val_rmse"],
            "best_epoch": best["epoch"], "epochs_run": len(history),
            "train_seconds_per_epoch": sum(h["train_seconds"] for h in history) / len(history),
            "wall_seconds": time.perf_counter() - t0, "val_choice": s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("RLSIM_DATA_DIR", str(REPO.parent / "shared" / "datasets")))
    p.add_argument("--cache-dir", default=os.environ.get("RLSIM_CACHE_DIR", str(REPO / ".cache")))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "choice_head.json"))
    p.add_argument("--timing-batches", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--timing", nargs="*", default=[], help="more variants to time (names of --set)")
    p.add_argument("--train", nargs="*", default=[], help="variants to train and validate (names of VARIANTS or --set)")
    p.add_argument("--set", nargs="*", default=[], help="NAME:KEY=VALUE: a variant's reward setting")
    p.add_argument("--merge", action="store_true", help="keep the other entries of an existing --out")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    variants = {k: dict(v) for k, v in VARIANTS.items()}
    for name, kw in reward_settings(args.set).items():
        variants[name] = {**variants.get(name, VARIANTS["dot"]), **kw}
    dcfg = DataConfig(dataset="ml-100k", split="u1", data_dir=args.data_dir, cache_dir=args.cache_dir, download=False)
    ds, split, text = prepare(dcfg)
    fit_train, val = holdout_validation(split.train, RewardConfig().val_frac, RewardConfig().seed)
    ft = build_features(ds.items, ds.users, fit_train, text)
    out = read_json(args.out) if args.merge and Path(args.out).is_file() else {}
    out["dataset"] = "ml-100k/u1 training ratings (validation slice: reward.val_frac)"
    if not args.no_timing:
        timed = {n: variants[n] for n in [*VARIANTS, *args.timing]}
        out["timing"] = {**timing(ft, fit_train, ds.scale, timed, args.timing_batches, args.rounds),
                         "loadavg_after": list(os.getloadavg())}
        print({k: round(v["epoch_seconds"], 1) for k, v in out["timing"].items() if isinstance(v, dict)}, flush=True)
    val_out = out.setdefault("validation", {})
    if (args.train or val_out) and "references" not in val_out:
        from rlsim.simulators.choice import CHOICE_MODELS
        from rlsim.simulators.choice_fidelity import choice_fidelity

        # The same trials for models fitted on the same training part: the numbers to beat.
        val_out["references"] = {name: choice_fidelity(CHOICE_MODELS[name](seed=0).fit(fit_train).probability,
                                                       fit_train, val)["summary"] for name in ("popularity", "bpr")}
        print("references", val_out["references"], flush=True)
    for name in args.train:
        val_out[name] = {**validate_variant(ds, ft, fit_train, val, variants[name]), "loadavg": list(os.getloadavg())}
        print(name, {k: val_out[name][k] for k in ("val_rmse", "train_seconds_per_epoch")},
              val_out[name]["val_choice"], flush=True)
    command = "python bench/choice_head.py " + " ".join(argv if argv is not None else sys.argv[1:])
    run = {"command": command, "wall_seconds": round(time.perf_counter() - t0, 1), "loadavg": list(os.getloadavg())}
    # With --merge, every run that wrote a part of this file is listed.
    earlier = out.get("runs") or ([{k: out[k] for k in ("command", "wall_seconds", "loadavg")}]
                                  if "command" in out else [])
    out.update(command=command, runs=earlier + [run], wall_seconds=run["wall_seconds"],
               loadavg=run["loadavg"], machine=platform.machine(), cores=os.cpu_count(),
               torch_threads=torch.get_num_threads())
    write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
