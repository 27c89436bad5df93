"""The order the service must reproduce: model.onnx run directly on the manifest's vectors.

One request at a time, no padding beyond an empty history's single masked slot, no cache, no
Redis: everything the service adds (batching, bucketing, padding) must not change the order.
The candidates are plain ids: a graph with recall features gets each feature's default.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract import feed


class Reference:
    def __init__(self, folder: Path) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        self.version: str = manifest["version"]
        self.history_len: int = manifest["history_len"]
        self.dim: int = manifest["dim"]
        self.inputs: list[str] = manifest["inputs"]
        features = manifest.get("candidate_features") or []
        self.feature_defaults = np.array([f["default"] for f in features], np.float32)
        self.session = ort.InferenceSession(
            str(folder / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        vectors = np.load(folder / "item_vectors.npy").astype(np.float32)
        ids = (folder / "item_ids.txt").read_text().splitlines()
        self.vectors = dict(zip(ids, vectors, strict=True))

    def score(
        self, history: Sequence[str], candidates: Sequence[str]
    ) -> tuple[dict[str, float], np.ndarray, list[str], list[str]]:
        """Scores by id, attention (N, Lh), the history used, and the missing candidates."""
        cands = list(dict.fromkeys(candidates))
        hist = [h for h in history[-self.history_len :] if h in self.vectors]
        present = [(pos, c) for pos, c in enumerate(cands) if c in self.vectors]
        missing = [c for c in cands if c not in self.vectors]
        if not present:
            return {}, np.zeros((0, len(hist))), hist, missing
        length = max(len(hist), 1)
        h = np.zeros((1, length, self.dim), np.float32)
        hm = np.zeros((1, length), np.bool_)
        if hist:
            h[0, length - len(hist) :] = np.stack([self.vectors[i] for i in hist])
            hm[0, length - len(hist) :] = True
        c = np.stack([self.vectors[i] for _, i in present])[None]
        inputs = feed(
            self.inputs,
            h,
            hm,
            c,
            np.ones((1, len(present)), np.bool_),
            np.array([[p for p, _ in present]], np.float32),
            np.tile(self.feature_defaults, (1, len(present), 1)),
        )
        scores, attn = self.session.run(["scores", "attn"], inputs)
        by_id = {cid: float(s) for (_, cid), s in zip(present, scores[0], strict=True)}
        return by_id, attn[0][:, length - len(hist) :], hist, missing


def assert_same_ranking(
    items: list[dict], ref: dict[str, float], missing: list[str], k: int, tol: float = 1e-4
) -> None:
    """The service's items are the reference's top k (scores within tol), then the missing.

    Equal scores up to float noise may come in either order, so the order is checked as
    "each score is at least the next one minus tol", plus the same set of top items.
    """
    scored = [i for i in items if i["score"] is not None]
    for item in scored:
        assert abs(item["score"] - ref[item["item_id"]]) < tol, item
    ref_scores = [ref[i["item_id"]] for i in scored]
    assert all(a >= b - tol for a, b in zip(ref_scores, ref_scores[1:], strict=False))
    expected_top = sorted(ref.values(), reverse=True)[: len(scored)]
    assert np.allclose(sorted(ref_scores, reverse=True), expected_top, atol=tol)
    assert len(scored) == min(k, len(ref))
    tail = [i["item_id"] for i in items[len(scored) :]]
    assert tail == missing[: k - len(scored)]
    assert all(i["score"] is None for i in items[len(scored) :])
