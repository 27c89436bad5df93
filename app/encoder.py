"""The text encoder of new items: all-MiniLM-L6-v2 in ONNX, without PyTorch.

``models/encoder/`` holds ``model.onnx`` (word pieces -> the mean-pooled, L2-normalised
sentence vector, all in the graph), the model's own ``tokenizer.json`` and ``manifest.json``
(the sha256 of both, the word-piece limit, the pooling, the package the weights come from).
It is shared by every model version, so it is never a version itself: the folder name
``encoder`` is reserved under ``models/``.

Tokenisation matches sentence-transformers for this model: tokenizer.json's normaliser
(lower-casing, accents stripped), ``[CLS] ... [SEP]``, truncation to ``max_length`` word pieces
including the two special tokens (``tokenize`` pads a batch to its longest text, as
sentence-transformers does; ``encode`` runs each text unpadded). The vectors equal
sentence-transformers' to a cosine of 0.99 or more (the manifest's ``parity`` holds the
figures on the MovieLens catalogue; docs/model.md says how they are measured).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from app.errors import ManifestMismatch, ModelError
from app.model import load_session
from contract import ENCODER_DIR, first_bad_file

MANIFEST_KIND = "text-encoder"
ENCODER_FILES = ("model.onnx", "tokenizer.json")
PAD_TOKEN = "[PAD]"


class TextEncoder:
    """Texts -> (B, dim) float32 unit vectors; loads and verifies ``folder`` on construction."""

    def __init__(
        self,
        folder: Path,
        threads: int = 1,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        self.folder = folder
        self.manifest = read_encoder_manifest(folder)
        verify_encoder(folder, self.manifest)
        self.dim = int(self.manifest["dim"])
        self.max_length = int(self.manifest["max_length"])
        self.tokenizer = load_tokenizer(folder / "tokenizer.json", self.max_length)
        self.pad_id = pad_id(self.tokenizer, folder / "tokenizer.json")
        self.session = load_session(folder / "model.onnx", providers, threads)
        out = self.session.get_outputs()[0]
        if out.shape[-1] != self.dim:
            raise ManifestMismatch(
                f"{folder / 'model.onnx'}: output dim {out.shape[-1]}, manifest says {self.dim}"
            )

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """input_ids and attention_mask, int64 (B, T), padded to the longest text's T."""
        encodings = self._encode_ids(texts)
        width = max((len(e) for e in encodings), default=0)
        ids = np.full((len(texts), width), self.pad_id, dtype=np.int64)  # (B, T)
        mask = np.zeros((len(texts), width), dtype=np.int64)  # (B, T)
        for row, e in enumerate(encodings):
            ids[row, : len(e)] = e
            mask[row, : len(e)] = 1
        return ids, mask

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, L2-normalised, in the order of ``texts``.

        Each text runs alone, a batch of one without padding: the int8 graph quantises its
        activations with one scale per run, so in a batch a text's vector would depend on
        the texts beside it. Alone, a text gets the same vector in every call, offline and
        in the service.
        """
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for row, ids in enumerate(self._encode_ids(texts)):
            feed = {"input_ids": ids[None, :], "attention_mask": np.ones_like(ids)[None, :]}
            try:
                (vector,) = self.session.run(None, feed)  # (1, dim)
            except Exception as exc:  # ONNX Runtime's errors carry no useful type
                raise ModelError(f"{self.folder}: the text encoder failed: {exc}") from exc
            out[row] = vector[0]
        return out

    def _encode_ids(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Per text, its word-piece ids (int64), [CLS] ... [SEP], at most max_length."""
        if isinstance(texts, str):
            raise TypeError("texts is a str: pass a list of texts")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
        # One text at a time: encode_batch would start a thread per core, and the service
        # gives the encoder one.
        return [np.asarray(self.tokenizer.encode(t).ids, dtype=np.int64) for t in texts]


def load_tokenizer(path: Path, max_length: int) -> Tokenizer:
    """tokenizer.json truncating as sentence-transformers does for this model, unpadded."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers package raises a bare Exception
        raise ModelError(f"{path}: cannot load the tokenizer: {exc}") from exc
    # tokenizer.json pads every text to a fixed 128 and truncates there; sentence-transformers
    # truncates at max_length (the special tokens included) and pads to the longest text of a
    # batch, and the encoder runs each text unpadded.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length, strategy="longest_first")
    return tokenizer


def pad_id(tokenizer: Tokenizer, path: Path) -> int:
    """The id of ``[PAD]``, the token sentence-transformers pads with."""
    found = tokenizer.token_to_id(PAD_TOKEN)
    if found is None:
        raise ModelError(f"{path}: the padding token {PAD_TOKEN!r} is not in the vocabulary")
    return int(found)


def read_encoder_manifest(folder: Path) -> dict[str, Any]:
    """``folder/manifest.json``, checked for the fields the encoder relies on."""
    path = folder / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ManifestMismatch(f"{path}: cannot read the encoder manifest ({exc})") from exc
    if not isinstance(data, dict) or data.get("kind") != MANIFEST_KIND:
        raise ManifestMismatch(f"{path}: kind is not {MANIFEST_KIND!r}")
    for field in ("dim", "max_length"):
        value = data.get(field)
        if not isinstance(value, int) or value < 1:
            raise ManifestMismatch(f"{path}: {field}={value!r} must be a positive integer")
    hashes = data.get("sha256")
    missing = [f for f in ENCODER_FILES if not isinstance(hashes, dict) or f not in hashes]
    if missing:
        raise ManifestMismatch(f"{path}: no sha256 for {missing}")
    return data


def verify_encoder(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists and has its sha256."""
    bad = first_bad_file(folder, manifest["sha256"])
    if bad is None:
        return
    path, present = bad
    if not present:
        raise ManifestMismatch(
            f"{path}: listed in the encoder manifest but missing; model.onnx is made, not "
            "committed: `make encoder` (rerank encoder build)"
        )
    raise ManifestMismatch(
        f"{path}: sha256 differs from the encoder manifest (corrupt or replaced file); "
        "make it again with `make encoder` (rerank encoder build)"
    )


def encoder_dir(models_dir: Path) -> Path:
    """Where the text encoder lives under a models/ root: ``models/encoder/``."""
    return models_dir / ENCODER_DIR


def load_encoder(
    folder: Path, threads: int = 1, providers: Sequence[str] = ("CPUExecutionProvider",)
) -> TextEncoder:
    """Load and verify ``folder`` (blocking: call it off the event loop)."""
    return TextEncoder(folder, threads, providers)
