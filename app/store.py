"""Redis access: versioned item vectors, user histories, the active-version pointer.

Keys (prefix ``rr`` by default, see docs/api.md)::

    rr:active                 the active version
    rr:m:<version>            its manifest JSON
    rr:v:<version>:<item_id>  item vector, raw little-endian bytes of the manifest dtype
    rr:h:<user_id>            item ids, newest first, trimmed to history_len; expires after
                              history_ttl_s without an append
    rr:split                  the split of users between live versions (app/split.py)
    rr:versions               hash: version -> JSON {loaded_at, artifact} (rerank load)
    rr:imp:<user_id>          hash: item id -> "<position> <version>", the user's last answer's
                              top k; expires after feedback_ttl_s (app/feedback.py)
    rr:ab:<version>           hash: the version's online counts (impressions, hits, rr, ...)

Cost per /rerank: at most one round trip, zero when the caller sends the history and every
vector is in the process cache. Every call runs under the per-request deadline and turns
any Redis fault into ``StoreUnavailable``, which the service answers by failing open.
``ClusterStore`` does the same over Redis Cluster in at most two rounds (see its docstring).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import compress
from typing import TYPE_CHECKING, Any

import numpy as np
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState
from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.errors import StoreUnavailable
from app.metrics import Metrics
from contract import Manifest

if TYPE_CHECKING:
    from app.tracing import Tracing

log = logging.getLogger(__name__)

# Why a script: the history's item ids are only known after the list is read, so a plain
# pipeline needs a second round trip for the history's vectors. The script reads the list and
# then every vector in one call. It builds the vector keys itself, which Redis Cluster only
# allows when all keys share a slot; past one Redis this becomes LRANGE, then MGET per slot.
# The history's vectors come back even when cached (the script cannot see the process cache):
# at most history_len small strings, cheaper than a second round trip.
FETCH_SCRIPT = """
local ids = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
local function mget(prefix, list, from)
  local out = {}
  local chunk = {}
  for i = from, #list do
    chunk[#chunk + 1] = prefix .. list[i]
    if #chunk == 1000 or i == #list then
      local got = redis.call('MGET', unpack(chunk))
      for j = 1, #got do out[#out + 1] = got[j] end
      chunk = {}
    end
  end
  return out
end
return {ids, mget(ARGV[1], ids, 1), mget(ARGV[1], ARGV, 3)}
"""

# A user's remembered answer (app/feedback.py), replacing the last: KEYS[1] is rr:imp:<user>,
# ARGV the expiry in seconds, the version, then the item ids best first. HSETNX keeps a
# repeated id's first position, as ``Remembered.entries`` does. EVAL rather than EVALSHA:
# Redis caches the script by its hash, and a restarted Redis never answers NOSCRIPT.
REMEMBER_SCRIPT = """
redis.call('DEL', KEYS[1])
for i = 3, #ARGV do
  redis.call('HSETNX', KEYS[1], ARGV[i], (i - 2) .. ' ' .. ARGV[2])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

STARTUP_TIMEOUT_S = 5.0
# Deadline of the reads and writes of new items (POST /items): not a request on the hot path,
# and a batch of 100 items under three versions is several hundred keys.
ITEMS_TIMEOUT_S = 1.0
ERROR_CHARS = 300  # longest Redis error text kept in a StoreUnavailable
# The breaker in front of Redis: this many calls in a row without an answer open it. Three, so
# that one lost connection does not, and a Redis that stopped answering costs three deadlines
# instead of one per request while it lasts.
BREAKER_FAILURES = 3
REDIS_CIRCUIT = "redis"


# In a Redis manifest, the model folder of a version loaded under another name (`--as`).
ARTIFACT = "artifact"


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.active = f"{prefix}:active"

    def manifest(self, version: str) -> str:
        return f"{self.prefix}:m:{version}"

    def vector_prefix(self, version: str) -> str:
        return f"{self.prefix}:v:{version}:"

    def vector(self, version: str, item_id: str) -> str:
        return f"{self.prefix}:v:{version}:{item_id}"

    def history(self, user_id: str) -> str:
        return f"{self.prefix}:h:{user_id}"

    @property
    def split(self) -> str:
        return f"{self.prefix}:split"

    @property
    def versions(self) -> str:
        return f"{self.prefix}:versions"

    def impressions(self, user_id: str) -> str:
        return f"{self.prefix}:imp:{user_id}"

    def ab(self, version: str) -> str:
        return f"{self.prefix}:ab:{version}"


class VectorCache:
    """Bounded LRU of raw vector bytes keyed by (version, item id).

    Vectors of a version never change, so entries need no invalidation; a new version simply
    uses new keys and the old ones age out. One ordered dict per version, read and written a
    request's ids at a time (``get_many``, ``put_many``) through ``map`` over the dict's own
    methods: a request touches about 150 ids, and a Python call per id would be a visible
    share of its CPU.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._versions: dict[str, OrderedDict[str, bytes]] = {}  # oldest version first
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def get(self, version: str, item_id: str) -> bytes | None:
        return self.get_many(version, [item_id])[0]

    def put(self, version: str, item_id: str, value: bytes) -> None:
        self.put_many(version, [item_id], [value])

    def get_many(self, version: str, ids: Sequence[str]) -> list[bytes | None]:
        """The cached values of ``ids``, None where absent; the hits become the most recent."""
        data = self._versions.get(version)
        if data is None:
            return [None] * len(ids)
        values = list(map(data.get, ids))
        deque(map(data.move_to_end, compress(ids, values)), maxlen=0)
        return values

    def put_many(self, version: str, ids: Sequence[str], values: Sequence[bytes | None]) -> None:
        """Keep the values that are not None (nor empty) as the most recent entries."""
        if self.size == 0:
            return
        data = self._versions.setdefault(version, OrderedDict())
        before = len(data)
        kept = list(compress(ids, values))
        data.update(zip(kept, filter(None, values), strict=True))
        deque(map(data.move_to_end, kept), maxlen=0)
        self._count += len(data) - before
        if self._count > self.size:
            self._evict(version)

    def _evict(self, version: str) -> None:
        """Drop least recent entries to the size: other versions' first, oldest first."""
        for name in [*(v for v in self._versions if v != version), version]:
            data = self._versions[name]
            while data and self._count > self.size:
                data.popitem(last=False)
                self._count -= 1
            if not data:
                del self._versions[name]
            if self._count <= self.size:
                return


@dataclass(frozen=True)
class Fetched:
    """What one request needs from the store, as model-ready arrays."""

    hist_ids: list[str]  # oldest -> newest, only items that have a vector
    hist: np.ndarray  # (Lh, D) float32
    cand_present: np.ndarray  # (N,) bool: the candidate has a vector
    cand: np.ndarray  # (n_present, D) float32, in the candidates' order

    # Read by both the scoring and the ranking of a request: worked out once.
    @cached_property
    def cand_positions(self) -> np.ndarray:
        """Positions in the candidate list of the candidates that have a vector."""
        return np.flatnonzero(self.cand_present)

    @cached_property
    def missing_positions(self) -> np.ndarray:
        """Positions in the candidate list of the candidates without a vector."""
        return np.flatnonzero(~self.cand_present)


def decode(raw: Sequence[bytes | None], manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """Raw vector strings -> (present mask, float32 matrix of the present ones).

    One ``frombuffer`` over the joined bytes: no Python work per vector dimension. A value of
    the wrong length (a foreign writer) counts as missing rather than corrupting a row.
    """
    size = manifest.vector_bytes
    # The usual case, without a Python loop: every value there and of the right length.
    if None not in raw and set(map(len, raw)) <= {size}:  # type: ignore[arg-type]  # no None
        present = np.ones(len(raw), np.bool_)
        joined = b"".join(raw)  # type: ignore[arg-type]  # no None in it
    else:
        present = np.array([r is not None and len(r) == size for r in raw], np.bool_)
        joined = b"".join(compress(raw, present))  # type: ignore[arg-type]  # never None
    matrix = np.frombuffer(joined, dtype=manifest.wire_dtype).reshape(-1, manifest.dim)
    return present, matrix.astype(np.float32)


# Hit positions (1-based) grouped for the hits counter: label -> (first, last) position.
POSITION_BUCKETS = (("1", 1, 1), ("2-3", 2, 3), ("4-10", 4, 10), ("11+", 11, None))


def position_bucket(position: int) -> str:
    for label, first, last in POSITION_BUCKETS:
        if position >= first and (last is None or position <= last):
            return label
    raise ValueError(f"position {position} is not 1 or more")


@dataclass(frozen=True)
class Remembered:
    """One answer's top items as shown to the user, best first, and the version that chose."""

    user_id: str
    version: str
    item_ids: tuple[str, ...]

    def entries(self) -> dict[str, str]:
        """Field -> "<position> <version>" of ``rr:imp:<user>``; a repeated id keeps its first."""
        out: dict[str, str] = {}
        for position, item_id in enumerate(self.item_ids, 1):
            out.setdefault(item_id, f"{position} {self.version}")
        return out


@dataclass(frozen=True)
class Hit:
    """An /events item found in the user's remembered answer: its position and version."""

    user_id: str
    version: str
    position: int


def _breakers(retry_s: float) -> AsyncCircuitBreakerFactory:
    """The breaker of the Redis calls: only a call that got no answer counts against Redis.

    An error Redis answers with (out of memory, a wrong type) shows that it is there, and a
    request cancelled mid-call says nothing about it.
    """
    breakers = AsyncCircuitBreakerFactory(
        default_threshold=BREAKER_FAILURES,
        default_ttl=retry_s,
        exclude=[
            (StoreUnavailable, lambda exc: not exc.unreachable),
            asyncio.CancelledError,
        ],
    )

    def log_change(circuit: str, event_name: str, event: Any) -> None:
        if event_name == "state_changed" and event.state == "opened":
            log.warning("redis: no answer; not called for %g ms", retry_s * 1000)
        elif event_name == "state_changed" and event.state == "closed":
            log.warning("redis: answering again")

    breakers.add_listener(log_change)
    return breakers


class Store:
    client: Redis | RedisCluster

    def __init__(
        self,
        client: Redis | RedisCluster,
        prefix: str,
        timeout_s: float,
        cache: VectorCache,
        metrics: Metrics,
        history_ttl_s: int = 0,
        tracing: Tracing | None = None,
        retry_s: float = 0.0,
    ) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.timeout_s = timeout_s
        self.cache = cache
        self.metrics = metrics
        self.history_ttl_s = history_ttl_s  # 0: histories never expire
        self.tracing = tracing
        self.breakers = _breakers(retry_s) if retry_s > 0 else None  # None: always call
        # Registering only computes the script's hash (no Redis call); ClusterStore, whose
        # keys span slots, never runs it.
        self._fetch_script = client.register_script(FETCH_SCRIPT)
        # Histogram children bound once per operation: ``labels()`` is a locked lookup.
        self._seconds: dict[str, Any] = {}

    async def _call(self, op: str, awaitable: Any, timeout_s: float | None = None) -> Any:
        """Run one Redis call under the deadline; every failure becomes StoreUnavailable.

        Past ``BREAKER_FAILURES`` calls in a row that got no answer, Redis is not called for
        ``retry_s``: a call in that time fails at once, so a request answers degraded without
        waiting out its deadline in a slot. The first call after it goes to Redis again; an
        answer closes the breaker, no answer opens it for another ``retry_s``.
        """
        if self.breakers is None:
            return await self._timed(op, awaitable, timeout_s)
        try:
            async with await self.breakers.get_breaker(REDIS_CIRCUIT):
                return await self._timed(op, awaitable, timeout_s)
        except OpenedState as exc:
            if inspect.iscoroutine(awaitable):  # never started: closed, not left unawaited
                awaitable.close()
            self.metrics.redis_skipped.inc()
            raise StoreUnavailable(
                f"redis {op}: not called, {BREAKER_FAILURES} calls in a row got no answer",
                unreachable=True,
            ) from exc

    async def _timed(self, op: str, awaitable: Any, timeout_s: float | None) -> Any:
        timeout_s = timeout_s or self.timeout_s
        start = time.perf_counter()
        answered = False
        try:
            async with asyncio.timeout(timeout_s):
                result = await awaitable
            answered = True
        except TimeoutError as exc:
            raise StoreUnavailable(
                f"redis {op}: no answer within {timeout_s * 1000:g} ms", unreachable=True
            ) from exc
        except (RedisError, RedisClusterException, OSError) as exc:
            # For the log: a pipeline's error carries its command (key, item ids), cut here.
            # Callers never see this text (app/errors.py).
            detail = f"{type(exc).__name__}: {exc}"
            unreachable = isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError)
            raise StoreUnavailable(f"redis {op}: {detail[:ERROR_CHARS]}", unreachable) from exc
        finally:
            took = time.perf_counter() - start
            seconds = self._seconds.get(op)
            if seconds is None:
                seconds = self._seconds[op] = self.metrics.redis_seconds.labels(op)
            seconds.observe(took)
            if self.tracing is not None:  # a span under the request's, if it is traced
                self.tracing.child(
                    f"redis {op}",
                    start,
                    start + took,
                    None if answered else sys.exc_info()[1],  # the error being raised
                    {"db.system.name": "redis", "db.operation.name": op},
                )
        return result

    async def prepare(self) -> None:
        """Load the fetch script now, so the first request does not pay for NOSCRIPT.

        Start-up is not a request: the first connection (a TLS handshake, AUTH) may take
        longer than a request's deadline, so this call gets ``STARTUP_TIMEOUT_S``.
        """
        await self._call(
            "script_load",
            self.client.script_load(FETCH_SCRIPT),
            max(STARTUP_TIMEOUT_S, self.timeout_s),
        )

    async def ping(self) -> bool:
        return bool(await self._call("ping", self.client.ping()))

    async def active_version(self) -> str | None:
        value = await self._call("get_active", self.client.get(self.keys.active))
        return value.decode() if value is not None else None

    async def routing(self) -> tuple[str | None, bytes | None]:
        """``rr:active`` and ``rr:split`` in one round trip (what the version watcher follows)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.keys.active)
        pipe.get(self.keys.split)
        active, split = await self._call("get_routing", pipe.execute())
        return (active.decode() if active is not None else None), split

    async def manifest_json(self, version: str) -> bytes | None:
        value: bytes | None = await self._call(
            "get_manifest", self.client.get(self.keys.manifest(version))
        )
        return value

    async def vectors_present(self, version: str, sample_ids: Sequence[str]) -> bool:
        """The manifest key (written after every vector) and a sample of vectors exist."""
        return await self.all_vectors_present({version: sample_ids})

    async def all_vectors_present(self, samples: dict[str, Sequence[str]]) -> bool:
        """``vectors_present`` for several versions (the live ones) in one call."""
        keys = []
        for version, sample_ids in samples.items():
            keys.append(self.keys.manifest(version))
            keys.extend(self.keys.vector(version, i) for i in sample_ids)
        if not keys:
            return False
        count = await self._call("exists", self.client.exists(*keys))
        return int(count) == len(keys)

    async def append_history(self, user_id: str, item_ids: Sequence[str], keep: int) -> int:
        """Push events (oldest first) so the newest is at the head; trim; return the length.

        The append also sets the history's expiry again, in the same round trip: a user's
        history lasts ``history_ttl_s`` after their last event, so the users who stop coming
        do not hold Redis's memory forever.
        """
        pipe = self._history_pipeline(user_id, item_ids, keep)
        result = await self._call("events", pipe.execute())
        return int(result[-1])

    async def append_events(
        self, user_id: str, item_ids: Sequence[str], keep: int, lookup: bool
    ) -> tuple[int, list[bytes | None]]:
        """``append_history``, and with ``lookup`` the user's remembered answer's entries
        for ``item_ids`` (``rr:imp:<user>``, None where absent), in the same round trip."""
        if not lookup:
            return await self.append_history(user_id, item_ids, keep), []
        pipe = self._history_pipeline(user_id, item_ids, keep)
        pipe.hmget(self.keys.impressions(user_id), list(item_ids))
        result = await self._call("events", pipe.execute())
        return int(result[-2]), list(result[-1])

    def _history_pipeline(self, user_id: str, item_ids: Sequence[str], keep: int) -> Any:
        key = self.keys.history(user_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.lpush(key, *item_ids)
        pipe.ltrim(key, 0, keep - 1)
        if self.history_ttl_s:
            pipe.expire(key, self.history_ttl_s)
        pipe.llen(key)
        return pipe

    async def remember_answers(
        self, answers: Sequence[Remembered], ttl_s: int, timeout_s: float
    ) -> None:
        """Each answer replaces its user's remembered one (``rr:imp:<user>``, with an
        expiry); each version's impressions count goes up by its answers. One round trip."""
        pipe = self.client.pipeline(transaction=False)
        per_version: dict[str, int] = {}
        for answer in answers:
            # One command an answer (REMEMBER_SCRIPT writes ``Remembered.entries``): DEL,
            # HSET and EXPIRE as three commands cost the client twice the CPU to pack and
            # parse. A script of one key runs on Redis Cluster as well.
            pipe.eval(
                REMEMBER_SCRIPT,
                1,
                self.keys.impressions(answer.user_id),
                ttl_s,
                answer.version,
                *answer.item_ids,
            )
            per_version[answer.version] = per_version.get(answer.version, 0) + 1
        for version, count in per_version.items():
            pipe.hincrby(self.keys.ab(version), "impressions", count)
        await self._call("remember", pipe.execute(), timeout_s)

    async def count_hits(self, hits: Sequence[Hit], timeout_s: float) -> list[Hit]:
        """Consume each hit's remembered answer (DEL); count the hits whose answer this call
        deleted in ``rr:ab:<version>``, and return them. An answer counts once: of two
        concurrent hits on one answer, only the one whose DEL removed it is counted."""
        pipe = self.client.pipeline(transaction=False)
        for hit in hits:
            pipe.delete(self.keys.impressions(hit.user_id))
        deleted = await self._call("hits", pipe.execute(), timeout_s)
        counted = [hit for hit, gone in zip(hits, deleted, strict=True) if int(gone)]
        if not counted:
            return []
        pipe = self.client.pipeline(transaction=False)
        for hit in counted:
            key = self.keys.ab(hit.version)
            rr = 1.0 / hit.position
            pipe.hincrby(key, "hits", 1)
            pipe.hincrby(key, f"hits:{position_bucket(hit.position)}", 1)
            pipe.hincrbyfloat(key, "rr", rr)
            pipe.hincrbyfloat(key, "rr2", rr * rr)
        await self._call("hits", pipe.execute(), timeout_s)
        return counted

    async def vectors_exist(self, version: str, ids: Sequence[str]) -> list[bool]:
        """Per id, whether ``version`` has its vector (one pipelined round trip)."""
        pipe = self.client.pipeline(transaction=False)
        for item_id in ids:
            pipe.exists(self.keys.vector(version, item_id))
        found = await self._call(
            "items_exist", pipe.execute(), max(ITEMS_TIMEOUT_S, self.timeout_s)
        )
        return [bool(f) for f in found]

    async def add_vectors(
        self, version: str, ids: Sequence[str], values: Sequence[bytes]
    ) -> list[bool]:
        """Write each vector with SET NX: True where written, False where a vector was there
        already (vectors are immutable: an existing one is never replaced)."""
        pipe = self.client.pipeline(transaction=False)
        for item_id, value in zip(ids, values, strict=True):
            pipe.set(self.keys.vector(version, item_id), value, nx=True)
        done = await self._call("items_add", pipe.execute(), max(ITEMS_TIMEOUT_S, self.timeout_s))
        return [bool(d) for d in done]

    def _cached(self, version: str, ids: Sequence[str]) -> list[bytes | None]:
        return self.cache.get_many(version, ids)

    def _remember(self, version: str, ids: Sequence[str], values: Sequence[bytes | None]) -> None:
        self.cache.put_many(version, ids, values)

    async def fetch(
        self,
        manifest: Manifest,
        user_id: str,
        history: Sequence[str] | None,
        candidates: Sequence[str],
    ) -> Fetched:
        """History and vectors for one request in at most one round trip.

        ``history`` (oldest first) given by the caller replaces the stored list.
        """
        version = manifest.version
        cand_raw = self._cached(version, candidates)
        cand_need = [i for i, r in zip(candidates, cand_raw, strict=True) if r is None]
        if history is None:
            hist_ids, hist_raw, cand_got = await self._fetch_with_history(
                manifest, user_id, cand_need
            )
            self._remember(version, hist_ids, hist_raw)
        else:
            hist_ids = list(history[-manifest.history_len :])
            hist_raw = self._cached(version, hist_ids)
            hist_need = [i for i, r in zip(hist_ids, hist_raw, strict=True) if r is None]
            got = await self._mget(version, hist_need + cand_need)
            self._remember(version, hist_need, got[: len(hist_need)])
            fill = iter(got[: len(hist_need)])
            hist_raw = [r if r is not None else next(fill) for r in hist_raw]
            cand_got = got[len(hist_need) :]
        if cand_need:
            self._remember(version, cand_need, cand_got)
            fill = iter(cand_got)
            cand_raw = [r if r is not None else next(fill) for r in cand_raw]
        self.metrics.cache_hits.inc(len(candidates) - len(cand_need))
        self.metrics.cache_misses.inc(len(cand_need))

        hist_present, hist = decode(hist_raw, manifest)
        cand_present, cand = decode(cand_raw, manifest)
        kept = [i for i, ok in zip(hist_ids, hist_present, strict=True) if ok]
        return Fetched(kept, hist, cand_present, cand)

    async def _fetch_with_history(
        self, manifest: Manifest, user_id: str, cand_need: list[str]
    ) -> tuple[list[str], list[bytes | None], list[bytes | None]]:
        version = manifest.version
        ids, hist_raw, cand_got = await self._call(
            "fetch",
            self._fetch_script(
                keys=[self.keys.history(user_id)],
                args=[self.keys.vector_prefix(version), manifest.history_len, *cand_need],
            ),
        )
        # The list is newest first; the model reads oldest -> newest.
        return [i.decode() for i in reversed(ids)], list(reversed(hist_raw)), list(cand_got)

    async def _mget(self, version: str, ids: list[str]) -> list[bytes | None]:
        if not ids:  # everything was cached: no round trip at all
            return []
        keys = [self.keys.vector(version, i) for i in ids]
        return list(await self._call("mget", self.client.mget(keys)))


class ClusterStore(Store):
    """The store over Redis Cluster: a request's keys grouped by hash slot.

    Redis refuses a multi-key command or a script whose keys span hash slots, so the single
    Redis's one-call script cannot run here. Instead, per request:

    1. the history list (LRANGE) and the uncached candidates' vectors (one MGET per slot),
       queued in one cluster pipeline: redis-py sends each node its share in one write and
       waits for all nodes at once, so this is one round trip per node, in parallel;
    2. the history's uncached vectors, the same way (skipped when the caller sends the
       history, or every history vector is cached).

    Both rounds share one deadline. Vectors keep their plain keys (no hash tag): they spread
    over every slot, hence over every shard, which is what makes the catalogue fit; the price
    is about one MGET per uncached key, pipelined. The history list, the manifest and the
    active pointer are single keys, each in its own slot.
    """

    client: RedisCluster

    async def prepare(self) -> None:
        """Learn the slot map now (start-up deadline), not in the first request's."""
        await self._call(
            "cluster_init", self.client.initialize(), max(STARTUP_TIMEOUT_S, self.timeout_s)
        )

    async def ping(self) -> bool:
        """Every master answers: a shard that is away makes the whole service not ready."""
        return bool(await self._call("ping", self.client.ping(target_nodes=RedisCluster.PRIMARIES)))

    async def _fetch_with_history(
        self, manifest: Manifest, user_id: str, cand_need: list[str]
    ) -> tuple[list[str], list[bytes | None], list[bytes | None]]:
        result: tuple[list[str], list[bytes | None], list[bytes | None]] = await self._call(
            "fetch", self._two_rounds(manifest, user_id, cand_need)
        )
        return result

    async def _two_rounds(
        self, manifest: Manifest, user_id: str, cand_need: list[str]
    ) -> tuple[list[str], list[bytes | None], list[bytes | None]]:
        version = manifest.version
        pipe = self.client.pipeline()
        pipe.lrange(self.keys.history(user_id), 0, manifest.history_len - 1)
        cand_keys = [self.keys.vector(version, i) for i in cand_need]
        groups = _queue_mget(pipe, cand_keys)
        newest_first, *replies = await pipe.execute()
        cand_got = _scatter(len(cand_keys), groups, replies)
        # The list is newest first; the model reads oldest -> newest.
        hist_ids = [i.decode() for i in reversed(newest_first)]
        hist_raw = self._cached(version, hist_ids)
        hist_need = [i for i, r in zip(hist_ids, hist_raw, strict=True) if r is None]
        fill = iter(await self._read_vectors(version, hist_need))
        hist_raw = [r if r is not None else next(fill) for r in hist_raw]
        return hist_ids, hist_raw, cand_got

    async def _mget(self, version: str, ids: list[str]) -> list[bytes | None]:
        if not ids:  # everything was cached: no round trip at all
            return []
        got: list[bytes | None] = await self._call("mget", self._read_vectors(version, ids))
        return got

    async def append_events(
        self, user_id: str, item_ids: Sequence[str], keep: int, lookup: bool
    ) -> tuple[int, list[bytes | None]]:
        """The history's transaction and the remembered answer's HMGET are in different hash
        slots, so they go as two calls at once: still one round trip of waiting."""
        if not lookup:
            return await self.append_history(user_id, item_ids, keep), []
        pipe = self._history_pipeline(user_id, item_ids, keep)
        lookup_call = self.client.hmget(self.keys.impressions(user_id), list(item_ids))
        result, remembered = await self._call("events", asyncio.gather(pipe.execute(), lookup_call))
        return int(result[-1]), list(remembered)

    async def _read_vectors(self, version: str, ids: list[str]) -> list[bytes | None]:
        if not ids:
            return []
        keys = [self.keys.vector(version, i) for i in ids]
        pipe = self.client.pipeline()
        groups = _queue_mget(pipe, keys)
        return _scatter(len(keys), groups, await pipe.execute())


def _queue_mget(pipe: Any, keys: Sequence[str]) -> list[list[int]]:
    """Queue one MGET per hash slot of ``keys``; return each MGET's positions in ``keys``."""
    groups: dict[int, list[int]] = {}
    for position, key in enumerate(keys):
        groups.setdefault(key_slot(key.encode()), []).append(position)
    nodes = pipe.cluster_client.nodes_manager
    for slot, positions in groups.items():
        # The node is named here from the slot just computed, so redis-py does not work the
        # slot out again per command (half of its CPU per command); MOVED still redirects.
        node = nodes.get_node_from_slot(slot)
        pipe.execute_command("MGET", *(keys[p] for p in positions), target_nodes=node)
    return list(groups.values())


def _scatter(
    n: int, groups: list[list[int]], replies: Sequence[Sequence[bytes | None]]
) -> list[bytes | None]:
    """The MGET replies of ``_queue_mget`` back in the order of its keys."""
    out: list[bytes | None] = [None] * n
    for positions, values in zip(groups, replies, strict=True):
        for position, value in zip(positions, values, strict=True):
            out[position] = value
    return out
