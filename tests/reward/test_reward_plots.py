"""rlsim.plots writes real PNGs."""

import numpy as np

from rlsim.plots import boxplot, grouped_boxplot


def test_boxplots(tmp_path):
    rng = np.random.default_rng(0)
    p = boxplot({"train": rng.random(20), "test": rng.random(15)}, "acc", "accuracy", tmp_path / "a" / "b.png")
    assert p.read_bytes()[:4] == b"\x89PNG"
    g = grouped_boxplot({"train": {"@3": rng.random(9), "@5": rng.random(9)},
                         "test": {"@3": rng.random(7), "@5": rng.random(7)}}, "ndcg", "NDCG", tmp_path / "n.png")
    assert g.stat().st_size > 1000
