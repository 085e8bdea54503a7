"""Typed settings of the policy stage (`policy:` YAML section)."""

from __future__ import annotations

from dataclasses import dataclass

from rlsim.errors import ConfigError


@dataclass
class PolicyConfig:
    # Environment
    horizon: int = 1
    # How a step's reward is drawn from the simulator (rlsim.vector_env): "sampled" (a rating drawn
    # from its distribution given the session so far), "expected" (the distribution's expectation,
    # session-conditioned) or "static" (one table of no-session expectations, scored once: the
    # fast path for deterministic horizon-1 training, only when asked for).
    reward_mode: str = "sampled"
    # What the policy is rewarded for (rlsim.vector_env): "rating" (the rating of every pick, as if
    # the user watched whatever was shown), "engagement" (the user first chooses: a skip earns
    # -skip_penalty, a watch its rating) or "liked" (1 when the user watches and rates it at least
    # like_threshold, else 0). engagement and liked need a simulated user with a choice model.
    reward: str = "rating"
    skip_penalty: float = 0.0
    like_threshold: float = 4.0
    # Agent4Rec-style: leave the session after this many skips in a row (None: never).
    exit_after_skips: int | None = None
    # Users held out of training (seeded), on whom `policy evaluate` judges the policy.
    holdout_users: float = 0.2
    # Optional session exit (Agent4Rec-style): leave when the mean of the last exit_window ratings < threshold.
    exit_threshold: float | None = None
    exit_window: int = 3
    history: int = -1  # shown items kept in the observation; -1 = min(horizon - 1, 4)
    center: bool = True  # reward = rating - the user's train mean
    # Horizon 1 only: chain this many users into one RLlib episode (gamma is then forced to 0,
    # so each pick is still its own one-step problem). Cuts RLlib's per-episode overhead.
    users_per_episode: int = 32
    feature_dims: int = 24  # PCA dims of the item text embeddings
    # PPO
    # Sample-efficient defaults (measured on ML-100K: ~94% of the random-to-oracle gap in 12 iterations).
    iterations: int = 15
    lr: float = 3e-3
    train_batch_size: int = 2000
    minibatch_size: int = 250
    num_epochs: int = 8
    gamma: float = 0.99
    lambda_: float = 0.95
    entropy_coeff: float = 0.0
    vf_loss_coeff: float = 0.5
    hidden: int = 64
    # Sampling and learning. None (the default) picks the remote env runners from the CPUs Ray reports
    # when training starts (rlsim.policy.train.auto_env_runners): 0 below 6 CPUs, where remote
    # runners, the learner and the simulator actor compete for the same cores (2 runners on 2 cores
    # ran 193-285 env steps/s against 1,620 in the driver); from 6 CPUs up, one runner per core
    # beyond the driver and the simulator actor, few enough that each steps its sessions at least
    # 8 times an iteration. An explicit number (0 = sample in the driver) is always used as given.
    # Put the learner on a GPU with num_gpus_per_learner=1 (num_learners=0 keeps it in the driver;
    # 1+ makes learner actors). docs/policy.md has the many-core settings.
    num_env_runners: int | None = None
    num_envs_per_env_runner: int = 32
    num_learners: int = 0
    num_gpus_per_learner: float = 0.0
    seed: int = 0
    # A failed reward (the simulator could not answer: budget, errors) earns the user's mean, so a
    # policy trained on many of them learns from zeros: training stops once the failed share of the
    # rewards asked so far exceeds this (checked after every iteration; 1.0 = never stop).
    max_failed_share: float = 0.05

    def validate(self) -> "PolicyConfig":
        if self.horizon < 1:
            raise ConfigError(f"policy.horizon must be >= 1, got {self.horizon}")
        if self.iterations < 1:
            raise ConfigError(f"policy.iterations must be >= 1, got {self.iterations}")
        from rlsim.vector_env import REWARD_MODES

        if self.reward_mode not in REWARD_MODES:
            raise ConfigError(f"policy.reward_mode must be one of {', '.join(REWARD_MODES)}, got {self.reward_mode!r}")
        if not 0.0 <= self.holdout_users < 1.0:
            raise ConfigError(f"policy.holdout_users must be in [0, 1), got {self.holdout_users}")
        if self.num_learners < 0 or self.num_gpus_per_learner < 0 or (self.num_env_runners or 0) < 0:
            raise ConfigError("policy.num_env_runners, num_learners and num_gpus_per_learner must be >= 0")
        if self.exit_window < 1:
            raise ConfigError("policy.exit_window must be >= 1")
        from rlsim.vector_env import REWARDS

        if self.reward not in REWARDS:
            raise ConfigError(f"policy.reward must be one of {', '.join(REWARDS)}, got {self.reward!r}")
        if self.reward != "rating" and self.reward_mode != "sampled":
            raise ConfigError(f"policy.reward {self.reward} draws the user's choice: it needs reward_mode sampled")
        if self.exit_after_skips is not None and self.exit_after_skips < 1:
            raise ConfigError("policy.exit_after_skips must be >= 1 (or unset)")
        if not 0.0 <= self.max_failed_share <= 1.0:
            raise ConfigError(f"policy.max_failed_share must be in [0, 1], got {self.max_failed_share}")
        if self.minibatch_size > self.train_batch_size:
            raise ConfigError("policy.minibatch_size must not exceed policy.train_batch_size")
        return self

    def env_history(self) -> int:
        return min(self.horizon - 1, 4) if self.history < 0 else self.history
