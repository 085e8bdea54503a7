"""Item-text encoding speed and agreement of the text backends -> bench/results/embeddings.json.

    python bench/embeddings.py [--texts 500] [--rounds 2] [--backends torch torch-bf16 openvino onnx-int8]

A fixed random sample of ml-latest-small's distinct item texts (genre, plot and full text) is
encoded by each backend through rlsim.embeddings.TextEncoder (no cache, one thread), the backends
interleaved over --rounds so a busy machine slows them alike; texts/s is the mean over rounds
and agreement the cosine to the float32 torch vectors. "previous" is the path before the
backends (float32, batches of 64): speedup_vs_previous is the speed-up at the item-text level. Backends that are not installed are
skipped (openvino: pip install 'rlsim[openvino]'; onnx-int8: 'rlsim[onnx]').
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texts", type=int, default=500)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--backends", nargs="+", default=["torch", "torch-bf16", "openvino", "onnx-int8"])
    p.add_argument("--data-dir", default=os.environ.get("RLSIM_DATA_DIR", "/work/shared/datasets"))
    p.add_argument("--cache-dir", default=os.environ.get("RLSIM_CACHE_DIR", "/tmp/rlsim-emb-bench"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "embeddings.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    from rlsim.data import load_movielens
    from rlsim.data.text import item_texts
    from rlsim.embeddings import TextEncoder, cpu_has_native_bf16, resolve_backend

    torch.set_num_threads(1)
    need = {"openvino": "openvino", "onnx-int8": "onnxruntime"}
    backends = [b for b in args.backends if b not in need or importlib.util.find_spec(need[b]) is not None]
    ds = load_movielens("ml-latest-small", data_dir=args.data_dir, cache_dir=args.cache_dir, download=False)
    t = item_texts(ds.items)
    distinct = list(dict.fromkeys(t.genre_text.tolist() + t.plot_text.tolist() + t.text.tolist()))
    rng = np.random.default_rng(0)
    sample = [distinct[j] for j in rng.choice(len(distinct), min(args.texts, len(distinct)), replace=False)]
    # Exported models (openvino, onnx) are built once into the cache, outside the timing.
    encoders = {}
    # "previous": the path before this change (float32, batches of 64), the speed-up's reference.
    backends = ["previous"] + backends
    for b in backends:
        enc = TextEncoder(cache_dir=args.cache_dir, backend="torch", batch_size=64) if b == "previous" else \
            TextEncoder(cache_dir=args.cache_dir, backend=b)
        enc._encode_batch(sample[:8])
        encoders[b] = enc
    speeds = {b: [] for b in backends}
    vecs = {}
    for _ in range(args.rounds):
        for b in backends:
            t0 = time.perf_counter()
            vecs[b] = encoders[b]._encode_batch(sample)
            speeds[b].append(len(sample) / (time.perf_counter() - t0))
    ref = vecs.get("torch")
    res = {}
    for b in backends:
        r = {"texts_per_s": round(float(np.mean(speeds[b])), 1), "rounds": [round(x, 1) for x in speeds[b]]}
        if ref is not None:
            cos = (vecs[b] * ref).sum(1)
            r.update(cos_mean=round(float(cos.mean()), 5), cos_min=round(float(cos.min()), 4))
            r["speedup_vs_previous"] = round(r["texts_per_s"] / np.mean(speeds["previous"]), 2)
        res[b] = r
        print(b, json.dumps(r), flush=True)
    out = {"backends": res, "texts": len(sample), "distinct_item_texts": len(distinct),
           "items": len(ds.items), "auto_backend": resolve_backend(None), "native_bf16": cpu_has_native_bf16(),
           "threads": 1, "load_avg_1m": round(os.getloadavg()[0], 2)}
    from rlsim.io import write_json

    write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
