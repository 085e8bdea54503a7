"""CPU cost of one reward-model training step, per rating, for variants of the reward settings ->
bench/results/reward_step.json.

    python bench/reward_step.py [--dataset ml-100k | synthetic-1m | synthetic-10m ...] [--batches 10] [--rounds 3]
                                [--set NAME:KEY=VALUE ...] [--variants NAME ...] [--out PATH] [--merge]

Every variant is built in this one process and timed round-robin (`rounds` x `batches` training
steps each, after 3 warm-up steps), by this process's CPU time (time.process_time), so that the ratios
hold on a machine shared with other work. Each variant reports the median round's microseconds of CPU
per training rating and its inverse, ratings per CPU second (one thread). Variants: `default` (the
library's RewardConfig), `torch_layers` (the default with torch's own nn.TransformerEncoderLayer and
nn.Dropout, the layers before rlsim.reward.layers), `joint` (the choice head) and any --set NAME.
Data: ML-100K u1 or a synthetic preset (temporal split), its training part less reward.val_frac.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also when imported from elsewhere

import torch  # noqa: E402
from torch import nn  # noqa: E402

import rlsim.reward.model as reward_model  # noqa: E402
from rlsim.config import DataConfig  # noqa: E402
from rlsim.data import holdout_validation  # noqa: E402
from rlsim.io import read_json, write_json  # noqa: E402
from rlsim.reward.config import RewardConfig  # noqa: E402
from rlsim.reward.features import build_features  # noqa: E402
from rlsim.reward.loop import tensors, train_step  # noqa: E402
from rlsim.reward.train import prepare  # noqa: E402
from _child import reward_settings  # noqa: E402

VARIANTS = {"default": {}, "torch_layers": {}, "joint": {"choice_weight": 1.0}}


def build(name: str, kw: dict, ft, fit_train, scale) -> dict:
    """A model of these settings in training mode, its tensors, optimiser and the epoch's batches."""
    cfg = RewardConfig(**kw).validate()
    saved = reward_model.EncoderLayer, reward_model.Dropout
    if name == "torch_layers":
        reward_model.EncoderLayer, reward_model.Dropout = nn.TransformerEncoderLayer, nn.Dropout
    try:
        torch.manual_seed(0)
        model = reward_model.VanillaTransformer(cfg, ft, scale.values).train()
    finally:
        reward_model.EncoderLayer, reward_model.Dropout = saved
    model.training_cache(keep=True)
    tr = tensors(ft, fit_train, scale, "cpu", cfg.choice_weight > 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(tr["y"]), generator=gen)
    rows = [perm[s:s + cfg.batch_size] for s in range(0, len(perm) - cfg.batch_size + 1, cfg.batch_size)]
    return {"model": model, "tr": tr, "opt": opt, "sched": sched, "gen": gen, "rows": rows, "cfg": cfg, "us": []}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--data-dir", default=os.environ.get("RLSIM_DATA_DIR", str(REPO.parent / "shared" / "datasets")))
    p.add_argument("--cache-dir", default=os.environ.get("RLSIM_CACHE_DIR", str(REPO / ".cache")))
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--set", nargs="*", default=[], help="NAME:KEY=VALUE: a variant's reward setting")
    p.add_argument("--variants", nargs="*", help="names to time (default: default, torch_layers, joint and every --set)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "reward_step.json"))
    p.add_argument("--merge", action="store_true", help="keep the other datasets of an existing --out")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    variants = {**VARIANTS, **reward_settings(args.set)}
    names = args.variants or list(variants)
    u1 = args.dataset == "ml-100k"
    dcfg = DataConfig(dataset=args.dataset, split="u1" if u1 else "temporal", data_dir=args.data_dir,
                      cache_dir=args.cache_dir, download=False)
    ds, split, text = prepare(dcfg)
    fit_train, _ = holdout_validation(split.train, RewardConfig().val_frac, RewardConfig().seed)
    ft = build_features(ds.items, ds.users, fit_train, text)
    state = {n: build(n, variants[n], ft, fit_train, ds.scale) for n in names}
    for s in state.values():  # warm-up: allocator, first-step costs
        for b in s["rows"][:3]:
            train_step(s["model"], s["opt"], s["sched"], s["tr"], b, s["cfg"], s["gen"])
    pos = 3
    for _ in range(args.rounds):
        for s in state.values():
            rows = [s["rows"][(pos + i) % len(s["rows"])] for i in range(args.batches)]
            c0 = time.process_time()
            for b in rows:
                train_step(s["model"], s["opt"], s["sched"], s["tr"], b, s["cfg"], s["gen"])
            s["us"].append((time.process_time() - c0) / sum(len(b) for b in rows) * 1e6)
        pos += args.batches
    result = {}
    for n, s in state.items():
        median = sorted(s["us"])[len(s["us"]) // 2]
        result[n] = {"settings": variants[n], "cpu_us_per_rating": round(median, 1),
                     "ratings_per_cpu_s": round(1e6 / median), "rounds_us": [round(u, 1) for u in s["us"]]}
    base = result.get("default")
    for r in result.values():
        if base:
            r["vs_default"] = round(base["cpu_us_per_rating"] / r["cpu_us_per_rating"], 3)
    out = read_json(args.out) if args.merge and Path(args.out).is_file() else {}
    out.setdefault("datasets", {})[args.dataset] = {
        "training_pairs": len(fit_train), "users": ft.n_users, "items": ft.n_items, "variants": result,
        "command": "python bench/reward_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "wall_seconds": round(time.perf_counter() - t0, 1), "loadavg": list(os.getloadavg())}
    out.update(machine=platform.machine(), cores=os.cpu_count(), torch=torch.__version__, torch_threads=1,
               note="vs_default: the default's CPU per rating over the variant's (> 1: the variant is cheaper)")
    write_json(args.out, out)
    for n, r in result.items():
        print(f"{args.dataset} {n}: {r['cpu_us_per_rating']} us/rating, {r['ratings_per_cpu_s']} ratings/CPU s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
