"""Peak memory of a whole `rlsim pipeline` run, its process tree included -> bench/results/pipeline_memory.json.

    python bench/pipeline_memory.py [--config configs/ml-latest-small.yaml] [--data-dir DIR]
                                    [--modes cold warm] [--cache-dir DIR] [--stages ...] [--every 0.2]

The pipeline runs as a child process (`python -m rlsim.cli pipeline ...`); this process samples
/proc every ``--every`` seconds: the RSS of the driver and of every process under it (the private
Ray's gcs_server, raylet and workers, RLlib env runners, the persona pool's actors), summed. Shared
pages (libraries, Ray's object store) count once per process that maps them, so the sum is an upper
bound of what the tree needs, the number `top` or psutil would give when added up. The stage in
progress is the last stage of the run whose folder OUT/<stage>/ exists (the pipeline creates it when
the stage starts), so each sample is charged to one stage.

Modes: ``cold`` starts from an empty RLSIM_CACHE_DIR (the MiniLM vectors of every item text are
encoded during the run, the dataset's Parquet cache is rebuilt); ``warm`` reruns into a new OUT with
the cache the cold run left (or --cache-dir as it is). Each mode writes its entry of the JSON
(other modes' entries are kept): peak_tree_rss_mb, driver_peak_rss_mb, per-stage peaks, the
processes at the peak, wall time, the command line, the load average before and after, and
the metrics the run reported (so a memory change can be checked for unchanged results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for _child
from _child import descendants, proc_cmdline, proc_status  # noqa: E402

STAGE_ORDER = ["data", "baselines", "sweep", "reward", "candidates", "policy", "profiles", "personas", "evaluate"]


def _label(pid: int) -> str:
    """A short name for a process: Ray's workers name their task or actor in the command line."""
    cmd = proc_cmdline(pid).split("\0")
    head = " ".join(c for c in cmd[:3] if c)
    if "ray::" in head:
        return head.split()[0]
    return " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd[:2]) if c)[:60]


class TreeSampler(threading.Thread):
    """Sums VmRSS over a process and its descendants every ``every_s``; charges each sample to a stage."""

    def __init__(self, pid: int, out: Path, every_s: float):
        super().__init__(daemon=True)
        self.pid, self.out, self.every_s = pid, out, every_s
        self.stop_ev = threading.Event()
        self.peak = {"tree_rss_mb": 0.0}
        self.driver_peak = 0.0
        self.stages: dict[str, dict] = {}
        self.timeline: list[tuple[float, str, float]] = []
        self.t0 = time.monotonic()

    def stage(self) -> str:
        names = [s for s in STAGE_ORDER if (self.out / s).is_dir()]
        if not names:
            return "startup"
        if all((self.out / s / "metrics.json").is_file() for s in names) and (self.out / "metrics.json").is_file():
            return "report"
        return names[-1]

    def run(self) -> None:
        while not self.stop_ev.is_set():
            driver = proc_status(self.pid).get("VmRSS")
            if driver is None:
                break
            procs = {p: proc_status(p).get("VmRSS", 0.0) for p in descendants(self.pid)}
            total = driver + sum(procs.values())
            stage = self.stage()
            t = round(time.monotonic() - self.t0, 1)
            self.driver_peak = max(self.driver_peak, driver)
            st = self.stages.setdefault(stage, {"peak_tree_rss_mb": 0.0, "driver_peak_rss_mb": 0.0,
                                                "max_processes": 0, "first_s": t})
            st["driver_peak_rss_mb"] = max(st["driver_peak_rss_mb"], round(driver))
            st["max_processes"] = max(st["max_processes"], 1 + len(procs))
            st["last_s"] = t
            if total > st["peak_tree_rss_mb"]:
                st["peak_tree_rss_mb"] = round(total)
                st["at_s"] = t
            if total > self.peak["tree_rss_mb"]:
                top = sorted(procs.items(), key=lambda kv: -kv[1])[:8]
                self.peak = {"tree_rss_mb": total, "at_s": t, "stage": stage, "driver_rss_mb": round(driver),
                             "processes": 1 + len(procs),
                             "largest_others": [{"process": _label(p), "rss_mb": round(r)} for p, r in top]}
            if not self.timeline or t - self.timeline[-1][0] >= 2.0:
                self.timeline.append((t, stage, round(total)))
            self.stop_ev.wait(self.every_s)


def _numbers(d: dict, depth: int = 3) -> dict:
    """The numeric leaves of a metrics dict, three levels deep (lists and deeper tables left out)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)):
            out[k] = round(v, 4) if isinstance(v, float) else v
        elif isinstance(v, dict) and depth > 1:
            sub = _numbers(v, depth - 1)
            if sub:
                out[k] = sub
    return out


def _stage_results(out: Path) -> dict:
    """Each stage's numbers as the run reported them (to check that a memory change left results alone)."""
    p = out / "metrics.json"
    if not p.is_file():
        return {}
    return {name: _numbers(m) for name, m in json.loads(p.read_text())["stages"].items()}


def run_once(args, mode: str, cache_dir: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"rlsim-pipemem-{mode}-", dir=args.work))
    cmd = [sys.executable, "-m", "rlsim.cli", "pipeline", "--config", args.config, "--data-dir", args.data_dir,
           "--out", str(out)]
    if args.stages:
        cmd += ["--stages", ",".join(args.stages)]
    env = {**os.environ, "RLSIM_CACHE_DIR": str(cache_dir), "RLSIM_DATA_DIR": args.data_dir,
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    with open(out / "pipeline.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        smp = TreeSampler(proc.pid, out, args.every)
        smp.start()
        rc = proc.wait()
        smp.stop_ev.set()
        smp.join()
    wall = time.perf_counter() - t0
    res = {
        "rc": rc, "wall_seconds": round(wall, 1), "cache": mode, "cache_dir": str(cache_dir),
        "command": " ".join(["RLSIM_CACHE_DIR=" + str(cache_dir)] + cmd[:1] + cmd[1:]),
        "load_avg_before": load_before, "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "peak_tree_rss_mb": round(smp.peak["tree_rss_mb"]), "driver_peak_rss_mb": round(smp.driver_peak),
        "peak": {**smp.peak, "tree_rss_mb": round(smp.peak["tree_rss_mb"])},
        "stages": smp.stages, "results": _stage_results(out), "timeline": smp.timeline,
    }
    if rc != 0:
        res["log_tail"] = (out / "pipeline.log").read_text()[-2000:]
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    else:
        res["out"] = str(out)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/ml-latest-small.yaml")
    ap.add_argument("--data-dir", default=os.environ.get("RLSIM_DATA_DIR", str(ROOT.parent / "shared" / "datasets")))
    ap.add_argument("--modes", nargs="+", choices=["cold", "warm"], default=["cold", "warm"])
    ap.add_argument("--cache-dir", default=None, help="the cache a warm run uses as it is (default: the cold run's)")
    ap.add_argument("--stages", nargs="+", default=None)
    ap.add_argument("--every", type=float, default=0.2, help="seconds between samples")
    ap.add_argument("--work", default=None, help="folder for the runs' OUT (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep each run's OUT folder")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pipeline_memory.json"))
    args = ap.parse_args(argv)

    path = Path(args.out)
    doc = json.loads(path.read_text()) if path.is_file() else {}
    cache = Path(args.cache_dir) if args.cache_dir else None
    for mode in args.modes:
        if mode == "cold":
            cache = Path(tempfile.mkdtemp(prefix="rlsim-pipemem-cache-", dir=args.work))
        elif cache is None:
            ap.error("--modes warm needs --cache-dir (or a cold run before it)")
        res = run_once(args, mode, cache)
        print(f"{mode}: peak tree RSS {res['peak_tree_rss_mb']} MB in stage {res['peak'].get('stage')}, "
              f"driver {res['driver_peak_rss_mb']} MB, {res['wall_seconds']} s, rc {res['rc']}", flush=True)
        doc.setdefault("runs", {})[mode] = res
        doc.update({
            "what": "peak RSS summed over the `rlsim pipeline` process tree (driver + Ray daemons + workers), "
                    "sampled from /proc; per stage and overall; cold = empty RLSIM_CACHE_DIR",
            "units": {"*_mb": "MB (2^20 bytes) of resident memory", "*_s / *_seconds": "seconds"},
            "bench_command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "every_s": args.every,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
    if args.cache_dir is None and cache is not None and not args.keep:
        shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
