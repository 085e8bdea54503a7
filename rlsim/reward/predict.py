"""RewardPredictor: a trained v-tf (or an ensemble of seeds) behind predict(user_ids, item_ids).

A checkpoint is a folder: model.pt (weights + lookup tables, text vectors included) and
config.json (reward config, data config, rating scale). Loading needs neither the dataset
files nor a text model; unknown users and items fall back to the reserved unknown rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from rlsim.config import to_dict
from rlsim.data.schema import RatingScale
from rlsim.errors import RlsimError
from rlsim.reward.config import RewardConfig
from rlsim.reward.features import FeatureTables
from rlsim.reward.model import VanillaTransformer

FORMAT = 1


class RewardPredictor:
    def __init__(self, models: list[VanillaTransformer], features: FeatureTables, scale: RatingScale,
                 cfg: RewardConfig, data: dict | None = None, batch_size: int = 32768):
        self.models = [m.eval() for m in models]
        self.features = features
        self.scale = scale
        self.cfg = cfg
        self.data = data or {}
        self.batch_size = batch_size
        self.device = next(models[0].parameters()).device

    @property
    def known_users(self) -> np.ndarray:
        return self.features.user_ids

    @property
    def known_items(self) -> np.ndarray:
        return self.features.item_ids

    def session_arrays(self, sessions) -> dict[str, np.ndarray]:
        """Padded item rows [n, S] (0 = none) and centred ratings [n, S] of each pair's session."""
        n = len(sessions)
        width = max((len(s) for s in sessions), default=0)
        items = np.zeros((n, max(width, 1)), np.int64)
        ratings = np.zeros((n, max(width, 1)), np.float32)
        rows = [j for j, s in enumerate(sessions) if len(s)]
        if rows:
            lens = np.array([len(sessions[j]) for j in rows])
            r = np.repeat(rows, lens)
            c = np.concatenate([np.arange(k) for k in lens])
            items[r, c] = self.features._lookup(self.features._i, np.concatenate([sessions[j].items for j in rows]))
            ratings[r, c] = np.concatenate([sessions[j].ratings for j in rows]) - self.features.mean_rating
        return {"session_items": items, "session_r": ratings}

    @torch.no_grad()
    def predict_proba(self, user_ids, item_ids, sessions=None) -> np.ndarray:
        """Class probabilities [n, n_classes] (classes = scale.values), averaged over the ensemble.

        sessions: None, or one rlsim.simulators.Session per pair whose ratings join the user's history."""
        users, items = np.asarray(user_ids), np.asarray(item_ids)
        if users.shape != items.shape:
            raise RlsimError(f"user_ids and item_ids differ in length ({len(users)} vs {len(items)})")
        idx = self.features.encode(users, items)
        if sessions is not None:
            if len(sessions) != len(users):
                raise RlsimError(f"{len(sessions)} sessions for {len(users)} pairs")
            if any(len(s) for s in sessions):
                idx.update(self.session_arrays(sessions))
        out = np.zeros((len(users), self.scale.n_classes), np.float32)
        for m in self.models:
            m.eval()
            for s in range(0, len(users), self.batch_size):
                b = {k: torch.as_tensor(v[s:s + self.batch_size], device=self.device) for k, v in idx.items()}
                out[s:s + self.batch_size] += torch.softmax(m(**b), -1).cpu().numpy()
        return out / len(self.models)

    @property
    def has_choice(self) -> bool:
        return all(m.has_choice for m in self.models)

    @torch.no_grad()
    def choice_proba(self, user_ids, item_ids, sessions=None) -> np.ndarray:
        """P(the user picks the movie when shown it) [n], from the choice head, averaged over the ensemble
        (page odds of one watched movie to reward.choice_negatives unwatched ones)."""
        if not self.has_choice:
            raise RlsimError("this reward model has no choice head (train it with reward.choice_weight > 0)")
        users, items = np.asarray(user_ids), np.asarray(item_ids)
        idx = self.features.encode(users, items)
        idx["own_watch"] = self.features.in_history(idx["user"], idx["item"])  # as in training
        if sessions is not None and any(len(s) for s in sessions):
            idx.update(self.session_arrays(sessions))
        out = np.zeros(len(users), np.float64)
        for m in self.models:
            m.eval()
            for s in range(0, len(users), self.batch_size):
                b = {k: torch.as_tensor(v[s:s + self.batch_size], device=self.device) for k, v in idx.items()}
                out[s:s + self.batch_size] += torch.sigmoid(m(**b, head="choice")).cpu().numpy()
        return out / len(self.models)

    def predict(self, user_ids, item_ids, sessions=None) -> np.ndarray:
        """Expected rating on the dataset's scale (float, not snapped)."""
        return self.predict_proba(user_ids, item_ids, sessions).astype(np.float64) @ self.scale.values

    def predict_class_value(self, user_ids, item_ids) -> np.ndarray:
        """The most likely rating value (the classifier's own answer)."""
        return self.scale.from_class(self.predict_proba(user_ids, item_ids).argmax(1))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        feats = {k: (torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v)
                 for k, v in self.features.to_state().items()}
        state = {"format": FORMAT, "features": feats,
                 "models": [{k: v for k, v in m.state_dict().items() if k not in m.DERIVED_BUFFERS}
                            for m in self.models]}
        tmp = folder / "model.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(folder / "model.pt")
        meta = {"format": FORMAT, "model": "vanilla_transformer", "reward": to_dict(self.cfg),
                "data": self.data, "scale": self.scale.to_dict(), "n_classes": self.scale.n_classes,
                "n_users": len(self.known_users), "n_items": len(self.known_items)}
        (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, checkpoint_dir: str | Path, device: str = "cpu") -> "RewardPredictor":
        folder = Path(checkpoint_dir)
        if (folder / "checkpoint" / "model.pt").is_file():
            folder = folder / "checkpoint"  # a run folder was given
        if not (folder / "model.pt").is_file() or not (folder / "config.json").is_file():
            raise RlsimError(f"no reward checkpoint (model.pt + config.json) in {folder}")
        meta = json.loads((folder / "config.json").read_text())
        if meta.get("format") != FORMAT:
            raise RlsimError(f"checkpoint {folder} has format {meta.get('format')}, expected {FORMAT}")
        state = torch.load(folder / "model.pt", map_location=device, weights_only=True)
        ft = FeatureTables.from_state({k: (v.numpy() if torch.is_tensor(v) else v)
                                       for k, v in state["features"].items()})
        if meta["reward"].get("choice_weight", 0) > 0:  # saved before reward.choice_scorer existed: joint
            meta["reward"].setdefault("choice_scorer", "joint")
            meta["reward"].setdefault("choice_popularity", False)  # saved before the head read popularity
        cfg = RewardConfig(**meta["reward"])
        scale = RatingScale(**meta["scale"])
        models = []
        for sd in state["models"]:
            m = VanillaTransformer(cfg, ft, scale.values).to(device)
            missing, unexpected = m.load_state_dict(sd, strict=False)
            if unexpected or [k for k in missing if k not in m.DERIVED_BUFFERS]:
                raise RlsimError(f"checkpoint {folder} does not match the model: {missing or unexpected}")
            models.append(m.eval())
        return cls(models, ft, scale, cfg, data=meta.get("data"))


def fine_tune(predictor: RewardPredictor, user_ids, item_ids, target_probs: np.ndarray, epochs: int = 2,
              lr: float = 5e-4, batch_size: int = 256, seed: int = 0) -> dict:
    """Distil answers into the reward model: a few epochs of soft-label cross-entropy on
    (user, item) -> target distribution (e.g. a persona's answers). Every ensemble member is
    updated in place; returns the loss before and after on those pairs."""
    import torch.nn.functional as F

    idx = predictor.features.encode(np.asarray(user_ids), np.asarray(item_ids))
    t = {k: torch.as_tensor(v, device=predictor.device) for k, v in idx.items()}
    y = torch.as_tensor(np.asarray(target_probs, np.float32), device=predictor.device)
    y = y / y.sum(1, keepdim=True).clamp(min=1e-9)
    gen = torch.Generator().manual_seed(seed)

    def loss_of(m) -> float:
        with torch.no_grad():
            m.eval()
            return float(F.cross_entropy(m(**t), y).item())

    before = float(np.mean([loss_of(m) for m in predictor.models]))
    n = len(y)
    for m in predictor.models:
        # Only the dense layers move: the ID tables would memorise the few distilled pairs.
        params = [p for name, p in m.named_parameters() if not name.endswith("_emb.weight")]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        m.train()
        for _ in range(epochs):
            for s in range(0, n, batch_size):
                b = torch.randperm(n, generator=gen)[s:s + batch_size].to(predictor.device)
                loss = F.cross_entropy(m(**{k: v[b] for k, v in t.items()}), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        m.eval()
    return {"pairs": int(n), "loss_before": before, "loss_after": float(np.mean([loss_of(m) for m in predictor.models]))}
