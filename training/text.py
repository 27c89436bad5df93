"""Sentence embeddings of item text: all-MiniLM-L6-v2 through the service's own ONNX encoder.

Training reads the very vectors the service computes for a new item (app/encoder.py over
``models/encoder/``), so the item tower's text input is the same offline and online; the
int8 graph's vectors differ from sentence-transformers' by a cosine of up to 0.007
(docs/model.md), more than the 1e-3 that a new item's vector must match its offline one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from contract import ENCODER_DIR

TEXT_DIM = 384
# The repository's text encoder, shared by every model version.
ENCODER = Path(__file__).resolve().parents[1] / "models" / ENCODER_DIR


def encoder_sha256(folder: Path = ENCODER) -> str:
    """The sha256 of the encoder's graph, as its manifest records it."""
    from app.encoder import read_encoder_manifest

    return str(read_encoder_manifest(folder)["sha256"]["model.onnx"])


def encode(texts: list[str], cache_dir: Path | None = None, folder: Path = ENCODER) -> np.ndarray:
    """(len(texts), 384) float32, L2-normalised; cached on disk by the hash of the encoder
    and the texts."""
    key = hashlib.sha256("\n".join([encoder_sha256(folder), *texts]).encode()).hexdigest()[:16]
    cache = cache_dir / f"minilm-onnx-{key}.npy" if cache_dir else None
    if cache is not None and cache.exists():
        return np.load(cache)
    from app.encoder import load_encoder

    vectors = load_encoder(folder).encode(texts)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, vectors)
    return vectors
