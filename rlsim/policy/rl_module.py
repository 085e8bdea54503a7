"""The paper's policy head as an RLlib (new API stack) torch RLModule.

One MLP scores each candidate from [user context, candidate features] (the same weights for
every candidate, so the policy is permutation-equivariant over the slate); a masked softmax over
the K scores is the action distribution. The value head is linear over the user context and the
mean of the candidates' hidden states. Its input is the env's flat observation (user, candidates,
history, action mask: rlsim.env.ObsLayout), sliced here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule

from rlsim.env import ObsLayout

# Rows per chunk of compute_values without embeddings (RLlib's GAE pass over a whole train batch).
VALUE_CHUNK = 512
# Large negative logit for masked candidates (not -inf: keeps the softmax and entropy finite).
MASKED_LOGIT = -1e9


class SlateScorer(nn.Module):
    """Plain torch core shared by the RLlib module and the compact torch PPO; it reads the flat
    observation (rlsim.env.ObsLayout)."""

    def __init__(self, user_dim: int, cand_dim: int, k: int, history: int = 0, hidden: int = 64):
        super().__init__()
        self.user_dim, self.cand_dim, self.k, self.history = user_dim, cand_dim, k, history
        self.layout = ObsLayout(user_dim, cand_dim, k, history)
        ctx_dim = user_dim + history * (cand_dim + 1)
        self.ctx = nn.Sequential(nn.Linear(ctx_dim, hidden), nn.Tanh())
        self.cand = nn.Sequential(nn.Linear(cand_dim, hidden), nn.Tanh())
        # Candidate and user meet in one hidden layer: cheap (no [B, K, 3H] concat) yet non-linear.
        self.cand_mix = nn.Linear(hidden, hidden)
        self.ctx_mix = nn.Linear(hidden, hidden, bias=False)
        self.out = nn.Linear(hidden, 1)
        self.value = nn.Linear(2 * hidden, 1)
        nn.init.zeros_(self.out.bias)
        nn.init.normal_(self.out.weight, std=0.01)

    def split(self, obs: torch.Tensor):
        """(user context [B, user_dim + history * (cand_dim + 1)], candidates [B, K, cand_dim], mask [B, K])
        of flat observations [B, ObsLayout.size]."""
        lay = self.layout
        user = lay.user(obs)
        ctx = torch.cat([user, lay.hist(obs)], 1) if self.history else user
        return ctx, lay.cands(obs), lay.mask(obs)

    def forward(self, obs: torch.Tensor, values: bool = True):
        """(masked logits [B, K], value-head embedding [B, 2*hidden], or None with values=False: acting
        needs the logits only)."""
        ctx, cands, mask = self.split(obs)
        c = self.ctx(ctx)  # [B, H]
        h = self.cand(cands)  # [B, K, H]
        z = torch.tanh(self.cand_mix(h) + self.ctx_mix(c).unsqueeze(1))  # [B, K, H]
        logits = self.out(z).squeeze(-1)
        logits = torch.where(mask > 0, logits, torch.full_like(logits, MASKED_LOGIT))
        if not values:
            return logits, None
        w = mask.unsqueeze(-1)
        pooled = (z * w).sum(1) / w.sum(1).clamp(min=1.0)
        return logits, torch.cat([c, pooled], -1)

    def values(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.value(embeddings).squeeze(-1)


class SlateScorerRLModule(TorchRLModule, ValueFunctionAPI):
    """model_config: user_dim, cand_dim, k, history (from rlsim.env.obs_layout), hidden."""

    def setup(self):
        mc = self.model_config or {}
        self.net = SlateScorer(int(mc["user_dim"]), int(mc["cand_dim"]), int(mc["k"]),
                               int(mc.get("history", 0)), int(mc.get("hidden", 64)))

    def _forward(self, batch, **kwargs):
        logits, _ = self.net(batch[Columns.OBS], values=False)
        return {Columns.ACTION_DIST_INPUTS: logits}

    def _forward_exploration(self, batch, **kwargs):
        # Sampling for training: the value of each observation comes with its logits (the pooled
        # embedding is at hand), into the episodes as VF_PREDS, so GAE need not run the network over
        # the train batch again (compute_values).
        with torch.no_grad():
            logits, emb = self.net(batch[Columns.OBS])
            return {Columns.ACTION_DIST_INPUTS: logits, Columns.VF_PREDS: self.net.values(emb)}

    def train(self, mode: bool = True):
        # Nothing in this network depends on the mode (no dropout, no batch norm), yet RLlib switches
        # the env runner's copy to eval and back around every forward, and the learner's to train before
        # every minibatch: each switch walks all submodules. The env runner's copy (inference_only) stays
        # in eval mode; a switch to the mode already set does nothing.
        mode = bool(mode) and not self.inference_only
        if mode == self.training:
            return self
        return super().train(mode)

    def _forward_train(self, batch, **kwargs):
        logits, emb = self.net(batch[Columns.OBS])
        return {Columns.ACTION_DIST_INPUTS: logits, Columns.EMBEDDINGS: emb}

    def compute_values(self, batch: dict[str, Any], embeddings: Any | None = None):
        if embeddings is not None:  # PPO's loss: forward_train's embeddings
            return self.net.values(embeddings)
        # Without embeddings: RLlib's GAE pass over a whole train batch. Its values become numpy targets,
        # so no autograd graph is built. The rows sampled with these weights carry their value from the
        # sampling pass (VF_PREDS, _forward_exploration); only the rows without one are run: the bootstrap
        # step RLlib appends to each episode chunk (LOSS_MASK False).
        obs = batch[Columns.OBS]
        with torch.no_grad():
            vf, keep = batch.get(Columns.VF_PREDS), batch.get(Columns.LOSS_MASK)
            if vf is None or keep is None or len(vf) != len(obs):
                return self._values(obs)
            out = torch.as_tensor(vf, dtype=torch.float32).clone()
            fresh = ~torch.as_tensor(keep, dtype=torch.bool)
            if fresh.any():
                out[fresh] = self._values(obs[fresh])
            return out

    def _values(self, obs: torch.Tensor) -> torch.Tensor:
        """Values of observations in chunks of VALUE_CHUNK rows (each row's value is its own; one
        [4000, K, hidden] pass falls out of the CPU caches: 1.2-2.7x per row what a minibatch costs)."""
        if not len(obs):
            return obs.new_zeros(0)
        return torch.cat([self.net.values(self.net(obs[s:s + VALUE_CHUNK])[1]) for s in range(0, len(obs), VALUE_CHUNK)])
