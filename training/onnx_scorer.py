"""Score candidate lists with an exported model folder: ONNX Runtime on its float16 vectors.

This is what the service computes, so ``rerank eval`` measures the artifact as served: the
folder is verified against its manifest and the graph is fed by the contract's rules.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract import (
    FLOAT,
    ONNX_FILE,
    SCORES,
    VECTORS_FILE,
    feed,
    list_positions,
    read_item_ids,
    verify_folder,
)
from training.lists import Lists


class OnnxScorer:
    def __init__(self, model_dir: Path, item_ids: list[str], batch_size: int = 256) -> None:
        manifest = verify_folder(model_dir)
        self.defaults = np.array(manifest.feature_defaults, FLOAT)  # (F,)
        vectors = np.load(model_dir / VECTORS_FILE).astype(FLOAT)  # (I, D)
        row_of = {item: i for i, item in enumerate(read_item_ids(model_dir))}
        missing = [i for i in item_ids if i not in row_of]
        if missing:
            raise ValueError(f"{len(missing)} items have no vector in {model_dir}: {missing[:5]}")
        # Row 0 is padding: a zero vector, masked out anyway.
        self.table = np.concatenate([np.zeros((1, vectors.shape[1]), FLOAT),
                                     vectors[[row_of[i] for i in item_ids]]])  # fmt: skip
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = ort.InferenceSession(str(model_dir / ONNX_FILE), options,
                                            providers=["CPUExecutionProvider"])  # fmt: skip
        self.declared = {i.name for i in self.session.get_inputs()}
        self.batch_size = batch_size

    def __call__(self, lists: Lists) -> np.ndarray:
        """Scores (M, N) of the lists, whose rows are already padded with item row 0."""
        out = []
        for s in range(0, len(lists), self.batch_size):
            hist, cand = lists.hist[s : s + self.batch_size], lists.cand[s : s + self.batch_size]
            feats = None
            if len(self.defaults):  # the lists' recall features, or the defaults
                part = lists.with_features(self.defaults)
                feats = np.asarray(part.feats)[s : s + self.batch_size].astype(FLOAT)
            inputs = feed(
                self.declared,
                self.table[hist],
                hist > 0,
                self.table[cand],
                cand > 0,
                cand_rank=list_positions(*cand.shape),
                cand_feats=feats,
            )
            out.append(self.session.run([SCORES], inputs)[0])
        return np.concatenate(out)
