"""RewardConfig: the v-tf reward model's hyperparameters (the `reward:` YAML section)."""

from __future__ import annotations

from dataclasses import dataclass

from rlsim.config import from_dict
from rlsim.errors import ConfigError


@dataclass
class RewardConfig:
    # Model: every token is `dim` wide; item text (genre + plot MiniLM vectors) goes through a small MLP.
    dim: int = 64
    layers: int = 2
    heads: int = 4
    ff_dim: int = 128
    dropout: float = 0.3
    text_hidden: int = 128
    # Extra tokens: demographics (age bucket, gender, occupation) and the user's rated items (SVD++-like).
    user_features: bool = True
    history: bool = True
    # Tokens of the user's (and the item's) other ratings, centred on the GLOBAL training mean: a
    # user mean would include the rating being predicted (the pair's own rating is left out).
    history_ratings: bool = True
    # Training only: a history longer than this is represented by this many of its ratings, drawn at random
    # and reweighted (an unbiased estimate of its sum, noise like dropout's); 0 = every rating. It bounds
    # a step's cost: at 10M ratings a sampled movie's history holds thousands of users.
    history_sample: int = 0
    # Optimisation.
    lr: float = 2e-3
    weight_decay: float = 1e-4
    # Decoupled weight decay on the ID embedding tables (they overfit first).
    emb_weight_decay: float = 2.0
    batch_size: int = 512
    epochs: int = 25  # the cap (with the cosine schedule, decay_epochs caps it first)
    # Early stopping: stop after `patience` epochs without a better validation RMSE; the best epoch's
    # weights are kept either way (metrics.json: best_epoch, stopped_early).
    patience: int = 4
    warmup_epochs: float = 1.0
    schedule: str = "cosine"  # cosine | constant
    # The cosine reaches zero after this many epochs (then training ends: nothing changes at lr 0);
    # 0 = over all `epochs`. On ML-100K the validation minimum sits at epochs 5-8 (bench/), and a
    # schedule that has annealed by then beats one that is still at full rate.
    decay_epochs: int = 8
    # Loss: cross-entropy over rating classes (+ label smoothing) + mse_weight * MSE of the expected rating.
    label_smoothing: float = 0.0
    mse_weight: float = 0.5
    # Choice head (would the user pick the movie?): + choice_weight * BCE of the user's rated movies
    # against choice_negatives sampled unrated ones per rating (0 = no head; the model only rates).
    choice_weight: float = 0.0
    choice_negatives: int = 3  # the odds the head learns: one pick to this many unrated movies
    # joint: an MLP over the whole pair's encoding, one transformer forward per negative (3 per pick:
    # an epoch 3.6-4x the rating-only one). dot: the same encoder over the user's tokens gives a user
    # vector, dotted with each movie's: each step scores its picks against a shared pool of
    # choice_pool random movies (weighted to choice_negatives per pick) for the cost of a matmul.
    # joint stays the default: the study's published results rest on it, and one quickstart run with
    # dot trained a worse policy (real hit rate 0.360 vs 0.439, one seed each; docs/reward.md).
    choice_scorer: str = "joint"
    # joint only: unrated movies actually drawn per pick, weighted to stand for choice_negatives (0 = as
    # many as choice_negatives). Each draw costs a whole forward: 1 makes an epoch ~2x a no-head one, not ~4x.
    choice_draws: int = 0
    choice_pool: int = 256
    # The choice head also reads the movie's popularity, log(1 + its training picks by other users), and the
    # user's activity, log(1 + their training ratings) (the ID tables are decayed hard, so a movie's own
    # popularity might be what the head learns least). Off: on u1's validation slice the joint head chose
    # worse with it (AUC 0.915 vs 0.918, 1:9 accuracy 0.620 vs 0.632; bench/results/choice_head_popularity.json).
    choice_popularity: bool = False
    # dot only: read the user vector off the rating forward (the user's tokens attend to each other
    # only there) instead of a second pass over them: 1.12x a no-head epoch rather than 1.35x, but
    # validation RMSE 0.901 rather than 0.896 on ML-100K u1 (bench/results/choice_head_shared.json).
    choice_shared_pass: bool = False
    # Probability of replacing a training user/item id by the reserved unknown row (teaches it).
    unknown_prob: float = 0.02
    val_frac: float = 0.1
    # Independent seeds whose predicted class probabilities are averaged (1 = a single model).
    ensemble: int = 1
    device: str = "cpu"
    # Batches per epoch at most (0 = the whole epoch): a quick throughput measurement, never a real run.
    max_batches: int = 0
    # 0: the plain loop in this process; N >= 1: a Ray Train TorchTrainer (DDP) with N workers, each
    # training on its own shard of the ratings (rlsim/reward/distributed.py; needs a running Ray).
    workers: int = 0
    # Where Ray Train keeps the run's checkpoint: a folder every node sees, or a URI (s3://..., gs://...).
    # None: a temporary folder on this machine (enough on one machine, local_head.sh's nodes included).
    storage_path: str | None = None
    seed: int = 0
    # Torch threads while training in this process (0: every core this process may use). Ray Train
    # workers use one each and a Tune trial its CPU share; the default run trains alone, so on 2 cores
    # 2 threads make a u1 epoch ~1.3x faster (the env runners' OMP_NUM_THREADS=1 is for parallel workers).
    threads: int = 0
    progress: bool = False  # a progress bar over epochs (the CLI turns it on unless --quiet)

    def validate(self) -> "RewardConfig":
        if self.dim % self.heads:
            raise ConfigError(f"reward.dim ({self.dim}) must be divisible by reward.heads ({self.heads})")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"reward.schedule must be cosine or constant, got {self.schedule!r}")
        if not 0.0 < self.val_frac < 1.0:
            raise ConfigError(f"reward.val_frac must be in (0, 1), got {self.val_frac}")
        if self.decay_epochs < 0:
            raise ConfigError("reward.decay_epochs must be >= 0")
        if self.workers < 0 or self.max_batches < 0 or self.history_sample < 0 or self.threads < 0:
            raise ConfigError("reward.workers, reward.max_batches, reward.history_sample and reward.threads "
                              "must be >= 0")
        if self.workers > self.batch_size:
            raise ConfigError(f"reward.workers ({self.workers}) must not exceed reward.batch_size ({self.batch_size}): "
                              "each worker takes its share of every batch")
        if self.choice_weight < 0 or self.choice_negatives < 1 or self.choice_pool < 1 or self.choice_draws < 0:
            raise ConfigError("reward.choice_weight and choice_draws must be >= 0, reward.choice_negatives and "
                              "choice_pool >= 1")
        if self.choice_scorer not in ("joint", "dot"):
            raise ConfigError(f"reward.choice_scorer must be joint or dot, got {self.choice_scorer!r}")
        for name in ("layers", "heads", "batch_size", "epochs", "ensemble"):
            if getattr(self, name) < 1:
                raise ConfigError(f"reward.{name} must be >= 1")
        return self

    @classmethod
    def from_dict(cls, data: dict | None) -> "RewardConfig":
        return from_dict(cls, data, "reward").validate()
