"""The env runner's two connector pipelines for SessionVectorEnv, one piece each instead of RLlib's defaults.

RLlib's default env-to-module pipeline adds each episode's last observation to the batch one item at
a time (keyed by episode), checks for a time rank and RNN state, batches the items and converts them
to tensors; its module-to-env pipeline samples the actions, converts to numpy, unbatches every column
into per-episode items (dm-tree), removes a time rank, unsquashes/clips actions and lists them again
per env: 5 + 6 connector calls, each timed into the metrics, on every step. For this env (a single
agent, a flat float32 Box observation, Discrete actions) and this module (no RNN state) each pipeline
is one step: stack the observations; sample the actions and hand out numpy rows. The same actions are
drawn (the module's own action distribution class, as RLlib's GetActions uses it) and the same
columns reach the episodes. build_ppo_config turns RLlib's defaults off and puts these in their place.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns


class StackObservations(ConnectorV2):
    """Env to module: the last observation of every episode (env order), one [N, obs] float32 tensor."""

    def __init__(self, input_observation_space=None, input_action_space=None, *, device=None, **kwargs):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.device = device

    def __call__(self, *, rl_module, batch: dict[str, Any], episodes, explore=None, shared_data=None, **kwargs):
        if Columns.OBS not in batch:
            obs = torch.from_numpy(np.stack([e.get_observations(-1) for e in episodes]))
            batch[Columns.OBS] = obs if self.device is None else obs.to(self.device)
        return batch


class ActionsToEnv(ConnectorV2):
    """Module to env: actions drawn from the module's action distribution (the argmax when not exploring)
    with their log-probabilities, as RLlib's GetActions does; every column to numpy, rows by env."""

    def __call__(self, *, rl_module, batch: dict[str, Any], episodes, explore=None, shared_data=None, **kwargs):
        if Columns.ACTIONS not in batch:
            cls = rl_module.get_exploration_action_dist_cls() if explore else rl_module.get_inference_action_dist_cls()
            dist = cls.from_logits(batch[Columns.ACTION_DIST_INPUTS])
            if not explore:
                dist = dist.to_deterministic()
            batch[Columns.ACTIONS] = dist.sample()
            if Columns.ACTION_LOGP not in batch:
                batch[Columns.ACTION_LOGP] = dist.logp(batch[Columns.ACTIONS])
        # Numpy arrays indexed by env: the env runner takes actions[j] and every other column's [j].
        return {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
