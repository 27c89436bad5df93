"""One linear training loop: listwise softmax over recall lists, early stopping on validation."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from training.lists import Lists
from training.metrics import ndcg_at, ranked_positions
from training.model import Reranker
from training.progress import progress


@dataclass
class TrainConfig:
    # Chosen on validation NDCG@10 (scripts/tune.py; the variants and their scores are in
    # docs/model.md): 8 epochs score within 0.0005 of 10 (ctx8 against the list layer's
    # 10 epochs), and the fused pipeline's two SASRec fits need the 2.5 epochs' minutes.
    epochs: int = 8
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    # OneCycle anneals the learning rate in the last epochs, where validation NDCG usually
    # peaks; a patience of 3 rides out a dip of two epochs before them.
    patience: int = 3  # epochs without a better validation NDCG@10 before stopping
    # Also try the mean of the weights of the last `average_last` epochs (0: off), and keep
    # it when its validation NDCG@10 beats the best single epoch's.
    average_last: int = 3
    seed: int = 0
    threads: int = 2
    # The training's own time cap, for the pipeline's direct callers (scripts/tune.py,
    # scripts/cold_eval.py); `rerank train` sets it to its --max-minutes and also stops at
    # that budget's end, counted from the command's start. A run a cap stops early ends
    # with another model than the committed one.
    max_minutes: float = 13.0

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def set_seed(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(threads)
    # Same seed, same weights: without it some backward kernels add up in an order the
    # threads decide, two runs part in the first epoch, and a variant's validation score
    # carries that noise. The cost is small (docs/model.md).
    torch.use_deterministic_algorithms(True)
    # Softmax over padded histories leaves denormal floats in the backward pass; on CPU
    # they make a training step five times slower.
    torch.set_flush_denormal(True)


def _tensors(
    lists: Lists, idx: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """History, candidates, target position and recall features (None: the defaults)."""
    return (
        torch.from_numpy(lists.hist[idx]),
        torch.from_numpy(lists.cand[idx]),
        torch.from_numpy(lists.target[idx]),
        None if lists.feats is None else torch.from_numpy(lists.feats[idx]),
    )


@torch.no_grad()
def predict(model: Reranker, lists: Lists, batch_size: int = 512) -> np.ndarray:
    """Scores (M, N) of every candidate list, in eval mode."""
    model.eval()
    out = []
    for start in range(0, len(lists), batch_size):
        idx = np.arange(start, min(start + batch_size, len(lists)))
        hist, cand, _, feats = _tensors(lists, idx)
        scores, _ = model(hist, cand, torch.zeros(len(idx), dtype=torch.long), feats)
        out.append(scores.numpy())
    return np.concatenate(out)


def evaluate_ndcg(model: Reranker, lists: Lists) -> float:
    return float(ndcg_at(ranked_positions(predict(model, lists), lists.target)).mean())


def train(
    model: Reranker,
    train_lists: Lists,
    val_lists: Lists,
    cfg: TrainConfig,
    deadline: float | None = None,
) -> tuple[Reranker, list[dict[str, float]]]:
    """Train with AdamW; return the model of the best validation epoch and the log.

    Training stops ``cfg.max_minutes`` after it starts, or at ``deadline`` (a
    ``time.monotonic()`` instant) if that comes first."""
    set_seed(cfg.seed, cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * ((len(train_lists) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    best, best_state, stale, log = -1.0, copy.deepcopy(model.state_dict()), 0, []
    recent: list[dict[str, torch.Tensor]] = []  # the last epochs' weights, for averaging
    started = time.monotonic()
    stop_at = started + cfg.max_minutes * 60
    if deadline is not None:
        stop_at = min(stop_at, deadline)
    for epoch in range(cfg.epochs):
        model.train()
        order = rng.permutation(len(train_lists))
        total, seen = 0.0, 0
        starts = range(0, len(order), cfg.batch_size)
        for start in progress(starts, len(starts), f"epoch {epoch}"):
            batch = order[start : start + cfg.batch_size]
            hist, cand, target, feats = _tensors(train_lists, batch)
            _, loss = model(hist, cand, target, feats)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(target)
            seen += len(target)
            # The cap holds within an epoch too: one epoch of a large list set takes minutes.
            # A run that ends under it never takes this branch.
            if time.monotonic() >= stop_at:
                break
        val = evaluate_ndcg(model, val_lists)
        minutes = (time.monotonic() - started) / 60
        loss = total / seen
        log.append({"epoch": epoch, "loss": loss, "val_ndcg@10": val, "min": minutes,
                    "lists": seen})  # fmt: skip
        print(f"epoch {epoch:2d} loss {loss:.4f} val ndcg@10 {val:.4f} ({minutes:.1f} min)")
        if cfg.average_last:
            recent = [*recent, copy.deepcopy(model.state_dict())][-cfg.average_last :]
        if val > best:
            best, best_state, stale = val, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
        if stale >= cfg.patience or time.monotonic() >= stop_at:
            break
    if len(recent) > 1:
        model.load_state_dict(_mean_state(recent))
        val = evaluate_ndcg(model, val_lists)
        # epoch -n in the log: the mean of the last n epochs' weights
        log.append({"epoch": -len(recent), "val_ndcg@10": val,
                    "min": (time.monotonic() - started) / 60})  # fmt: skip
        print(f"mean of the last {len(recent)} epochs: val ndcg@10 {val:.4f}")
        if val > best:
            return model.eval(), log
    model.load_state_dict(best_state)
    return model.eval(), log


def _mean_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point weights; other tensors from the last state."""
    last = states[-1]
    return {
        name: torch.stack([s[name] for s in states]).mean(0) if t.is_floating_point() else t
        for name, t in last.items()
    }
