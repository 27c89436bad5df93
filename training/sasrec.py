"""A SASRec-style recall channel: causal self-attention over the last L items predicts the
next item (Kang and McAuley, 2018), trained with a full softmax over the catalogue.

Training reads the training split only: every prefix of a training sequence predicts its
next item (windows of L + 1 items cut from the end of each sequence). Early stopping reads
the validation item, predicted from the training history; the test item is never read.
Past ``full_softmax_max`` items, the softmax runs over the target and ``n_negatives``
items drawn uniformly for the whole batch (targets that a draw hits are masked out).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from training.lists import right_align
from training.metrics import ndcg_at
from training.recall import by_chunks, seen_mask, top_n
from training.train import set_seed


@dataclass
class SASRecConfig:
    history_len: int = 50  # L
    dim: int = 64  # D
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    lr: float = 3e-3
    batch_size: int = 128
    max_epochs: int = 200
    patience: int = 5  # epochs without a better validation NDCG@10
    max_minutes: float = 5.0
    full_softmax_max: int = 20_000  # past this many items: sampled softmax
    n_negatives: int = 4096
    # Early stopping reads at most this many users' validation items (a seeded sample past
    # it): each epoch's check scores them against the whole catalogue.
    val_users: int = 5_000
    seed: int = 0
    threads: int = 2

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


class SASRec(nn.Module):
    """Item and position embeddings, pre-norm causal Transformer blocks, tied output."""

    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item = nn.Embedding(n_items + 1, cfg.dim, padding_idx=0)
        self.pos = nn.Embedding(cfg.history_len, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                cfg.dim,
                cfg.n_heads,
                cfg.dim * 2,
                cfg.dropout,
                batch_first=True,
                norm_first=True,
            )
            for _ in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        # Hidden states leave a LayerNorm (norm about sqrt(D)); item vectors of norm about 1
        # keep the tied output's logits near unit scale at the start.
        nn.init.normal_(self.item.weight, std=cfg.dim**-0.5)
        nn.init.normal_(self.pos.weight, std=cfg.dim**-0.5)
        with torch.no_grad():
            self.item.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) item rows, right-aligned with 0 padding -> (B, L, D) hidden states."""
        b, length = seq.shape
        real = seq > 0  # (B, L)
        x = self.item(seq) + self.pos.weight[None, -length:]
        x = self.drop(x) * real[..., None]
        # A position sees itself and the real items before it; never a padded key, so no
        # row of the mask is empty.
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        allowed = causal[None] & (real[:, None, :] | torch.eye(length, dtype=torch.bool))
        mask = ~allowed.repeat_interleave(self.cfg.n_heads, dim=0)  # (B * heads, L, L)
        for layer in self.layers:
            x = layer(x, src_mask=mask) * real[..., None]
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., I+1) scores of every item; the padding row scores -inf."""
        out = hidden @ self.item.weight.T
        out[..., 0] = -torch.inf
        return out


def _windows(train: list[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-item targets, (W, L) each, right-aligned: each training sequence cut
    from its end into windows of L + 1 items."""
    inputs, targets = [], []
    for seq in train:
        for end in range(len(seq), 1, -length):
            w = seq[max(0, end - length - 1) : end]
            inputs.append(w[:-1])
            targets.append(w[1:])
    return right_align(inputs, length), right_align(targets, length)


class SASRecRecall:
    """The fitted SASRec model as a recall channel; ``log`` holds the per-epoch record."""

    name = "sasrec"

    def __init__(
        self,
        train: list[np.ndarray],
        n_items: int,
        val: np.ndarray | None = None,
        cfg: SASRecConfig | None = None,
    ) -> None:
        self.cfg = cfg = cfg or SASRecConfig()
        self.n_items = n_items
        set_seed(cfg.seed, cfg.threads)
        self.model = SASRec(n_items, cfg)
        self.log: list[dict[str, float]] = []
        self.minutes = self._fit(train, val)

    @classmethod
    def from_state(
        cls, n_items: int, cfg: SASRecConfig, state: dict[str, torch.Tensor]
    ) -> SASRecRecall:
        """A fitted channel from its saved weights (``model.state_dict()``), without fitting."""
        self = cls.__new__(cls)
        self.cfg, self.n_items, self.log, self.minutes = cfg, n_items, [], 0.0
        self.model = SASRec(n_items, cfg)
        self.model.load_state_dict(state)
        self.model.eval()
        return self

    def _loss(self, seq: torch.Tensor, target: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        hidden = self.model(seq)[target > 0]  # (P, D) positions with a next item
        tgt = target[target > 0]  # (P,)
        if self.n_items <= self.cfg.full_softmax_max:
            return nn.functional.cross_entropy(self.model.logits(hidden), tgt)
        neg = torch.randint(1, self.n_items + 1, (self.cfg.n_negatives,), generator=gen)
        pos_logit = (hidden * self.model.item(tgt)).sum(-1, keepdim=True)  # (P, 1)
        neg_logit = hidden @ self.model.item(neg).T  # (P, S)
        neg_logit = neg_logit.masked_fill(neg[None, :] == tgt[:, None], -torch.inf)
        zero = torch.zeros(len(tgt), dtype=torch.long)
        return nn.functional.cross_entropy(torch.cat([pos_logit, neg_logit], 1), zero)

    def _fit(self, train: list[np.ndarray], val: np.ndarray | None) -> float:
        cfg = self.cfg
        started = time.monotonic()
        inputs, targets = _windows(train, cfg.history_len)
        x_all, y_all = torch.from_numpy(inputs), torch.from_numpy(targets)
        opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        best, best_state, stale = -1.0, copy.deepcopy(self.model.state_dict()), 0
        rows = np.arange(len(train))
        if len(train) > cfg.val_users:
            rng = np.random.default_rng(cfg.seed)
            rows = np.sort(rng.choice(len(train), cfg.val_users, replace=False))
        val_hist = [train[u] for u in rows]
        for epoch in range(cfg.max_epochs):
            self.model.train()
            order = torch.randperm(len(x_all), generator=gen)
            total, seen = 0.0, 0
            for s in range(0, len(order), cfg.batch_size):
                idx = order[s : s + cfg.batch_size]
                loss = self._loss(x_all[idx], y_all[idx], gen)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                seen += len(idx)
                # The cap holds within an epoch too: one epoch of a large set takes minutes.
                if time.monotonic() - started >= cfg.max_minutes * 60:
                    break
            record = {"epoch": epoch + 1, "loss": total / seen, "windows": seen}
            if val is not None:
                items, _ = self.recall(val_hist, 10)
                hit = items == val[rows, None]
                pos = np.where(hit.any(1), hit.argmax(1), -1)
                record["val_ndcg@10"] = float(ndcg_at(pos, 10).mean())
            record["minutes"] = (time.monotonic() - started) / 60
            self.log.append(record)
            score = record.get("val_ndcg@10", -float(record["loss"]))
            if score > best:
                best, best_state, stale = score, copy.deepcopy(self.model.state_dict()), 0
            else:
                stale += 1
            if stale >= cfg.patience or record["minutes"] >= cfg.max_minutes:
                break
        self.model.load_state_dict(best_state)
        self.model.eval()
        return (time.monotonic() - started) / 60

    @torch.no_grad()
    def recall(
        self, histories: list[np.ndarray], n: int, chunk: int = 512
    ) -> tuple[np.ndarray, np.ndarray]:
        was_training = self.model.training
        self.model.eval()

        def part(hist: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            seq = torch.from_numpy(right_align(hist, self.cfg.history_len))
            logits = self.model.logits(self.model(seq)[:, -1]).double().numpy()  # (b, I+1)
            return top_n(logits, seen_mask(hist, logits.shape[1]), n)

        try:
            return by_chunks(histories, chunk, part)
        finally:
            self.model.train(was_training)
