"""Score candidate lists with an exported model folder: ONNX Runtime on its float16 vectors.

This is what the service computes, so ``rerank eval`` measures the artifact as served.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from training.lists import Lists


class OnnxScorer:
    def __init__(self, model_dir: Path, item_ids: list[str], batch_size: int = 256) -> None:
        vectors = np.load(model_dir / "item_vectors.npy").astype(np.float32)  # (I, D)
        exported = (model_dir / "item_ids.txt").read_text().splitlines()
        row_of = {item: i for i, item in enumerate(exported)}
        missing = [i for i in item_ids if i not in row_of]
        if missing:
            raise ValueError(f"{len(missing)} items have no vector in {model_dir}: {missing[:5]}")
        # Row 0 is padding: a zero vector, masked out anyway.
        self.table = np.concatenate([np.zeros((1, vectors.shape[1]), np.float32),
                                     vectors[[row_of[i] for i in item_ids]]])  # fmt: skip
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])  # fmt: skip
        self.batch_size = batch_size

    def __call__(self, lists: Lists) -> np.ndarray:
        out = []
        n = lists.cand.shape[1]
        for s in range(0, len(lists), self.batch_size):
            hist, cand = lists.hist[s : s + self.batch_size], lists.cand[s : s + self.batch_size]
            feed = {
                "hist": self.table[hist],
                "hist_mask": hist > 0,
                "cand": self.table[cand],
                "cand_mask": cand > 0,
                "cand_rank": np.broadcast_to(np.arange(n, dtype=np.float32), cand.shape).copy(),
            }
            out.append(self.session.run(["scores"], feed)[0])
        return np.concatenate(out)
