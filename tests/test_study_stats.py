"""The study's statistics on synthetic [seed, user] outcomes whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from rlsim import study_stats
from rlsim.errors import ConfigError
from rlsim.study_stats import (beats_both, bootstrap_indices, holm, paired_spearman, paired_vs, point,
                               replicate_means, summarize)


def _outcomes(seed=0, S=5, U=120):
    """Hits where the seed matters a lot (a hard or easy held-out draw), shared by every source."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(0.05, 0.6, S)[:, None]
    u = rng.uniform(0, 1, (S, U))
    pop = (u < level).astype(float)
    return {"popularity": pop,
            "same": pop.copy(),
            # Clearly better: the same hits plus 30% of each seed's misses turned into hits.
            "better": np.maximum(pop, (rng.uniform(0, 1, (S, U)) < 0.3).astype(float)),
            "worse": pop * (rng.uniform(0, 1, (S, U)) < 0.5)}


def test_clearly_better_is_above_zero_identical_covers_zero_and_all_are_reported():
    o = _outcomes()
    idx = bootstrap_indices(5, 120, 1000, seed=1)
    r = paired_vs(o, "popularity", ["same", "better", "worse"], idx)
    assert set(r) == {"same", "better", "worse"}  # every source, no best-of selection
    assert r["better"]["ci95"][0] > 0 and r["better"]["verdict"] == "better" and r["better"]["p_holm"] < 0.05
    assert r["worse"]["ci95"][1] < 0 and r["worse"]["verdict"] == "worse"
    assert r["same"]["ci95"] == [0.0, 0.0] and r["same"]["p"] == 1.0
    assert r["same"]["verdict"] == "no detectable difference"
    assert r["better"]["mean"] == pytest.approx(point(o["better"]) - point(o["popularity"]))
    assert r["better"]["n_users"] == 120 and r["better"]["n_seeds"] == 5
    # Deterministic given the seed.
    again = paired_vs(o, "popularity", ["same", "better", "worse"], bootstrap_indices(5, 120, 1000, seed=1))
    assert again == r


def test_holm_by_hand_order_and_monotonicity():
    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None})
    # sorted: a 0.01*3 = 0.03, c 0.03*2 = 0.06, b max(0.06, 0.04*1) = 0.06
    assert adj["d"] is None
    assert adj["a"] == pytest.approx(0.03) and adj["c"] == pytest.approx(0.06) and adj["b"] == pytest.approx(0.06)
    assert holm({"x": 0.6, "y": 0.5}) == {"x": 1.0, "y": 1.0}
    rng = np.random.default_rng(0)
    p = {str(i): float(v) for i, v in enumerate(rng.uniform(0, 0.2, 8))}
    a = holm(p)
    order = sorted(p, key=p.get)
    assert all(a[n] >= p[n] for n in p)  # never below the raw p
    assert all(a[order[i]] <= a[order[i + 1]] for i in range(len(order) - 1))  # monotone in the raw order


def _independent_seed_spearman(fid, per_seed, n_boot, seed=0):
    """The old interval: each source's per-seed means resampled on their own (unpaired)."""
    from rlsim.metrics import spearman

    names = list(per_seed)
    x = np.array([fid[n] for n in names])
    rng = np.random.default_rng(seed)
    boots = [spearman(x, np.array([np.mean(rng.choice(per_seed[n], len(per_seed[n]))) for n in names]))
             for _ in range(n_boot)]
    boots = [b for b in boots if np.isfinite(b)]
    return [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]


def test_paired_resampling_sees_what_independent_seed_resampling_cannot():
    # Three sources on the same users: each better than the last by a small constant on every
    # user, while the held-out draw of a seed moves every source's hit rate by far more.
    rng = np.random.default_rng(3)
    level = rng.uniform(0.1, 0.7, 5)[:, None]
    u = rng.uniform(0, 1, (5, 150))
    o = {n: (u < level + d).astype(float) for n, d in (("low", 0.0), ("mid", 0.03), ("high", 0.06))}
    fid = {"low": 1.0, "mid": 2.0, "high": 3.0}
    idx = bootstrap_indices(5, 150, 1000, seed=0)
    r = paired_spearman(fid, o, idx)
    assert r["spearman"] == pytest.approx(1.0) and r["ci95"] == [1.0, 1.0]
    old = _independent_seed_spearman(fid, {n: list(v.mean(1)) for n, v in o.items()}, 1000)
    assert old[0] < 0  # the seed-to-seed spread swamps a difference every user shows
    # The same for the difference from a baseline: the paired interval excludes 0.
    d = paired_vs(o, "low", ["mid"], idx)["mid"]
    assert d["ci95"][0] > 0
    per_seed = {n: v.mean(1) for n, v in o.items()}
    unpaired = [np.mean(rng.choice(per_seed["mid"], 5)) - np.mean(rng.choice(per_seed["low"], 5)) for _ in range(1000)]
    assert np.percentile(unpaired, 2.5) < 0 < np.percentile(unpaired, 97.5)


def test_two_levels_nan_users_and_denominators(monkeypatch):
    # Seeds resampled: one seed at 1.0 and one at 0.0, users constant within a seed -> the
    # replicate means are 0, 0.5 or 1 (a user-only bootstrap would always give 0.5).
    x = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    b = replicate_means(x, bootstrap_indices(2, 3, 400, seed=0))
    assert set(np.round(b, 6)) == {0.0, 0.5, 1.0}
    # A NaN user (e.g. no held-out-rated candidate for NDCG) is left out of its seed's mean.
    y = np.array([[1.0, np.nan, 0.0], [0.5, 0.5, np.nan]])
    assert point(y) == pytest.approx(0.5)
    s = summarize(y, bootstrap_indices(2, 3, 200, seed=0))
    assert s["n_users"] == 2 and s["n_seeds"] == 2 and s["ci95"][0] <= 0.5 <= s["ci95"][1]
    # Chunked replicates (bounded memory) give the same numbers as one gather.
    z = np.random.default_rng(1).uniform(size=(4, 50))
    idx = bootstrap_indices(4, 50, 300, seed=2)
    whole = np.nanmean(np.nanmean(z[idx[0][:, :, None], idx[1]], axis=2), axis=1)
    monkeypatch.setattr(study_stats, "_CHUNK", 450)  # 2 replicates per chunk
    assert np.array_equal(replicate_means(z, idx), whole)
    with pytest.raises(ConfigError, match="do not match"):
        replicate_means(np.zeros((3, 3)), bootstrap_indices(2, 3, 10))
    with pytest.raises(ConfigError, match="seed, user"):
        summarize(np.zeros(4), bootstrap_indices(1, 4, 10))


def test_hybrid_counts_as_better_only_when_it_beats_both_ends():
    o = _outcomes(seed=5)
    idx = bootstrap_indices(5, 120, 1000, seed=2)
    assert beats_both(o, "better", ["popularity", "worse"], idx)["better"] is True
    # Beats one end ("worse") but only equals the other ("same"): not better.
    r = beats_both(o, "popularity", ["same", "worse"], idx)
    assert r["better"] is False and r["vs"]["same"]["ci95"] == [0.0, 0.0] and r["vs"]["worse"]["ci95"][0] > 0
    assert beats_both(o, "better", ["persona_only"], idx)["better"] is None
