"""A compact, single-file PPO in plain torch (CleanRL style) on the same env and the same network.

It exists to measure what RLlib costs: same SessionVectorEnv (N sessions, one simulator request
per step), same SlateScorer network, same batch/minibatch/epoch settings. Masked categorical
policy, GAE, clipped surrogate, value loss, optional entropy bonus.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rlsim.env import EnvData, obs_layout
from rlsim.vector_env import SessionVectorEnv
from rlsim.policy.rl_module import SlateScorer


@dataclass
class TorchPPOConfig:
    iterations: int = 15
    num_envs: int = 32
    steps_per_iteration: int = 4000
    minibatch_size: int = 500
    num_epochs: int = 4
    lr: float = 1e-3
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    entropy_coeff: float = 0.0
    vf_coeff: float = 0.5
    max_grad_norm: float = 0.5
    hidden: int = 64
    seed: int = 0


def train_torch_ppo(data: EnvData, env_config: dict, cfg: TorchPPOConfig, log=None) -> dict:
    """Train; returns {"net", "history", "env_steps", "seconds", "env_steps_per_s"}."""
    torch.manual_seed(cfg.seed)
    # NEXT_STEP autoreset: the step after an episode ends only resets that env; it carries no
    # transition and is masked out of the loss.
    envs = SessionVectorEnv({**env_config, "data": data, "num_envs": cfg.num_envs})
    gamma = 0.0 if env_config.get("users_per_episode", 1) > 1 else cfg.gamma
    layout = obs_layout(data, env_config.get("history", 0))
    net = SlateScorer(layout["user_dim"], layout["cand_dim"], layout["k"], layout["history"], cfg.hidden)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, eps=1e-5)
    T = max(1, cfg.steps_per_iteration // cfg.num_envs)
    N = cfg.num_envs
    obs, _ = envs.reset(seed=cfg.seed)
    o = torch.from_numpy(obs)  # flat observations (rlsim.env.ObsLayout): features, then the action mask
    history = []
    steps = 0
    t_start = time.perf_counter()
    for it in range(1, cfg.iterations + 1):
        t0 = time.perf_counter()
        B_obs = torch.zeros((T, N, o.shape[1]))
        B_act, B_logp, B_rew, B_done, B_val, B_ok = (torch.zeros((T, N)) for _ in range(6))
        # Rollout ---------------------------------------------------------------------------
        with torch.no_grad():
            for t in range(T):
                B_obs[t] = o
                logits, emb = net(o)
                dist = torch.distributions.Categorical(logits=logits)
                a = dist.sample()
                B_act[t], B_logp[t], B_val[t] = a, dist.log_prob(a), net.values(emb)
                obs, r, term, trunc, info = envs.step(a.numpy())
                B_ok[t] = torch.as_tensor(info["_rating"], dtype=torch.float32)
                B_rew[t] = torch.as_tensor(r, dtype=torch.float32)
                B_done[t] = torch.as_tensor(np.logical_or(term, trunc), dtype=torch.float32)
                o = torch.from_numpy(obs)
            _, emb = net(o)
            next_v = net.values(emb)
            # GAE; B_done[t] says step t ended its episode (then s_{t+1} belongs to a new one).
            adv = torch.zeros((T, N))
            last = torch.zeros(N)
            for t in reversed(range(T)):
                nd = 1.0 - B_done[t]
                nv = next_v if t == T - 1 else B_val[t + 1]
                delta = B_rew[t] + gamma * nv * nd - B_val[t]
                last = delta + gamma * cfg.gae_lambda * nd * last
                adv[t] = last
            ret = adv + B_val
        steps += int(B_ok.sum())
        keep = B_ok.reshape(-1) > 0
        f = lambda x: x.reshape(T * N, *x.shape[2:])[keep]  # noqa: E731
        b_obs, b_act, b_logp, b_adv, b_ret = map(f, (B_obs, B_act, B_logp, adv, ret))
        # Update ----------------------------------------------------------------------------
        n = len(b_obs)
        for _ in range(cfg.num_epochs):
            perm = torch.randperm(n)
            for s in range(0, n, cfg.minibatch_size):
                idx = perm[s:s + cfg.minibatch_size]
                logits, emb = net(b_obs[idx])
                dist = torch.distributions.Categorical(logits=logits)
                logp = dist.log_prob(b_act[idx].long())
                ratio = (logp - b_logp[idx]).exp()
                a_ = b_adv[idx]
                a_ = (a_ - a_.mean()) / (a_.std() + 1e-8)
                pg = torch.max(-a_ * ratio, -a_ * ratio.clamp(1 - cfg.clip, 1 + cfg.clip)).mean()
                v_loss = 0.5 * ((net.values(emb) - b_ret[idx]) ** 2).mean()
                loss = pg + cfg.vf_coeff * v_loss - cfg.entropy_coeff * dist.entropy().mean()
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
                opt.step()
        row = {"iteration": it, "reward_per_step": float(B_rew.sum() / B_ok.sum().clamp(min=1)), "env_steps": steps,
               "seconds": round(time.perf_counter() - t0, 3)}
        history.append(row)
        if log:
            log(row)
    envs.close()
    secs = time.perf_counter() - t_start
    return {"net": net, "history": history, "env_steps": steps, "seconds": round(secs, 3),
            "env_steps_per_s": round(steps / secs, 1)}
