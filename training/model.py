"""The deep reranker: item tower, causal user encoder, target-attention MLP scorer with one
attention layer from every candidate to the head of its list.

Two paths share the weights and nothing else:

- training: ``ItemTower`` turns item indices into vectors, then ``Reranker.score`` runs on them;
- serving: ``Reranker.score(hist, hist_mask, cand, cand_mask, cand_rank[, cand_feats])`` is
  the exact function exported to ONNX; the service feeds it the vectors the item tower
  produced offline, and the per-candidate recall features when the model declares them.

Only ``nn.Module``s and their config live here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

# Raw candidate features are clipped here before their signed log: a score of any scale, or
# one that overflowed float32 on its way in, stays finite.
FEAT_CLIP = 1e6

# Large negative instead of -inf so that a row whose keys are all padding (an empty history)
# still gives a finite softmax, and therefore finite scores.
NEG = -1e4


@dataclass
class ModelConfig:
    n_items: int  # rows of the item tables, index 0 is padding
    dim: int = 64  # D, the size of an item vector
    history_len: int = 50  # L, the longest history the encoder reads
    text_dim: int = 384  # MiniLM sentence embedding
    n_attrs: int = 19  # categorical attribute values, multi-hot (MovieLens: 19 genres)
    n_cf: int = 32  # collaborative factors per item (co-occurrence and transition SVD)
    n_stats: int = 4  # numeric item statistics and attributes (see training/features.py)
    # The last n_numeric of the n_stats columns are the item's numeric attributes, which a
    # new item has; the others are usage statistics, which it has not.
    n_numeric: int = 0
    # Per item and training step, the probability that the item is seen "cold": its id
    # embedding, collaborative factors and usage statistics replaced by a learned unknown
    # vector, as for an item added after training (POST /items).
    id_dropout: float = 0.0
    n_heads: int = 2
    n_layers: int = 2
    hidden: int = 64  # scorer MLP width
    dropout: float = 0.2
    max_rank: int = 1000  # cand_rank values are clipped here
    list_context: bool = True  # candidates attend to each other before they are scored
    # ... to the first context_size candidates of the list only: a list of 1000 then costs
    # 10x a list of 100, not 100x, and the service's memory stays within its standard
    # (docs/model.md gives the figures).
    context_size: int = 100
    # Per-candidate recall features (the ONNX input cand_feats, F columns; 0: none), the
    # value each takes when a candidate lacks it, and the share of training lists whose
    # features are all set to those defaults, so that lists of plain ids still rank well.
    n_feats: int = 0
    feat_defaults: tuple[float, ...] = ()
    feat_dropout: float = 0.3
    # ... and the share of the other lists' candidates whose features are set to the
    # defaults one by one, so that a plain id among featured candidates (an item added after
    # training, which no recall channel knows) is ranked on its vector, not taken for a
    # candidate that every channel missed.
    cand_feat_dropout: float = 0.0
    # Whether a candidate on the cold path (id dropout) also has the feature defaults in
    # that step: an item added after training is both, since no recall channel knows it.
    cold_without_features: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.n_items < 2:
            raise ValueError(f"n_items={self.n_items}: need padding plus at least one item")
        if self.history_len < 1:
            raise ValueError(f"history_len={self.history_len} must be >= 1")
        if not 0 <= self.n_numeric <= self.n_stats:
            raise ValueError(f"n_numeric={self.n_numeric} must be in 0..n_stats={self.n_stats}")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"id_dropout={self.id_dropout} must be in [0, 1)")
        self.feat_defaults = tuple(float(v) for v in self.feat_defaults)
        if len(self.feat_defaults) != self.n_feats:
            raise ValueError(
                f"feat_defaults has {len(self.feat_defaults)} values for n_feats={self.n_feats}"
            )
        for name in ("feat_dropout", "cand_feat_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """From a manifest's ``model_config``; ``n_genres`` is the older name of ``n_attrs``."""
        d = dict(d)
        if "n_genres" in d:
            d["n_attrs"] = d.pop("n_genres")
        return cls(**d)


class ItemTower(nn.Module):
    """Item index -> item vector of size D, from an id embedding and fixed item features.

    Two paths share the projections. Warm (every catalogue item, as served from
    item_vectors.npy): id embedding + text + attributes + collaborative factors + all
    statistics. Cold (an item added after training, ``cold``; exported as
    item_tower.onnx): a learned unknown vector in place of what only training interactions
    give (the id embedding, the collaborative factors, the usage statistics) + text +
    attributes + numeric attributes. In training, id dropout sends each item down the cold
    path with probability ``cfg.id_dropout`` per step, so the cold path learns to place an
    item from its content.
    """

    text: Tensor  # the buffers below
    attrs: Tensor
    cf: Tensor
    stats: Tensor

    def __init__(
        self,
        cfg: ModelConfig,
        text: Tensor,  # (n_items, text_dim) MiniLM embeddings, row 0 zeros
        attrs: Tensor,  # (n_items, n_attrs) multi-hot of categorical attribute values
        cf: Tensor,  # (n_items, n_cf) collaborative factors
        stats: Tensor,  # (n_items, n_stats) standardised statistics, numeric attributes last
    ) -> None:
        super().__init__()
        self.register_buffer("text", text.float())
        self.register_buffer("attrs", attrs.float())
        self.register_buffer("cf", cf.float())
        self.register_buffer("stats", stats.float())
        self.id_dropout = cfg.id_dropout
        self.n_usage = cfg.n_stats - cfg.n_numeric
        self.id_emb = nn.Embedding(cfg.n_items, cfg.dim, padding_idx=0)
        nn.init.normal_(self.id_emb.weight, std=0.02)
        self.unknown = nn.Parameter(torch.zeros(cfg.dim))  # the cold path's id, cf and usage
        self.text_proj = nn.Linear(cfg.text_dim, cfg.dim)
        # A catalogue without categorical attributes has no attribute term at all.
        self.attr_proj = nn.Linear(cfg.n_attrs, cfg.dim) if cfg.n_attrs else None
        self.cf_proj = nn.Linear(cfg.n_cf, cfg.dim)
        self.stats_proj = nn.Linear(cfg.n_stats, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        # Rows that take the cold path in eval mode too (the held-out measurement).
        self.cold_rows: Tensor | None = None
        # The rows id dropout sent down the cold path in the last training step's table.
        self.dropped: Tensor | None = None

    def content(self, text: Tensor, attrs: Tensor, numeric: Tensor) -> Tensor:
        """What both paths share, before the norm: (B, text_dim), (B, n_attrs) and
        (B, n_numeric) -> (B, D). The statistics' bias belongs here."""
        w, b = self.stats_proj.weight, self.stats_proj.bias
        x = self.text_proj(text) + nn.functional.linear(numeric, w[:, self.n_usage :], b)
        if self.attr_proj is not None:
            x = x + self.attr_proj(attrs)
        return x

    def cold(self, text: Tensor, attrs: Tensor, numeric: Tensor) -> Tensor:
        """The cold path, item_tower.onnx: content alone -> item vectors (B, D)."""
        return self.norm(self.unknown + self.content(text, attrs, numeric))

    def table(self) -> Tensor:
        """Vectors of all rows, padding included. (n_items, D)

        Projecting the whole catalogue once per step is far cheaper than projecting the
        384-wide text of every (batch x list) position.
        """
        shared = self.content(self.text, self.attrs, self.stats[:, self.n_usage :])
        usage = nn.functional.linear(self.stats[:, : self.n_usage],
                                     self.stats_proj.weight[:, : self.n_usage])  # fmt: skip
        warm = self.id_emb.weight + self.cf_proj(self.cf) + usage
        cold = self.cold_rows
        self.dropped = None
        if self.training and self.id_dropout > 0:
            dropped = torch.rand(warm.shape[0], device=warm.device) < self.id_dropout
            cold = dropped if cold is None else cold | dropped
            self.dropped = dropped
        if cold is not None:
            warm = torch.where(cold[:, None], self.unknown, warm)
        return self.norm(shared + warm)

    def forward(self, *idx: Tensor) -> tuple[Tensor, ...]:
        """Vectors for each index tensor, from one table: (..., D) each."""
        table = self.table()
        return tuple(self.drop(table[i]) for i in idx)

    @torch.no_grad()
    def all_vectors(self) -> Tensor:
        """Vectors of every real item (rows 1..n_items-1), as served. (n_items-1, D)"""
        return self.table()[1:]

    @torch.no_grad()
    def cold_vectors(self) -> Tensor:
        """The cold path's vector of every real item. (n_items-1, D)"""
        return self.cold(self.text, self.attrs, self.stats[:, self.n_usage :])[1:]


def signed_log(x: Tensor) -> Tensor:
    """sign(x) * log(1 + |x|) of ``x`` clipped to +-FEAT_CLIP: ranks (1..1000) and scores
    of any channel's scale on one footing, with no statistics of the list or the data."""
    x = x.clamp(-FEAT_CLIP, FEAT_CLIP)
    return torch.sign(x) * torch.log1p(x.abs())


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last axis where mask is true; all-false rows give finite weights."""
    return torch.softmax(logits.masked_fill(~mask, NEG), dim=-1)


def multi_head_attention(
    q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, n_heads: int, scale: float
) -> Tensor:
    """Dot-product attention over ``n_heads`` heads: q (B, Nq, D), k and v (B, Nk, D),
    ``allowed`` broadcastable to (B, heads, Nq, Nk) -> (B, Nq, D). ``scale`` is a Python
    float (1 / sqrt(D / heads)): computed from traced shapes, export could not turn it into
    a constant."""
    b, n, d = q.shape
    q, k, v = (t.reshape(b, -1, n_heads, d // n_heads).transpose(1, 2) for t in (q, k, v))
    logits = (q @ k.transpose(-1, -2)) * scale  # (B, heads, Nq, Nk)
    weights = masked_softmax(logits, allowed)
    return (weights @ v).transpose(1, 2).reshape(b, n, d)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.scale = 1.0 / math.sqrt(dim // n_heads)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        # x (B, L, D); allowed (B, 1, L, L): query i may read key j
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(multi_head_attention(q, k, v, allowed, self.n_heads, self.scale))


class Block(nn.Module):
    """Pre-norm Transformer block."""

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, n_heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x), allowed)
        return x + self.mlp(self.ln2(x))


class ListContext(nn.Module):
    """One pre-norm attention layer in which every candidate reads the head of its list (the
    first ``size`` candidates; no positions: the rank is already a feature). Padded
    candidates are never read."""

    def __init__(self, dim: int, n_heads: int, dropout: float, size: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.size = size
        self.scale = 1.0 / math.sqrt(dim // n_heads)
        self.ln = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        # x (B, N, H), mask (B, N)
        y = self.ln(x)
        k, v = self.kv(y[:, : self.size]).chunk(2, dim=-1)  # the head: K = min(N, size)
        allowed = mask[:, None, None, : self.size]  # (B, 1, 1, K)
        context = multi_head_attention(self.q(y), k, v, allowed, self.n_heads, self.scale)
        return x + self.drop(self.out(context))


class UserEncoder(nn.Module):
    """Causal Transformer over right-aligned history vectors; the state is read at the newest."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # Positions count back from the newest item, so a shorter L means the same positions.
        self.pos_emb = nn.Embedding(cfg.history_len, cfg.dim)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_layers)
        )
        self.ln = nn.LayerNorm(cfg.dim)
        self.empty = nn.Parameter(torch.zeros(cfg.dim))  # the state of a user with no history

    def forward(self, hist: Tensor, hist_mask: Tensor) -> Tensor:
        # hist (B, L, D), hist_mask (B, L) -> user state (B, D)
        n = hist.shape[1]
        recency = n - 1 - torch.arange(n, device=hist.device)  # (L,) newest = 0
        x = hist + self.pos_emb(recency)
        causal = torch.ones(n, n, dtype=torch.bool, device=hist.device).tril()  # (L, L)
        allowed = causal[None, None] & hist_mask[:, None, None, :]  # (B, 1, L, L)
        for block in self.blocks:
            x = block(x, allowed)
        state = self.ln(x[:, -1])  # (B, D)
        has_history = hist_mask.any(dim=1, keepdim=True)  # (B, 1)
        return torch.where(has_history, state, self.empty)


class Reranker(nn.Module):
    """Scores candidates for a user; ``score`` is the serving graph."""

    feat_default: Tensor  # (F,) a buffer: the value of each feature when absent

    def __init__(self, cfg: ModelConfig, tower: ItemTower) -> None:
        super().__init__()
        self.cfg = cfg
        self.tower = tower
        self.encoder = UserEncoder(cfg)
        d = cfg.dim
        self.att_q = nn.Linear(d, d)
        self.att_k = nn.Linear(d, d)
        self.att_v = nn.Linear(d, d)
        # A learned, asymmetric "watched A, then B" score between history items and a
        # candidate: the transition signal that item-kNN's symmetric cosine cannot express.
        self.from_proj = nn.Linear(d, d)
        self.to_proj = nn.Linear(d, d)
        self.decay = nn.Parameter(torch.tensor(0.3))  # recency decay of the transition sum
        # The scorer MLP's first layer, split in two: the user part is computed once per
        # user and broadcast over its N candidates instead of once per candidate.
        # Per candidate: [cand, state*cand, context, cand*context] + 2 rank + 3 similarity
        # + 3 transition.
        self.user_in = nn.Linear(d, cfg.hidden)
        self.cand_in = nn.Linear(4 * d + 8, cfg.hidden)
        self.mlp = nn.Sequential(
            nn.GELU(),
            nn.Linear(cfg.hidden, cfg.hidden // 2),
            nn.GELU(),
            nn.Linear(cfg.hidden // 2, 1),
        )
        # A candidate's worth depends on the rest of the list (the best of five similar
        # films, the one outlier among sequels): one attention layer across its head.
        self.context = (
            ListContext(cfg.hidden, cfg.n_heads, cfg.dropout, cfg.context_size)
            if cfg.list_context
            else None
        )
        # How recall found each candidate (its rank and score per channel), projected into
        # the candidate's hidden state; a candidate that carries only defaults adds the
        # bias alone, as the signed logs are taken relative to the defaults'.
        self.register_buffer("feat_default", torch.tensor(cfg.feat_defaults, dtype=torch.float32))
        self.feat_in = nn.Linear(cfg.n_feats, cfg.hidden) if cfg.n_feats else None

    def score(
        self,
        hist: Tensor,  # (B, L, D) oldest -> newest, right-aligned
        hist_mask: Tensor,  # (B, L) bool
        cand: Tensor,  # (B, N, D)
        cand_mask: Tensor,  # (B, N) bool
        cand_rank: Tensor,  # (B, N) position in the caller's list, 0 = first
        cand_feats: Tensor | None = None,  # (B, N, F) raw recall features; None: defaults
    ) -> tuple[Tensor, Tensor]:
        """Returns scores (B, N) and candidate->history attention (B, N, L)."""
        state = self.encoder(hist, hist_mask)  # (B, D)
        scale = 1.0 / math.sqrt(self.cfg.dim)
        logits = (self.att_q(cand) @ self.att_k(hist).transpose(1, 2)) * scale  # (B, N, L)
        attn = masked_softmax(logits, hist_mask[:, None, :])  # (B, N, L)
        attn = attn * hist_mask[:, None, :].float()  # exact zeros on padding, empty rows all 0
        context = attn @ self.att_v(hist)  # (B, N, D)
        # Cosine similarity of a candidate to each history item: the item-to-item signal
        # that item-kNN recall is built on, read off the learned vectors.
        cn = nn.functional.normalize(cand, dim=-1)
        hn = nn.functional.normalize(hist, dim=-1)
        sims = (cn @ hn.transpose(1, 2)).masked_fill(~hist_mask[:, None, :], 0.0)  # (B, N, L)
        n_hist = hist_mask.float().sum(dim=1).clamp(min=1.0)[:, None]  # (B, 1)
        sim_max = sims.masked_fill(~hist_mask[:, None, :], -1.0).amax(dim=-1)  # (B, N)
        sim_mean = sims.sum(dim=-1) / n_hist  # (B, N)
        sim_last = sims[:, :, -1]  # (B, N) the newest item (0 when padding)
        trans = (self.to_proj(cand) @ self.from_proj(hist).transpose(1, 2)) * scale  # (B, N, L)
        trans = trans.masked_fill(~hist_mask[:, None, :], 0.0)
        n = hist.shape[1]
        recency = (n - 1 - torch.arange(n, device=hist.device)).float()  # (L,) newest = 0
        weight = torch.exp(-self.decay.abs() * recency)[None, :] * hist_mask.float()  # (B, L)
        weight = weight / weight.sum(dim=1, keepdim=True).clamp(min=1e-6)
        trans_recent = (trans * weight[:, None, :]).sum(dim=-1)  # (B, N)
        trans_max = trans.masked_fill(~hist_mask[:, None, :], NEG).amax(dim=-1)  # (B, N)
        has_history = hist_mask.any(dim=1, keepdim=True)  # (B, 1)
        trans_max = torch.where(has_history, trans_max, torch.zeros_like(trans_max))
        trans_last = trans[:, :, -1]  # (B, N)
        rank = cand_rank.clamp(0, self.cfg.max_rank)
        per_cand = torch.cat(
            [
                cand,
                state[:, None, :] * cand,
                context,
                cand * context,
                torch.log1p(rank)[..., None],
                (rank / 100.0)[..., None],
                sim_max[..., None],
                sim_mean[..., None],
                sim_last[..., None],
                trans_recent[..., None],
                trans_max[..., None],
                trans_last[..., None],
            ],
            dim=-1,
        )  # (B, N, 4D+8)
        hidden = self.user_in(state)[:, None, :] + self.cand_in(per_cand)  # (B, N, hidden)
        if self.feat_in is not None:
            default = self.feat_default
            if cand_feats is None:
                cand_feats = default.expand(*cand.shape[:2], -1)
            feats = signed_log(cand_feats) - signed_log(default)  # (B, N, F)
            hidden = hidden + self.feat_in(feats)
        if self.context is not None:
            hidden = self.context(hidden, cand_mask)
        scores = self.mlp(hidden).squeeze(-1)  # (B, N)
        scores = scores.masked_fill(~cand_mask, NEG)
        return scores, attn

    def forward(
        self,
        hist_idx: Tensor,  # (B, L) item indices, 0 = padding
        cand_idx: Tensor,  # (B, N) item indices, 0 = padding
        target: Tensor,  # (B,) position of the true next item in the candidate list
        feats: Tensor | None = None,  # (B, N, F) recall features; None: the defaults
    ) -> tuple[Tensor, Tensor]:
        """Training path: listwise softmax cross-entropy over each candidate list.

        In training mode a list's features are all set to the defaults with probability
        ``feat_dropout``, as a request of plain ids has them, and each other candidate's
        with probability ``cand_feat_dropout``, as an added item has them; with
        ``cold_without_features``, also each candidate on the item tower's cold path."""
        hist_mask = hist_idx > 0
        cand_mask = cand_idx > 0
        rank = torch.arange(cand_idx.shape[1], device=cand_idx.device, dtype=torch.float32)
        rank = rank.expand(cand_idx.shape[0], -1)
        hist, cand = self.tower(hist_idx, cand_idx)
        if feats is not None and self.training:
            shape = feats.shape[:2]
            dropped = torch.rand(shape[0], 1, 1, device=feats.device) < self.cfg.feat_dropout
            each = torch.rand(*shape, 1, device=feats.device) < self.cfg.cand_feat_dropout
            if self.cfg.cold_without_features and self.tower.dropped is not None:
                each = each | self.tower.dropped[cand_idx][..., None]
            feats = torch.where(dropped | each, self.feat_default, feats)
        scores, _ = self.score(hist, hist_mask, cand, cand_mask, rank, feats)
        loss = nn.functional.cross_entropy(scores, target)
        return scores, loss


class ColdTowerGraph(nn.Module):
    """The item tower's cold path as ONNX export traces it: item_tower.onnx
    (contract/items.py). ``attrs`` holds the categorical columns, then the numeric ones."""

    def __init__(self, tower: ItemTower, n_attrs: int) -> None:
        super().__init__()
        self.tower = tower
        self.n_attrs = n_attrs

    def forward(self, text_vec: Tensor, attrs: Tensor) -> Tensor:
        # text_vec (B, text_dim), attrs (B, n_attrs + n_numeric) -> (B, D)
        return self.tower.cold(text_vec, attrs[:, : self.n_attrs], attrs[:, self.n_attrs :])


class ScoreGraph(nn.Module):
    """The serving function alone, as a module ONNX export can trace."""

    def __init__(self, model: Reranker) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        hist: Tensor,
        hist_mask: Tensor,
        cand: Tensor,
        cand_mask: Tensor,
        cand_rank: Tensor,
        cand_feats: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        return self.model.score(hist, hist_mask, cand, cand_mask, cand_rank, cand_feats)
