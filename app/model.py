"""ONNX Runtime session of one model version, fed by the contract's padding rules.

A ``LoadedModel`` is immutable once built: the batcher calls ``run_batch`` from its single
worker thread, and a swap replaces the whole object, so no lock is needed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.errors import ModelError
from contract import (
    ATTN,
    CAND,
    CAND_FEATS,
    CAND_RANK,
    FLOAT,
    HIST,
    INPUTS_WITH_FEATS,
    ONNX_FILE,
    SCORES,
    Manifest,
    feed,
    left_align,
    missing_inputs,
    right_align,
)

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
MIN_N_BUCKET = 8


def choose_providers(configured: Sequence[str]) -> list[str]:
    """Configured providers as given (refusing absent ones), else CUDA first when present."""
    available = ort.get_available_providers()
    if configured:
        absent = [p for p in configured if p not in available]
        if absent:
            raise ModelError(f"onnx_providers: {absent} not available here (have {available})")
        return list(configured)
    return [CUDA, CPU] if CUDA in available else [CPU]


def ladder(top: int, start: int = 1) -> list[int]:
    """Powers of two from ``start`` and ``top`` itself: few shapes, at most 2x padding."""
    sizes = []
    size = start
    while size < top:
        sizes.append(size)
        size *= 2
    sizes.append(top)
    return sizes


def bucket(size: int, sizes: Sequence[int]) -> int:
    for s in sizes:
        if s >= size:
            return s
    return size  # past the ladder (cannot happen within the request limits): exact size


@dataclass(frozen=True)
class Job:
    """One request's inputs: history oldest -> newest, the candidates that have vectors."""

    hist: np.ndarray  # (Lh, D) float32, Lh <= history_len
    cand: np.ndarray  # (Nc, D) float32
    cand_rank: np.ndarray  # (Nc,) float32 position in the caller's list
    cand_feats: np.ndarray | None = None  # (Nc, F) float32 recall features; None: defaults


@dataclass(frozen=True)
class Scored:
    scores: np.ndarray  # (Nc,) float32
    attn: np.ndarray  # (Nc, Lh) float32, columns in history order


class LoadedModel:
    """A model version ready to score: session, manifest and shape buckets."""

    def __init__(
        self, manifest: Manifest, session: ort.InferenceSession, max_candidates: int
    ) -> None:
        self.manifest = manifest
        self.version = manifest.version
        self.session = session
        self.declared = frozenset(i.name for i in session.get_inputs())
        absent = missing_inputs(self.declared)
        if absent:
            raise ModelError(f"{self.version}: the graph lacks inputs {absent}")
        # The service feeds what the exporter writes; a graph that wants more is refused
        # here rather than failing every batch.
        unfed = sorted(self.declared - set(INPUTS_WITH_FEATS))
        if unfed:
            raise ModelError(f"{self.version}: the graph wants inputs the service lacks {unfed}")
        # Older graphs have no cand_rank; the feed leaves out what a graph does not declare.
        self.has_cand_rank = CAND_RANK in self.declared
        self._init_features(session)
        self.l_buckets = ladder(manifest.history_len)
        self.n_buckets = ladder(max(max_candidates, MIN_N_BUCKET), MIN_N_BUCKET)
        self._check_dim(session)

    def _init_features(self, session: ort.InferenceSession) -> None:
        """cand_feats: fed only to a graph that declares it, in the manifest's column order,
        a column a candidate lacks (and every padded row) at its default."""
        names = self.manifest.feature_names
        self.has_cand_feats = CAND_FEATS in self.declared
        if self.has_cand_feats != bool(names):
            raise ModelError(
                f"{self.version}: the graph {'declares' if self.has_cand_feats else 'lacks'} "
                f"{CAND_FEATS} and the manifest names {len(names)} candidate_features"
            )
        self.feature_index = {name: i for i, name in enumerate(names)}
        self.feature_defaults = np.array(self.manifest.feature_defaults, FLOAT)  # (F,)
        for i in session.get_inputs():
            if i.name == CAND_FEATS and isinstance(i.shape[-1], int) and i.shape[-1] != len(names):
                raise ModelError(
                    f"{self.version}: graph input {CAND_FEATS} has F={i.shape[-1]}, the "
                    f"manifest names {len(names)} candidate_features"
                )

    def features(
        self, given: Sequence[dict[str, float]], positions: np.ndarray
    ) -> tuple[np.ndarray | None, int]:
        """The ``cand_feats`` rows (Nc, F) of the candidates at ``positions`` (those with a
        vector) of a request whose candidates carried ``given``, and how many of the given
        names, over all candidates, this model does not declare (they are ignored). No rows
        where the graph takes no features.

        A recall pipeline sends the same names for every candidate: then all the values are
        read in one pass (``itemgetter`` of those names over the candidates, no Python per
        value). Otherwise candidates are taken a group at a time, the group being the names
        they carry in their order.
        """
        rows = np.tile(self.feature_defaults, (len(positions), 1)) if self.has_cand_feats else None
        total = sum(map(len, given))
        if total == 0:  # plain ids, or objects without features: nothing to write
            return rows, 0
        names = list(given[0])
        # As many names in every candidate as in the first, and the first's among them
        # (else the pass stops on a KeyError): one set of names.
        if total == len(names) * len(given):
            pick = itemgetter(*names)
            flat = map(pick, given) if len(names) == 1 else chain.from_iterable(map(pick, given))
            try:
                values = np.fromiter(flat, np.float64, count=len(names) * len(given))
            except KeyError:
                pass
            else:
                cols = [self.feature_index.get(name) for name in names]
                known = [j for j, col in enumerate(cols) if col is not None]
                if rows is not None and known:
                    to = [col for col in cols if col is not None]
                    matrix = values.reshape(len(given), len(names))
                    rows[:, to] = matrix[positions][:, known]
                return rows, len(given) * (len(names) - len(known))
        return rows, self._features_by_group(rows, given, positions)

    def _features_by_group(
        self, rows: np.ndarray | None, given: Sequence[dict[str, float]], positions: np.ndarray
    ) -> int:
        """``features`` for candidates that carry different names: writes ``rows`` a group
        of candidates with the same names (in the same order) at a time; returns the count
        of names not declared."""
        groups: dict[tuple[str, ...], list[int]] = {}
        for p, names in enumerate(map(tuple, given)):
            groups.setdefault(names, []).append(p)
        groups.pop((), None)  # plain ids: nothing to write
        row_of = np.full(len(given), -1, np.int64)  # candidate position -> row, -1: no vector
        row_of[positions] = np.arange(len(positions))
        unknown = 0
        for names, members in groups.items():
            cols = [self.feature_index.get(name) for name in names]
            unknown += len(members) * cols.count(None)
            known = [j for j, col in enumerate(cols) if col is not None]
            if rows is None or not known:
                continue
            target = row_of[members]
            kept = target >= 0
            values = np.fromiter(
                chain.from_iterable(given[p].values() for p in members),
                np.float64,
                count=len(members) * len(names),
            ).reshape(len(members), len(names))
            to = np.array([col for col in cols if col is not None], np.int64)
            rows[np.ix_(target[kept], to)] = values[kept][:, known]
        return unknown

    def _check_dim(self, session: ort.InferenceSession) -> None:
        for i in session.get_inputs():
            if i.name in (HIST, CAND):
                last = i.shape[-1]
                if isinstance(last, int) and last != self.manifest.dim:
                    raise ModelError(
                        f"{self.version}: graph input {i.name} has D={last}, "
                        f"manifest dim={self.manifest.dim}"
                    )

    def run_batch(self, jobs: Sequence[Job]) -> list[Scored]:
        """Pad the jobs to shared bucketed L and N, run once, cut each job's rows back out.

        Histories are right-aligned (the newest item last), candidates left-aligned in the
        caller's order: the rules of contract/graph.py.
        """
        l_pad = bucket(max(max(len(j.hist) for j in jobs), 1), self.l_buckets)
        n_pad = bucket(max(len(j.cand) for j in jobs), self.n_buckets)
        hist, hist_mask = right_align([j.hist for j in jobs], l_pad, FLOAT)
        cand, cand_mask = left_align([j.cand for j in jobs], n_pad, FLOAT)
        cand_rank, _ = left_align([j.cand_rank for j in jobs], n_pad, FLOAT)
        cand_feats = None
        if self.has_cand_feats:
            cand_feats = np.tile(self.feature_defaults, (len(jobs), n_pad, 1))  # (B, N, F)
            for row, job in enumerate(jobs):
                if job.cand_feats is not None:
                    cand_feats[row, : len(job.cand_feats)] = job.cand_feats
        scores, attn = self.run(hist, hist_mask, cand, cand_mask, cand_rank, cand_feats)
        out = []
        for row, job in enumerate(jobs):
            lh, nc = len(job.hist), len(job.cand)
            out.append(Scored(scores[row, :nc], attn[row, :nc, l_pad - lh :]))
        return out

    def run(
        self,
        hist: np.ndarray,  # (B, L, D)
        hist_mask: np.ndarray,  # (B, L)
        cand: np.ndarray,  # (B, N, D)
        cand_mask: np.ndarray,  # (B, N)
        cand_rank: np.ndarray,  # (B, N)
        cand_feats: np.ndarray | None = None,  # (B, N, F), where the graph declares it
    ) -> tuple[np.ndarray, np.ndarray]:
        inputs = feed(self.declared, hist, hist_mask, cand, cand_mask, cand_rank, cand_feats)
        try:
            scores, attn = self.session.run([SCORES, ATTN], inputs)
        except Exception as exc:  # ONNX Runtime raises its own untyped errors
            raise ModelError(f"{self.version}: model run failed: {exc}") from exc
        return scores, attn

    def warm_up(self, max_batch: int) -> float:
        """Run every (L, N) bucket once so the first requests do not pay for allocation."""
        start = time.perf_counter()
        rng = np.random.default_rng(0)
        d = self.manifest.dim
        for lh in self.l_buckets:
            for nc in self.n_buckets:
                job = Job(
                    rng.standard_normal((lh, d), np.float32),
                    rng.standard_normal((nc, d), np.float32),
                    np.arange(nc, dtype=np.float32),
                )
                self.run_batch([job])
        # One full batch at the largest shape sizes the memory arena for the worst case.
        self.run_batch([job] * max_batch)
        return time.perf_counter() - start


_ARENA_LOCK = threading.Lock()
_arena_registered = False


def share_cpu_arena() -> None:
    """Register one CPU memory arena for every session of this process (once).

    Each session's own arena keeps the peak of its largest batch (about 120 MB for the default
    model at max_batch 32 and 1000 candidates): three live versions of a split would hold
    three such peaks. Batches run one at a time (app/batcher.py), so one shared arena, grown
    to the largest peak of any of them, serves them all.
    """
    global _arena_registered
    with _ARENA_LOCK:
        if not _arena_registered:
            info = ort.OrtMemoryInfo(
                "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
            )
            ort.create_and_register_allocator(info, None)
            _arena_registered = True


def load_session(path: Path, providers: Sequence[str], threads: int) -> ort.InferenceSession:
    share_cpu_arena()
    options = ort.SessionOptions()
    options.add_session_config_entry("session.use_env_allocators", "1")  # the shared arena
    options.intra_op_num_threads = threads
    # One batch at a time runs in the batcher's thread: no use for inter-op parallelism.
    options.inter_op_num_threads = 1
    # Intra-op threads spin after each run waiting for more work; between the batches of a
    # service that is pure CPU burned, taken from the event loop on a small machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: warnings about providers are ours to report
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as exc:  # ONNX Runtime's errors carry no useful type
        raise ModelError(f"{path}: cannot load the ONNX model: {exc}") from exc


def open_model(
    folder: Path,
    manifest: Manifest,
    providers: Sequence[str],
    threads: int,
    max_candidates: int,
    max_batch: int,
) -> LoadedModel:
    """Open model.onnx of a verified folder and warm it (blocking: call it off the event loop)."""
    session = load_session(folder / ONNX_FILE, providers, threads)
    model = LoadedModel(manifest, session, max_candidates)
    took = model.warm_up(max_batch)
    log.info(
        "model %s loaded on %s, warmed %d shapes in %.2fs",
        model.version,
        session.get_providers()[0],
        len(model.l_buckets) * len(model.n_buckets),
        took,
    )
    return model
