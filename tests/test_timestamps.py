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
