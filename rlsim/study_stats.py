"""Statistics of the sim-to-real study: a two-level paired bootstrap over seeds and held-out users.

Every outcome is an array [seed, user]: one value per held-out user of each seed (hit 0/1, watched
0/1, the slate's NDCG, or an expectation for random), the SAME users in a row for every source and
reference (a seed draws its held-out users once). One bootstrap replicate resamples the seeds with
replacement, then the users within each resampled seed; the same indices serve every source, so a
difference between two sources is paired user by user and seed by seed. The statistic of a
replicate is the mean over its seeds of the per-seed mean over its users (NaN users, e.g. an NDCG
with no held-out-rated candidate, are left out of that seed's mean).

p-values are bootstrap p-values: twice the smaller share of replicates on either side of zero (with
the usual +1 so none is 0), which is below 0.05 exactly when zero lies outside the percentile
interval; a family of comparisons is Holm-corrected. Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np

from rlsim.errors import ConfigError


@contextmanager
def _quiet():
    """nanmean of an all-NaN slice warns; here that slice simply has no defined user."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


_CHUNK = 4_000_000  # gathered values per chunk of replicates (32 MB of float64)


def _n_users(x: np.ndarray) -> int | list[int]:
    """Users per seed with a defined value: one number when every seed has the same."""
    n = np.sum(np.isfinite(x), axis=1)
    return int(n[0]) if (n == n[0]).all() else [int(v) for v in n]


def _stack(x) -> np.ndarray:
    a = np.asarray(x, float)
    if a.ndim != 2 or not a.size:
        raise ConfigError(f"study outcomes must be a non-empty [seed, user] array, got shape {a.shape}")
    return a


def bootstrap_indices(n_seeds: int, n_users: int, n_boot: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(seed indices [B, S], user indices [B, S, U]): seeds resampled, then users within each."""
    if n_boot < 1:
        raise ConfigError(f"bootstrap needs at least one replicate, got {n_boot}")
    rng = np.random.default_rng(seed)
    s = rng.integers(0, n_seeds, (n_boot, n_seeds))
    u = rng.integers(0, n_users, (n_boot, n_seeds, n_users), dtype=np.int32)
    return s, u


def replicate_means(x, idx: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """[B] bootstrap statistic of one outcome array [S, U] under the shared indices."""
    x = _stack(x)
    s, u = idx
    if s.shape[1] != x.shape[0] or u.shape[2] != x.shape[1]:
        raise ConfigError(f"outcomes of shape {x.shape} do not match the bootstrap's {s.shape[1]} seeds x "
                          f"{u.shape[2]} users")
    out = np.empty(len(s))
    step = max(1, _CHUNK // max(1, x.size))  # replicates per chunk: bounded memory on big held-out sets
    with _quiet():
        for a in range(0, len(s), step):
            b = x[s[a:a + step, :, None], u[a:a + step]]  # [chunk, S, U]
            out[a:a + step] = np.nanmean(np.nanmean(b, axis=2), axis=1)
    return out


def point(x) -> float:
    """The statistic on the data itself: mean over seeds of each seed's mean over defined users."""
    x = _stack(x)
    with _quiet():
        return float(np.nanmean(np.nanmean(x, axis=1)))


def _interval(boots: np.ndarray, alpha: float) -> list[float] | None:
    ok = boots[np.isfinite(boots)]
    if not len(ok):
        return None
    return [float(np.percentile(ok, 100 * alpha / 2)), float(np.percentile(ok, 100 * (1 - alpha / 2)))]


def boot_p(boots: np.ndarray) -> float | None:
    """Two-sided bootstrap p-value of 'the difference is zero'."""
    ok = boots[np.isfinite(boots)]
    if not len(ok):
        return None
    below, above = (np.sum(ok <= 0) + 1) / (len(ok) + 1), (np.sum(ok >= 0) + 1) / (len(ok) + 1)
    return float(min(1.0, 2 * min(below, above)))


def holm(pvals: dict[str, float | None]) -> dict[str, float | None]:
    """Holm step-down adjusted p-values of one family (None stays None and is not counted)."""
    named = sorted(((p, n) for n, p in pvals.items() if p is not None), key=lambda t: t[0])
    m, out, running = len(named), {n: None for n in pvals}, 0.0
    for i, (p, n) in enumerate(named):
        running = max(running, min(1.0, (m - i) * p))
        out[n] = running
    return out


def summarize(x, idx, alpha: float = 0.05) -> dict:
    """Mean with its bootstrap interval and its denominator (users per seed with a defined value)."""
    x = _stack(x)
    return {"mean": _none(point(x)), "ci95": _interval(replicate_means(x, idx), alpha), "n_users": _n_users(x),
            "n_seeds": int(x.shape[0])}


def _none(v: float) -> float | None:
    return v if np.isfinite(v) else None


def paired_diff(a, b, idx, alpha: float = 0.05) -> dict:
    """a minus b, paired user by user: mean, percentile interval, raw bootstrap p, denominator."""
    d = _stack(a) - _stack(b)
    boots = replicate_means(d, idx)
    return {"mean": _none(point(d)), "ci95": _interval(boots, alpha), "p": boot_p(boots),
            "n_users": _n_users(d), "n_seeds": int(d.shape[0])}


def _verdict(row: dict, alpha: float) -> str:
    p, c = row["p_holm"], row["ci95"]
    if p is None or c is None:
        return "undetermined"
    return "better" if p < alpha and c[0] > 0 else "worse" if p < alpha and c[1] < 0 else "no detectable difference"


def paired_vs(outcomes: dict[str, np.ndarray], base: str, names: list[str], idx, alpha: float = 0.05) -> dict:
    """Each name's paired difference from ``base`` (name minus base) with its interval, raw p and
    Holm-adjusted p over ``names`` (one family). No name is selected: all are reported."""
    if base not in outcomes:
        raise ConfigError(f"no outcomes for the comparison's base {base!r}")
    rows = {n: paired_diff(outcomes[n], outcomes[base], idx, alpha) for n in names}
    for n, p in holm({n: r["p"] for n, r in rows.items()}).items():
        rows[n]["p_holm"] = p
        rows[n]["verdict"] = _verdict(rows[n], alpha)
    return rows


def paired_spearman(fid: dict[str, float], outcomes: dict[str, np.ndarray], idx, alpha: float = 0.05) -> dict:
    """Spearman across sources between fidelity and the mean outcome, its interval from the same
    paired resampling (every source's mean in a replicate uses the same seeds and users)."""
    from rlsim.metrics import spearman

    names = [n for n in outcomes if fid.get(n) is not None and np.isfinite(fid[n])]
    if len(names) < 3:
        return {"spearman": None, "ci95": None, "sources": names, "note": "needs at least 3 sources"}
    x = np.array([fid[n] for n in names], float)
    y = np.array([point(outcomes[n]) for n in names])
    means = np.stack([replicate_means(outcomes[n], idx) for n in names], 1)  # [B, sources]
    boots = np.array([spearman(x, row) for row in means])
    rho = spearman(x, y)
    return {"spearman": _none(rho), "ci95": _interval(boots, alpha), "sources": names,
            "replicates_defined": int(np.isfinite(boots).sum()), "replicates": int(len(boots))}


def beats_both(outcomes: dict[str, np.ndarray], name: str, ends: list[str], idx, alpha: float = 0.05) -> dict:
    """Does ``name`` beat every one of ``ends`` (e.g. persona-only and reward-model-only)? Better
    only when each paired interval lies above 0 after Holm across the ends."""
    if name not in outcomes or any(e not in outcomes for e in ends):
        return {"better": None, "note": "missing " + ", ".join(n for n in [name, *ends] if n not in outcomes)}
    vs = {e: paired_diff(outcomes[name], outcomes[e], idx, alpha) for e in ends}
    for e, p in holm({e: v["p"] for e, v in vs.items()}).items():
        vs[e]["p_holm"] = p
    better = all(v["ci95"] is not None and v["ci95"][0] > 0 and v["p_holm"] is not None and v["p_holm"] < alpha
                 for v in vs.values())
    return {"better": bool(better), "vs": vs}
