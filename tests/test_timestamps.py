"""A dataset without timestamps: the temporal split is refused in one line, the session replays are off."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from rlsim.data.schema import NO_TIMESTAMPS, has_timestamps
from rlsim.data.splits import make_split
from rlsim.errors import DataError


def _flat(ds):
    return replace(ds, ratings=ds.ratings.assign(timestamp=0))


def test_has_timestamps(ml100k):
    assert has_timestamps(ml100k.ratings)
    assert not has_timestamps(_flat(ml100k).ratings)
    # One timestamp per user is no order either; a single user with two is.
    r = pd.DataFrame({"user_id": [1, 2], "item_id": [1, 1], "rating": [4.0, 3.0], "timestamp": [5, 9]})
    assert not has_timestamps(r)
    assert has_timestamps(pd.concat([r, r.assign(item_id=2, timestamp=[6, 9])]))


def test_temporal_split_refused_without_timestamps(ml100k):
    make_split(ml100k, "temporal")  # fine with them
    with pytest.raises(DataError, match="split 'temporal' needs timestamps.*--split random") as e:
        make_split(_flat(ml100k), "temporal")
    assert "\n" not in str(e.value)
    assert len(make_split(_flat(ml100k), "random").test)  # the random split needs no time


def test_session_replays_off_without_timestamps(ml100k):
    from rlsim.simulators.choice import PopularityChoice
    from rlsim.simulators.choice_fidelity import choice_session_gain
    from rlsim.simulators.factory import SimulatorSpec, local_simulator
    from rlsim.simulators.fidelity import fidelity, session_gain

    split = make_split(_flat(ml100k), "random")
    sim = local_simulator(SimulatorSpec("bias"), ml100k, split.train, seed=0)
    se = session_gain(sim, split.test)
    assert se["session_nll_gain"] is None and se["note"] == NO_TIMESTAMPS
    assert fidelity(sim, split.train, split.test)["session_nll_gain"] is None
    model = PopularityChoice(seed=0).fit(split.train)
    cs = choice_session_gain(model.probability, split.train, split.test)
    assert cs["auc_gain"] is None and cs["note"] == NO_TIMESTAMPS
    # With timestamps the same calls measure a gain.
    timed = make_split(ml100k, "random")
    assert np.isfinite(session_gain(local_simulator(SimulatorSpec("bias"), ml100k, timed.train, seed=0),
                                    timed.test)["session_nll_gain"])


def _flat_ml100k(root):
    """An ml-100k fixture folder whose ratings all carry timestamp 0."""
    from tests.fixtures import write_ml100k

    folder = write_ml100k(root, folds=False)
    lines = (folder / "u.data").read_text().splitlines()
    (folder / "u.data").write_text("".join("\t".join(x.split("\t")[:3] + ["0"]) + "\n" for x in lines))
    return root


def test_the_cli_says_it_in_one_line(tmp_path, capsys):
    """End to end through `rlsim pipeline`: the temporal split is refused (exit 2, one line); on the
    random split the run goes on, its fidelity has no session gain, and the CLI prints one note."""
    import json

    import yaml

    from rlsim.cli import main

    data = _flat_ml100k(tmp_path / "data")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"dataset": "ml-100k", "download": False},
                                   "pipeline": {"stages": ["data", "baselines", "evaluate"], "fidelity": ["bias"]}}))
    common = ["pipeline", "--config", str(cfg), "--data-dir", str(data), "--cache-dir", str(tmp_path / "cache"),
              "--quiet"]
    assert main(common + ["--split", "temporal", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "split 'temporal' needs timestamps" in err[0]
    assert main(common + ["--split", "random", "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert err.count(f"note: {NO_TIMESTAMPS}") == 1
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["stages"]["evaluate"]["fidelity"]["bias"]["session_nll_gain"] is None
