"""The vanilla transformer (v-tf) reward model.

Tokens: user id, item id (+ an MLP of its frozen MiniLM genre and plot vectors), and optionally the
user's demographics and the items the user rated (SVD++-style implicit history). A
TransformerEncoder mixes them, and an FFN head scores each rating class. The prediction is the
expected rating: sum_c p(c) * value(c).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rlsim.reward.config import RewardConfig
from rlsim.reward.features import AGE_EDGES, FeatureTables


class VanillaTransformer(nn.Module):
    # Buffers rebuilt from FeatureTables (stored once in the checkpoint, not per ensemble member).
    DERIVED_BUFFERS = ("hist", "hist_r", "genre", "plot", "demo")

    def __init__(self, cfg: RewardConfig, ft: FeatureTables, class_values: np.ndarray):
        super().__init__()
        d = cfg.dim
        self.cfg = cfg
        self.user_emb = nn.Embedding(ft.n_users, d)
        self.item_emb = nn.Embedding(ft.n_items, d)
        for e in (self.user_emb, self.item_emb):
            nn.init.normal_(e.weight, std=0.05)
        # Frozen text vectors: buffers, saved with the weights, never re-encoded.
        self.register_buffer("genre", torch.as_tensor(ft.genre))
        self.register_buffer("plot", torch.as_tensor(ft.plot))
        d_text = ft.genre.shape[1]
        self.text_mlp = nn.Sequential(nn.Linear(2 * d_text, cfg.text_hidden), nn.GELU(),
                                      nn.Dropout(cfg.dropout), nn.Linear(cfg.text_hidden, d))
        n_tokens = 2
        if cfg.user_features:
            self.register_buffer("demo", torch.as_tensor(ft.demo))
            self.age_emb = nn.Embedding(len(AGE_EDGES) + 2, d)
            self.gender_emb = nn.Embedding(3, d)
            self.occ_emb = nn.Embedding(max(ft.n_occupations, 1), d)
            n_tokens += 1
        if cfg.history:
            # Row-normalised (1/sqrt(n)) user x item matrix of the training ratings.
            u, i = torch.as_tensor(ft.hist_users), torch.as_tensor(ft.hist_items)
            n = torch.bincount(u, minlength=ft.n_users).clamp(min=1).float()
            vals = n[u].rsqrt()
            self.register_buffer("hist", torch.sparse_coo_tensor(
                torch.stack([u, i]), vals, (ft.n_users, ft.n_items), check_invariants=True).coalesce())
            self.hist_emb = nn.Embedding(ft.n_items, d)
            nn.init.normal_(self.hist_emb.weight, std=0.05)
            n_tokens += 1
        if cfg.history_ratings:
            # Same pairs weighted by the centred rating: what the user liked more or less than usual.
            u, i = torch.as_tensor(ft.hist_users), torch.as_tensor(ft.hist_items)
            self.register_buffer("hist_r", torch.sparse_coo_tensor(
                torch.stack([u, i]), torch.as_tensor(ft.hist_weights, dtype=torch.float32),
                (ft.n_users, ft.n_items), check_invariants=True).coalesce())
            self.hist_r_emb = nn.Embedding(ft.n_items, d)
            nn.init.normal_(self.hist_r_emb.weight, std=0.05)
            n_tokens += 1
        self.n_tokens = n_tokens
        self.type_emb = nn.Parameter(torch.zeros(n_tokens, d))
        layer = nn.TransformerEncoderLayer(d, cfg.heads, cfg.ff_dim, cfg.dropout, batch_first=True,
                                           activation="gelu", norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Sequential(nn.Linear(n_tokens * d, cfg.ff_dim), nn.GELU(), nn.Dropout(cfg.dropout),
                                  nn.Linear(cfg.ff_dim, len(class_values)))
        self.register_buffer("class_values", torch.as_tensor(np.asarray(class_values), dtype=torch.float32))
        self._hist_cache: dict[str, torch.Tensor] = {}

    def id_parameters(self) -> list[nn.Parameter]:
        """The embedding tables (decayed harder than the rest)."""
        tables = [self.user_emb, self.item_emb] + ([self.hist_emb] if self.cfg.history else []) + \
            ([self.hist_r_emb] if self.cfg.history_ratings else [])
        return [t.weight for t in tables]

    def item_vectors(self, item: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        feats = torch.cat([self.genre[text], self.plot[text]], dim=-1)
        return self.item_emb(item) + self.text_mlp(feats)

    def _sparse_product(self, name: str, matrix: torch.Tensor, table: nn.Embedding) -> torch.Tensor:
        # Every user's history vector: recomputed per training step, cached at inference.
        if not self.training and name in self._hist_cache:
            return self._hist_cache[name]
        h = torch.sparse.mm(matrix, table.weight)
        if not self.training:
            self._hist_cache[name] = h.detach()
        return h

    def train(self, mode: bool = True):
        self._hist_cache = {}
        return super().train(mode)

    def forward(self, user, item, text, demo, self_w=None, hist_item=None) -> torch.Tensor:
        """Logits [batch, n_classes] for index tensors from FeatureTables.encode.

        self_w: the pair's own weight in the rated history (removed from it); hist_item: the item
        index that weight belongs to when `item` was masked to the unknown row (training only)."""
        tokens = [self.user_emb(user), self.item_vectors(item, text)]
        if self.cfg.user_features:
            a, g, o = self.demo[demo].unbind(-1)
            tokens.append(self.age_emb(a) + self.gender_emb(g) + self.occ_emb(o))
        if self.cfg.history:
            tokens.append(self._sparse_product("hist", self.hist, self.hist_emb)[user])
        if self.cfg.history_ratings:
            h = self._sparse_product("hist_r", self.hist_r, self.hist_r_emb)[user]
            if self_w is not None:
                own = self.hist_r_emb(item if hist_item is None else hist_item)
                h = h - self_w.unsqueeze(-1) * own
            tokens.append(h)
        x = torch.stack(tokens, dim=1) + self.type_emb
        x = self.norm(self.encoder(x))
        return self.head(x.flatten(1))

    def expected(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, -1) @ self.class_values
