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
import torch.nn.functional as F

from rlsim.reward.config import RewardConfig
from rlsim.reward.features import AGE_EDGES, FeatureTables
from rlsim.reward.layers import Dropout, EncoderLayer


def csr_runs(starts: torch.Tensor, take: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For CSR rows starting at `starts` and `take` nonzeros of each: (each position's row start, its index
    within the row, each row's offset in the concatenation); start + within is the nonzero's position."""
    offsets = torch.cumsum(take, 0) - take
    within = torch.arange(int(take.sum()), device=starts.device) - torch.repeat_interleave(offsets, take)
    return torch.repeat_interleave(starts, take), within, offsets


class _SparseRows:
    """rows -> (matrix @ table.weight)[rows], computed for those rows only (an embedding_bag over their
    nonzeros): the same numbers as the full sparse product, at the cost of the batch's own histories.

    sample > 0 (training only): a row with more nonzeros than that is represented by `sample` of them
    drawn uniformly with replacement and weighted by length / sample, an unbiased estimate of its sum
    (like dropout, its noise is the price of a bounded cost: a popular movie's history at 10M
    ratings holds thousands of users). Repeated rows (a pick and its negatives share the user) are
    gathered once. Matrices of the same sparsity (the user's implicit and rated histories) share
    one `positions` memo, so one draw serves both."""

    def __init__(self, csr: torch.Tensor, table: nn.Embedding, sample: int = 0, memo: dict | None = None):
        self.crow, self.col, self.val, self.table = csr.crow_indices(), csr.col_indices(), csr.values(), table
        self.sample, self.memo = sample, memo if memo is not None else {}

    def positions(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(nonzero positions, bag offsets, weight per position, row -> bag) for the unique rows."""
        hit = self.memo.get("last")
        if hit is not None and hit[0] is rows:
            return hit[1]
        uniq, inverse = torch.unique(rows, return_inverse=True)
        starts = self.crow[uniq]
        lengths = self.crow[uniq + 1] - starts
        take = lengths.clamp(max=self.sample) if self.sample else lengths
        base, within, offsets = csr_runs(starts, take)
        if self.sample and bool((lengths > self.sample).any()):
            n = torch.repeat_interleave(lengths, take)
            big = n > self.sample
            drawn = (torch.rand(len(within), device=rows.device) * n).long().clamp(max=n - 1)
            within = torch.where(big, drawn, within)
            weight = torch.where(big, n / self.sample, 1.0)
        else:
            weight = torch.ones(len(within), device=rows.device)
        out = (base + within, offsets, weight, inverse)
        self.memo["last"] = (rows, out)
        return out

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        idx, offsets, weight, inverse = self.positions(rows)
        w = (self.val[idx] * weight).to(self.table.weight.dtype)
        return F.embedding_bag(self.col[idx], self.table.weight, offsets, mode="sum", per_sample_weights=w)[inverse]


class VanillaTransformer(nn.Module):
    # Buffers rebuilt from FeatureTables (stored once in the checkpoint, not per ensemble member).
    DERIVED_BUFFERS = ("hist", "hist_r", "item_hist_r", "user_norm", "item_norm", "user_count", "genre", "plot",
                       "demo", "pop_counts", "pop_stats")

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
                                      Dropout(cfg.dropout), nn.Linear(cfg.text_hidden, d))
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
            # The user's ratings (over item vectors) and the item's ratings (over user vectors),
            # centred and 1/sqrt(n)-normalised: AutoRec-like evidence for both sides of the pair.
            u, i = torch.as_tensor(ft.hist_users), torch.as_tensor(ft.hist_items)
            r = torch.as_tensor(ft.centred_ratings())
            nu = torch.bincount(u, minlength=ft.n_users).clamp(min=1).float().rsqrt()
            ni = torch.bincount(i, minlength=ft.n_items).clamp(min=1).float().rsqrt()
            self.register_buffer("user_norm", nu)
            self.register_buffer("item_norm", ni)
            self.register_buffer("hist_r", torch.sparse_coo_tensor(
                torch.stack([u, i]), r * nu[u], (ft.n_users, ft.n_items), check_invariants=True).coalesce())
            self.register_buffer("item_hist_r", torch.sparse_coo_tensor(
                torch.stack([i, u]), r * ni[i], (ft.n_items, ft.n_users), check_invariants=True).coalesce())
            self.hist_r_emb = nn.Embedding(ft.n_items, d)
            self.item_hist_r_emb = nn.Embedding(ft.n_users, d)
            for e in (self.hist_r_emb, self.item_hist_r_emb):
                nn.init.normal_(e.weight, std=0.05)
            n_tokens += 2
        if cfg.history or cfg.history_ratings or cfg.choice_popularity:
            # Ratings per user in the history: a session's ratings are folded into these sums.
            self.register_buffer("user_count", torch.bincount(torch.as_tensor(ft.hist_users),
                                                              minlength=ft.n_users).float())
        self.pop_features = cfg.choice_weight > 0 and cfg.choice_popularity
        if self.pop_features:
            # The choice head's popularity inputs (choice_features): training picks per movie, and the mean and
            # spread of log(1 + picks) over movies and over users, which put both on one scale at any size.
            items = torch.bincount(torch.as_tensor(ft.hist_items), minlength=ft.n_items).float()
            self.register_buffer("pop_counts", items)
            lu, li = torch.log1p(self.user_count[1:]), torch.log1p(items[1:])  # row 0: the unknown id
            self.register_buffer("pop_stats", torch.stack([torch.stack([li.mean(), lu.mean()]),
                                                           torch.stack([li.std(), lu.std()]).clamp(min=1e-3)]))
        self.n_tokens = n_tokens
        self.type_emb = nn.Parameter(torch.zeros(n_tokens, d))
        layer = EncoderLayer(d, cfg.heads, cfg.ff_dim, cfg.dropout, batch_first=True,
                                           activation="gelu", norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Sequential(nn.Linear(n_tokens * d, cfg.ff_dim), nn.GELU(), Dropout(cfg.dropout),
                                  nn.Linear(cfg.ff_dim, len(class_values)))
        # Would the user pick this movie (rlsim.simulators.choice)? A logit from the same transformer, trained
        # on the user's rated movies against sampled unrated ones (reward.choice_weight > 0).
        # "joint": an MLP over every token of the pair, so each negative costs a whole forward.
        # "dot": the same encoder run over the user's tokens only (id, demographics, history, session)
        # gives a user vector, scored against a projection of the movie's vector (+ a bias): the user
        # side is encoded once per pick and any number of negatives costs a dot product each.
        self.choice_head = self.choice_user = self.choice_item = None
        self.user_tokens = [0] + list(range(2, n_tokens - (1 if cfg.history_ratings else 0)))
        n_pop = 2 if self.pop_features else 0
        if cfg.choice_weight > 0 and cfg.choice_scorer == "joint":
            self.choice_head = nn.Sequential(nn.Linear(n_tokens * d + n_pop, cfg.ff_dim), nn.GELU(),
                                             Dropout(cfg.dropout), nn.Linear(cfg.ff_dim, 1))
        elif cfg.choice_weight > 0:
            self.choice_user = nn.Sequential(nn.Linear(len(self.user_tokens) * d, cfg.ff_dim), nn.GELU(),
                                             Dropout(cfg.dropout), nn.Linear(cfg.ff_dim, d))
            self.choice_item = nn.Linear(d, d + 1)
            if self.pop_features:  # dot: the popularity inputs enter as a linear term
                self.choice_pop = nn.Linear(n_pop, 1, bias=False)
            if cfg.choice_shared_pass:
                # The user's tokens attend to each other only (the movie's attend to all): their
                # encodings are the user-only pass's, read off the rating forward for free.
                side = torch.ones(n_tokens, dtype=torch.bool)
                side[self.user_tokens] = False
                self.register_buffer("attn_mask", (~side)[:, None] & side[None, :], persistent=False)
        self.register_buffer("class_values", torch.as_tensor(np.asarray(class_values), dtype=torch.float32))
        self._hist_cache: dict[str, tuple[tuple, torch.Tensor]] = {}  # inference: name -> (weights' stamp, value)
        self._csr: dict[str, tuple] = {}  # training: name -> (the matrix's stamp, its CSR copy)
        self._csr_memo: dict[str, dict] = {}  # per sparsity pattern: the last rows' positions (training)

    def id_parameters(self) -> list[nn.Parameter]:
        """The embedding tables (decayed harder than the rest)."""
        tables = [self.user_emb, self.item_emb] + ([self.hist_emb] if self.cfg.history else []) + \
            ([self.hist_r_emb, self.item_hist_r_emb] if self.cfg.history_ratings else [])
        return [t.weight for t in tables]

    def item_vectors(self, item: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.item_emb(item) + self.text_mlp(torch.cat([self.genre[text], self.plot[text]], dim=-1))
        # Inference: project every item's text once and look it up (the RL env scores many pairs).
        deps = (self.genre, self.plot, *self.text_mlp.parameters())
        cached = self._cached("text", deps)
        if cached is None:
            cached = self._store("text", deps, self.text_mlp(torch.cat([self.genre, self.plot], dim=-1)).detach())
        return self.item_emb(item) + cached[text]

    @staticmethod
    def _stamp(deps) -> tuple:
        # A tensor's storage and in-place version: an optimiser step, load_state_dict or .to() changes it.
        return tuple((v.data_ptr(), v._version) for v in (t._values() if t.is_sparse else t for t in deps))

    def _cached(self, name: str, deps) -> torch.Tensor | None:
        hit = self._hist_cache.get(name)
        return hit[1] if hit is not None and hit[0] == self._stamp(deps) else None

    def _store(self, name: str, deps, value: torch.Tensor) -> torch.Tensor:
        self._hist_cache[name] = (self._stamp(deps), value)
        return value

    def _sparse_product(self, name: str, matrix: torch.Tensor, table: nn.Embedding):
        # Training: the batch's rows only (a full product per step would cost all ratings every step,
        # so an epoch would grow as ratings squared). Inference: every row once, cached until the
        # matrix or the table changes.
        if self.training:
            return _SparseRows(self._training_csr(name, matrix), table, self.cfg.history_sample, self._csr_memo[name])
        deps = (matrix, table.weight)
        cached = self._cached(name, deps)
        if cached is None:
            cached = self._store(name, deps, torch.sparse.mm(matrix, table.weight).detach())
        return cached

    def _training_csr(self, name: str, matrix: torch.Tensor) -> torch.Tensor:
        # A CSR copy per history matrix, kept across epochs and eval()/train() switches (at 10M ratings a
        # copy takes seconds), rebuilt only if the matrix itself changes (loading other weights).
        stamp = self._stamp((matrix,))
        hit = self._csr.get(name)
        if hit is None or hit[0] != stamp:
            csr = matrix.coalesce().to_sparse_csr()
            # Matrices over the same (row, column) pattern share their draw of positions.
            same = next((k for k, (_, m) in self._csr.items() if k != name and m.shape == csr.shape
                         and torch.equal(m.crow_indices(), csr.crow_indices())
                         and torch.equal(m.col_indices(), csr.col_indices())), None)
            self._csr[name] = (stamp, csr)
            self._csr_memo[name] = self._csr_memo[same] if same else {}
        return self._csr[name][1]

    def training_cache(self, keep: bool) -> None:
        """Build the CSR copies of the history matrices before the first timed batch (keep=True), or free
        them once training is over (keep=False)."""
        if not keep:
            self._csr, self._csr_memo = {}, {}
            return
        for name in ("hist", "hist_r", "item_hist_r"):
            if hasattr(self, name):
                self._training_csr(name, getattr(self, name))

    def _with_session(self, h: torch.Tensor, user, table: nn.Embedding, session_items, weights) -> torch.Tensor:
        """A user's history vector (sum over n rated items / sqrt(n)) with the session's items added:
        (h * sqrt(n) + sum_s w_s * table[i_s]) / sqrt(n + |s|)."""
        n = self.user_count[user]
        mask = (session_items > 0).float()
        extra = (table(session_items) * (weights * mask).unsqueeze(-1)).sum(1)
        s = mask.sum(1)
        return (h * n.sqrt().unsqueeze(-1) + extra) / (n + s).clamp(min=1.0).sqrt().unsqueeze(-1)

    def forward(self, user, item, text, demo, self_r=None, real_user=None, real_item=None,
                session_items=None, session_r=None, own_watch=None, head: str = "rating", pool_item=None,
                pool_text=None, n_rated: int | None = None):
        """Logits [batch, n_classes] for index tensors from FeatureTables.encode.

        self_r: the pair's own centred rating when it is in the histories (it is taken out of them);
        real_user/real_item: the ids before training masked some to the unknown row.
        session_items [batch, S] (item rows, 0 = padding) and session_r [batch, S] (centred ratings):
        a session's ratings join the user's history tokens as if they were training ratings, which
        makes the model a predictor of the next rating given the history (a world model).
        own_watch [batch]: 1 where the pair's movie is among the user's rated movies (a training pick),
        taken out of the implicit-history token, so a pick never announces itself to the choice head.
        head: "rating" (logits [batch, n_classes]), "choice" (the pick logit [batch]) or "both"; with the
        "dot" scorer, "both" also scores every row's user against the pool_item movies (rows of the item
        and text tables): (rating logits, pick logits [batch], pool logits [batch, pool]). n_rated ("joint",
        "both"): only the first n_rated rows get rating logits (the rest are unrated draws: no rating to fit)."""
        tokens = [self.user_emb(user), self.item_vectors(item, text)]
        if self.cfg.user_features:
            a, g, o = self.demo[demo].unbind(-1)
            tokens.append(self.age_emb(a) + self.gender_emb(g) + self.occ_emb(o))
        session = session_items is not None
        if self.cfg.history:
            h = self._sparse_product("hist", self.hist, self.hist_emb)[user]
            if own_watch is not None:
                ru = user if real_user is None else real_user
                ri = item if real_item is None else real_item
                own = own_watch * (user == ru) * self.user_count[ru].clamp(min=1.0).rsqrt()
                h = h - own.unsqueeze(-1) * self.hist_emb(ri)
            if session:
                h = self._with_session(h, user, self.hist_emb, session_items, torch.ones_like(session_r))
            tokens.append(h)
        if self.cfg.history_ratings:
            hu = self._sparse_product("hist_r", self.hist_r, self.hist_r_emb)[user]
            if session:
                hu = self._with_session(hu, user, self.hist_r_emb, session_items, session_r)
            hi = self._sparse_product("item_hist_r", self.item_hist_r, self.item_hist_r_emb)[item]
            if self_r is not None:
                ru = user if real_user is None else real_user
                ri = item if real_item is None else real_item
                # A masked (unknown) side has an empty history: nothing to take out of it.
                own_u = torch.where(user == ru, self_r, 0.0) * self.user_norm[ru]
                own_i = torch.where(item == ri, self_r, 0.0) * self.item_norm[ri]
                hu = hu - own_u.unsqueeze(-1) * self.hist_r_emb(ri)
                hi = hi - own_i.unsqueeze(-1) * self.item_hist_r_emb(ru)
            tokens += [hu, hi]
        x = torch.stack(tokens, dim=1) + self.type_emb
        if head in ("choice", "both") and not self.has_choice:
            raise ValueError("this reward model has no choice head (reward.choice_weight was 0)")
        if self.choice_user is not None and self.cfg.choice_shared_pass:
            enc = self.norm(self.encoder(x, mask=self.attn_mask))
            if head == "rating":
                return self.head(enc.flatten(1))
            user_vec = self.choice_user(enc[:, self.user_tokens].flatten(1))
            pick = self._dot_pick(user_vec, tokens[1], user, item, own_watch)
            if head == "choice":
                return pick
            return self.head(enc.flatten(1)), pick, self._dot_pool(user_vec, user, pool_item, pool_text)
        if self.choice_user is not None and head != "rating":
            user_vec = self.choice_user(self._encode(x[:, self.user_tokens]))
            pick = self._dot_pick(user_vec, tokens[1], user, item, own_watch)
            if head == "choice":
                return pick
            # One forward for both losses (DDP wants every parameter used once per step).
            return self.head(self._encode(x)), pick, self._dot_pool(user_vec, user, pool_item, pool_text)
        x = self._encode(x)
        if head == "rating":
            return self.head(x)
        xc = torch.cat([x, self.choice_features(user, item, own_watch)], -1) if self.pop_features else x
        if head == "choice":
            return self.choice_head(xc).squeeze(-1)
        return self.head(x if n_rated is None else x[:n_rated]), self.choice_head(xc).squeeze(-1)

    def choice_features(self, user: torch.Tensor, item: torch.Tensor, own_watch=None) -> torch.Tensor:
        """[batch, 2]: log(1 + the movie's training picks by OTHER users) and log(1 + the user's training ratings),
        standardised. A training pick is taken out of its movie's count (else a pick would announce itself);
        the user's count is the same for their picks and their unrated movies, so it is left whole."""
        picks = self.pop_counts[item]
        if own_watch is not None:
            picks = (picks - own_watch).clamp(min=0.0)
        return self._popularity(picks, self.user_count[user])

    def _popularity(self, picks: torch.Tensor, activity: torch.Tensor) -> torch.Tensor:
        raw = torch.stack(torch.broadcast_tensors(torch.log1p(picks), torch.log1p(activity)), -1)
        return (raw - self.pop_stats[0]) / self.pop_stats[1]

    def _pop_pool(self, user: torch.Tensor, pool_item: torch.Tensor) -> torch.Tensor:
        """The "dot" head's popularity term for every row's user against the pool movies: [B, M] (a pool movie
        the user rated has weight 0 in the loss, so nothing is taken out of its count)."""
        return self._popularity(self.pop_counts[pool_item][None, :], self.user_count[user][:, None]) \
            @ self.choice_pop.weight[0]

    @property
    def has_choice(self) -> bool:
        return self.choice_head is not None or self.choice_user is not None

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.encoder(x)).flatten(1)

    def _dot_pick(self, user_vec, item_vec, user, item, own_watch) -> torch.Tensor:
        pick = self.pick_logits(user_vec, item_vec)
        return pick + self.choice_features(user, item, own_watch) @ self.choice_pop.weight[0] if self.pop_features \
            else pick

    def _dot_pool(self, user_vec, user, pool_item, pool_text) -> torch.Tensor:
        pool = self.pool_logits(user_vec, self.item_vectors(pool_item, pool_text))
        return pool + self._pop_pool(user, pool_item) if self.pop_features else pool

    def pick_logits(self, user_vec: torch.Tensor, item_vec: torch.Tensor) -> torch.Tensor:
        """The "dot" choice head, row by row: user_vec [B, d], item_vec [B, d] (item_vectors) -> [B]."""
        v = self.choice_item(item_vec)
        return (user_vec * v[:, :-1]).sum(-1) + v[:, -1]

    def pool_logits(self, user_vec: torch.Tensor, item_vec: torch.Tensor) -> torch.Tensor:
        """The "dot" choice head, every user against every movie: [B, d] x [M, d] -> [B, M]."""
        v = self.choice_item(item_vec)
        return user_vec @ v[:, :-1].T + v[:, -1]

    def expected(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, -1) @ self.class_values
