"""bench/cluster.py's ratings accounting: every planned pair counts, also those of a user absent from the output."""

from __future__ import annotations

import pandas as pd

from bench.cluster import rating_accounting
from rlsim.personas.stages_common import sample_users


def test_a_user_missing_from_the_output_is_lost():
    test = pd.DataFrame({"user_id": [1, 1, 2, 2, 3, 3, 4], "item_id": [10, 11, 10, 12, 13, 14, 15]})
    chosen = sample_users(test["user_id"], 3, seed=0)
    planned = test[test["user_id"].isin(chosen)]
    gone = int(chosen[0])  # a user whose every rating died with the node: no row in the output at all
    out = planned[planned["user_id"] != gone]
    out = pd.concat([out, out.iloc[:1]])  # and one pair written twice
    acc = rating_accounting(test, out, 3, seed=0)
    assert acc["planned"] == len(planned) and acc["users_planned"] == 3
    assert acc["lost_ratings"] == int((planned["user_id"] == gone).sum()) > 0
    assert acc["duplicated_ratings"] == 1 and acc["users_missing"] == 1 and acc["unplanned_ratings"] == 0


def test_every_user_when_the_job_rated_all():
    test = pd.DataFrame({"user_id": [1, 2, 2], "item_id": [10, 10, 12]})
    acc = rating_accounting(test, test.iloc[1:], None)
    assert acc == {"planned": 3, "lost_ratings": 1, "duplicated_ratings": 0, "users_planned": 2,
                   "users_missing": 1, "unplanned_ratings": 0}
