"""``rerank recall``: fused candidate lists for every user, written as ``/rerank`` bodies.

The channels are fitted on the interactions given and nothing else; a channel that was
trained with the model (SASRec) comes from the model folder, which also fixes the channels,
their settings and the fusion weights. Each output line is one user::

    {"user_id": "...", "candidates": [{"id": "...", "features": {"ease_rank": 1, ...}}, ...]}

best first, the user's past items left out. A feature at its default (the channel did not
return the candidate) is left out of ``features``: the service reads it as the default.

The model folder's ``recall/`` (written at export by ``save_recall``; the service never reads
it)::

    recall/channels.json   channel names (in the order of the manifest's candidate_features),
                           the voting ones, RRF weights and k, channel settings, depth
    recall/sasrec.pt       SASRec's weights and config, when the model was trained with it
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.channels import Channel
from training.fusion import RRF, ChannelParams, candidate_features, fit_channels
from training.fusion import run_channels as run_all
from training.sasrec import SASRecConfig, SASRecRecall

if TYPE_CHECKING:
    from training.pipeline import PipelineConfig, Prepared

RECALL_DIR = "recall"
CHANNELS_FILE = "channels.json"
SASREC_FILE = "sasrec.pt"
CHUNK = 2048  # users per pass: channels hold (chunk, items) score matrices


def save_recall(folder: Path, prep: Prepared, cfg: PipelineConfig) -> None:
    """Write ``folder/recall/``: what ``rerank recall --model`` needs to make the lists the
    model was trained on."""
    import torch

    assert prep.fusion is not None
    out = folder / RECALL_DIR
    out.mkdir()
    spec = {
        "channels": list(prep.channel_orders),
        "voting": list(cfg.channels),
        "fusion": {"weights": prep.fusion.weights, "k": prep.fusion.k},
        "depth": cfg.channel_depth,
        "n_candidates": cfg.n_candidates,
        "als_factors": cfg.als_factors,
        "seed": cfg.seed,
        "channel_params": asdict(cfg.channel_params),
        "candidate_features": prep.candidate_features,
        "sasrec": SASREC_FILE if prep.sasrec is not None else None,
    }
    (out / CHANNELS_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    if prep.sasrec is not None:
        torch.save(
            {
                "n_items": prep.sasrec.n_items,
                "config": prep.sasrec.cfg.to_dict(),
                "state_dict": prep.sasrec.model.state_dict(),
            },
            out / SASREC_FILE,
        )


class RecallError(ValueError):
    """The model folder cannot give the recall channels; the message says why."""


class Remapped:
    """A channel fitted on another catalogue's item rows, answering in this one's.

    ``to_inner[row]`` is this catalogue's row in the channel's catalogue (0: unknown to it).
    Histories lose the items the channel does not know; answers lose the items this
    catalogue does not know, the rest moving up so that ranks stay dense.
    """

    def __init__(self, inner: Channel, to_inner: np.ndarray, inner_items: int) -> None:
        self.inner, self.name, self.to_inner = inner, inner.name, to_inner
        self.to_outer = np.zeros(inner_items + 1, dtype=np.int64)
        known = np.flatnonzero(to_inner)
        self.to_outer[to_inner[known]] = known

    def recall(self, histories: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
        mapped = [self.to_inner[h] for h in histories]
        items, scores = self.inner.recall([h[h > 0] for h in mapped], n)
        items = self.to_outer[items]
        scores = np.where(items > 0, scores, -np.inf)
        order = np.argsort(items == 0, axis=1, kind="stable")  # the unknown ones last
        return np.take_along_axis(items, order, 1), np.take_along_axis(scores, order, 1)


def load_spec(model_dir: Path) -> dict[str, Any]:
    path = model_dir / RECALL_DIR / CHANNELS_FILE
    if not path.is_file():
        raise RecallError(
            f"{path}: no such file; this model was exported without its recall channels "
            "(train it again, or leave --model out)"
        )
    spec: dict[str, Any] = json.loads(path.read_text())
    return spec


def load_sasrec(model_dir: Path, item_ids: list[str]) -> Channel:
    """The model's SASRec, answering in the rows of ``item_ids`` (this run's catalogue)."""
    import torch

    saved = torch.load(model_dir / RECALL_DIR / SASREC_FILE, map_location="cpu")
    model_ids = (model_dir / "item_ids.txt").read_text().splitlines()
    channel = SASRecRecall.from_state(
        int(saved["n_items"]), SASRecConfig(**saved["config"]), saved["state_dict"]
    )
    if model_ids == item_ids:
        return channel
    row_of = {item: i + 1 for i, item in enumerate(model_ids)}
    to_inner = np.array([0] + [row_of.get(i, 0) for i in item_ids], dtype=np.int64)
    return Remapped(channel, to_inner, len(model_ids))


def catalogue_ids(given: list[str], model_dir: Path | None, items_file: bool) -> list[str]:
    """This run's item rows: the items file's, else the model's items followed by the new
    ones of the interactions, else the interactions' items."""
    if items_file or model_dir is None:
        return given
    model_ids = (model_dir / "item_ids.txt").read_text().splitlines()
    known = set(model_ids)
    return model_ids + [i for i in given if i not in known]


def sequences(
    users: np.ndarray, items: np.ndarray, times: np.ndarray, item_ids: list[str]
) -> tuple[list[str], list[np.ndarray]]:
    """Every user (first appearance order) and their item rows in time order (file order
    breaks ties); a user with a single interaction counts too."""
    import pandas as pd

    rows = pd.Index(item_ids).get_indexer(items) + 1
    codes, uniques = pd.factorize(pd.Series(users, dtype=object), sort=False)
    order = np.lexsort((np.arange(len(codes)), times, codes))
    ends = np.cumsum(np.bincount(codes, minlength=len(uniques)))[:-1]
    return [str(u) for u in uniques], np.split(rows[order].astype(np.int64), ends)


def fit(
    seqs: list[np.ndarray],
    item_ids: list[str],
    model_dir: Path | None,
    fit_sasrec: bool,
    say: Any = print,
) -> tuple[list[Channel], RRF]:
    """The channels, fitted on ``seqs`` (SASRec from the model folder), and their fusion."""
    n_items = len(item_ids)
    if model_dir is not None:
        spec = load_spec(model_dir)
        names = list(spec["channels"])
        cp = dict(spec["channel_params"])
        cp["sasrec"] = SASRecConfig(**cp["sasrec"])
        params = ChannelParams(**cp)
        fusion = RRF(dict(spec["fusion"]["weights"]), float(spec["fusion"]["k"]))
        factors, seed = int(spec["als_factors"]), int(spec["seed"])
    else:
        from training.pipeline import PipelineConfig

        default = PipelineConfig()
        names = default.all_channels
        params, fusion = default.channel_params, default.channel_params.fusion()
        factors, seed = default.als_factors, default.seed
        if not fit_sasrec:
            names = [c for c in names if c != "sasrec"]
            say("no --model: the sasrec channel is left out (its features take their defaults "
                "in the service); --fit-sasrec fits it here, which takes minutes")  # fmt: skip
    channels: list[Channel] = []
    for name in names:
        if name == "sasrec" and model_dir is not None:
            if spec.get("sasrec"):
                channels.append(load_sasrec(model_dir, item_ids))
            continue
        if name == "als":
            from training.recall import ALSRecall

            channels.append(ALSRecall(seqs, n_items, factors=factors, seed=seed))
        else:
            channels += fit_channels(seqs, n_items, None, params, [name])
    return channels, fusion


def _number(value: float) -> float | int:
    """A compact JSON number: integers as integers, others to 7 significant digits."""
    v = float(value)
    return int(v) if v.is_integer() and abs(v) < 2**53 else float(f"{v:.7g}")


def lines(
    users: list[str],
    seqs: list[np.ndarray],
    item_ids: list[str],
    channels: list[Channel],
    fusion: RRF,
    k: int,
    depth: int,
) -> Iterator[dict[str, Any]]:
    """One ``/rerank``-ready body per user, ``CHUNK`` users at a time."""
    features = candidate_features([c.name for c in channels])
    names = [str(f["name"]) for f in features]
    defaults = np.array([f["default"] for f in features], np.float32)
    n_items = len(item_ids)
    for s in range(0, len(users), CHUNK):
        part = seqs[s : s + CHUNK]
        fused = fusion.fuse(run_all(channels, part, max(depth, k)), k, n_items)
        for b, user in enumerate(users[s : s + CHUNK]):
            cands = []
            for j, row in enumerate(fused.items[b].tolist()):
                if row == 0:  # the list ran out
                    break
                values = fused.features[b, j]
                given = {n: _number(v) for n, v, d in zip(names, values, defaults, strict=True)
                         if v != d}  # fmt: skip
                cands.append({"id": item_ids[row - 1], "features": given})
            yield {"user_id": user, "candidates": cands}


def write_recall(
    interactions: Path,
    items: Path | None,
    model_dir: Path | None,
    k: int,
    out: Path,
    fit_sasrec: bool = False,
    say: Any = print,
) -> int:
    """Validate the files, fit, write ``out`` (JSON lines); returns the number of users."""
    from training.files import read_files

    log, catalogue, _ = read_files(interactions, items)
    item_ids = catalogue_ids(list(catalogue.item_ids), model_dir, items is not None)
    users, seqs = sequences(log.users, log.items, log.times, item_ids)
    channels, fusion = fit(seqs, item_ids, model_dir, fit_sasrec, say)
    if not any(fusion.weights.get(c.name, 0.0) > 0 for c in channels):
        raise RecallError(f"none of the voting channels {sorted(fusion.weights)} was fitted")
    depth = 200
    if model_dir is not None:
        depth = int(load_spec(model_dir)["depth"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    count = 0
    with tmp.open("w") as f:
        for line in lines(users, seqs, item_ids, channels, fusion, k, depth):
            f.write(json.dumps(line, separators=(",", ":")) + "\n")
            count += 1
    tmp.replace(out)
    say(f"wrote {count} users' top {k} to {out} (channels: "
        f"{', '.join(c.name for c in channels)})")  # fmt: skip
    return count
