"""Settings of the online service: one class, read from ``RERANK_*`` variables, then ``.env``.

Every field carries a ``description``: it is the documentation of the setting (the README's
table is checked against these fields), and validators refuse impossible values at start-up
with a message that names the setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.logs import LOG_FORMATS

LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")


def cluster_url(url: str) -> tuple[str, bool]:
    """``redis+cluster://h:p`` -> (``redis://h:p``, True); any other URL -> (url, False)."""
    for scheme in ("redis", "rediss"):
        marker = f"{scheme}+cluster://"
        if url.startswith(marker):
            return f"{scheme}://{url[len(marker) :]}", True
    return url, False


class Settings(BaseSettings):
    """The service's configuration; ``Settings()`` reads the environment."""

    # Errors never repeat the raw input: it may be an API key or a Redis URL with a password.
    # The validators name the offending value themselves where it is safe to show.
    model_config = SettingsConfigDict(
        env_prefix="RERANK_",
        env_file=".env",
        extra="ignore",
        validate_default=True,
        hide_input_in_errors=True,
    )

    redis_url: str | None = Field(
        default=None,
        description="Redis URL (redis://host:port/db). Unset: `rerank serve` starts an "
        "embedded redis-server and loads the default model into it.",
    )
    redis_cluster: bool = Field(
        default=False,
        description="Treat redis_url as a seed node of a Redis Cluster (the same as a "
        "`redis+cluster://host:port` URL): reads are grouped by hash slot.",
    )
    key_prefix: str = Field(
        default="rr", description="Prefix of every Redis key (rr:active, rr:v:..., rr:h:...)."
    )
    embedded_redis_port: int = Field(
        default=0,
        description="Port of the embedded redis-server (redis_url unset); 0: any free port. "
        "Its URL is logged at start, for `rerank load` to use.",
    )
    embedded_redis_maxmemory_mb: int = Field(
        default=256,
        description="maxmemory of the embedded redis-server, in MiB (0: no limit). Its policy "
        "is volatile-lru: only keys with an expiry (histories, remembered answers) are evicted, "
        "never vectors or manifests; a write past the limit with nothing left to evict gets "
        "503.",
    )
    model_dir: Path = Field(
        default=Path("models"),
        description="Folder of exported model versions (models/<version>/model.onnx ...).",
    )
    host: str = Field(default="127.0.0.1", description="Address `rerank serve` binds to.")
    port: int = Field(default=8000, description="Port `rerank serve` listens on.")
    max_batch: int = Field(
        default=32, description="Most requests scored together in one ONNX Runtime call."
    )
    retry_after_s: int = Field(
        default=1, description="Retry-After seconds sent with the overload 503."
    )
    redis_timeout_ms: float = Field(
        default=50.0,
        description="Deadline for the Redis calls of one request; past it the answer is "
        "degraded (the caller's order).",
    )
    redis_retry_ms: float = Field(
        default=500.0,
        description="After 3 Redis calls in a row get no answer within their deadline, Redis "
        "is not called for this long: requests answer degraded at once instead of each "
        "waiting out redis_timeout_ms. Then the next call tries again (0: always call).",
    )
    redis_max_connections: int = Field(
        default=256, description="Size of the Redis connection pool of one process."
    )
    cache_size: int = Field(
        default=100_000,
        description="Item vectors kept in the process-local LRU cache (0 disables it).",
    )
    max_candidates: int = Field(
        default=1000, description="Most candidates one /rerank request may send."
    )
    max_k: int = Field(default=100, description="Largest k one /rerank request may ask for.")
    max_history: int = Field(
        default=1000,
        description="Most item ids in a request's own `history` or in one /events call; only "
        "the newest history_len of a history are read by the model. Stored histories are "
        "trimmed to the model's history_len (to this while no model is loaded).",
    )
    history_ttl_days: float = Field(
        default=30.0,
        description="A stored history (rr:h:<user>) expires after this many days without "
        "an /events call for its user; every append sets the expiry again (0: never).",
    )
    feedback_top_k: int = Field(
        default=10,
        description="Items of each non-degraded /rerank answer remembered for its user "
        "(rr:imp:<user>), so that an /events item among them counts as an online hit for the "
        "version that showed it (`rerank split --report`); 0: nothing is remembered.",
    )
    feedback_ttl_s: int = Field(
        default=3600,
        description="How long a remembered answer waits for an /events hit, in seconds; the "
        "user's next answer replaces it.",
    )
    max_items_per_call: int = Field(
        default=100, description="Most items one POST /items call may add."
    )
    items_queue: int = Field(
        default=4,
        description="Most POST /items calls waiting for the item encoder (one worker thread) "
        "beside the one it runs; past it a call gets 503 with Retry-After.",
    )
    explain_top: int = Field(
        default=3, description="History items listed per returned item when explain is true."
    )
    onnx_providers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="ONNX Runtime execution providers in order of preference, comma "
        "separated. Empty: CUDAExecutionProvider when available, then CPUExecutionProvider.",
    )
    onnx_threads: int = Field(
        default=1,
        description="Intra-op threads of the ONNX Runtime session (0: ONNX Runtime's default, "
        "one per physical core). 1: the batcher's own thread runs each batch, the least CPU "
        "per request at the small batches of a CPU box that also runs the event loop.",
    )
    model_inline_ms: float = Field(
        default=5.0,
        description="A batch that is the process's only work (one request in flight, none "
        "waiting) and is expected to take at most this long in the model runs on the event "
        "loop's thread, saving the hand-off to the batcher's thread (0: every batch runs on "
        "the batcher's thread). Anything arriving meanwhile waits for it.",
    )
    version_poll_s: float = Field(
        default=1.0,
        description="How often the service reads rr:active to notice a new model version.",
    )
    log_level: str = Field(default="INFO", description="Logging level of the service.")
    log_format: str = Field(
        default="text",
        description="Log lines as `text` (time level logger [request id] message) or `json` "
        "(one object a line: time, level, logger, request_id, message); control characters "
        "from callers are escaped in both.",
    )
    max_body_bytes: int = Field(
        default=1_048_576,
        description="Largest request body accepted, in bytes; a larger one gets 413 before "
        "it is read whole.",
    )
    max_inflight: int = Field(
        default=6,
        description="Most /rerank and /events requests one process works on at once, counted "
        "once the body is read (0: no limit); past it a request waits in line for a slot.",
    )
    latency_target_ms: float = Field(
        default=50.0,
        description="The answer time admission aims at: a request in the waiting line whose "
        "wait plus the mean time a slot is held passes this is set aside and refused, never "
        "served late (docs/reliability.md, Overload and admission).",
    )
    queue_timeout_ms: float = Field(
        default=200.0,
        description="Longest a request waits in line for a slot; then it gets 503 with "
        "Retry-After. A request set aside from a standing line gets its 503 then too: a "
        "caller that retries at once is slowed by this, not bounced.",
    )
    queue_interval_ms: float = Field(
        default=100.0,
        description="A waiting line that has not been empty for this long stands: it is "
        "served newest first, and a waiter that cannot be answered within latency_target_ms "
        "is set aside, never served late, until a slot comes free with nobody in line. A "
        "younger line is a burst: served in arrival order (docs/reliability.md, Overload and "
        "admission).",
    )
    max_waiting: int = Field(
        default=256,
        description="Most requests waiting for a slot, their bodies read (so at most this "
        "times max_body_bytes held); past it a request is refused before its body is read, "
        "and its 503 is sent at its deadline (queue_timeout_ms), as every refusal's is.",
    )
    body_timeout_s: float = Field(
        default=10.0,
        description="Longest wait for a request's whole body; past it the answer is 408 and "
        "the connection is closed. A request holds no slot while its body is read.",
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="API keys, comma separated. Set: /rerank, /events and /items need one in "
        "`X-API-Key` or `Authorization: Bearer`, else 401. Unset: open.",
    )
    protect_ops: bool = Field(
        default=False,
        description="With api_keys: /healthz, /readyz and /metrics need a key too (probes "
        "and scrapers must then send one).",
    )
    shutdown_delay_s: float = Field(
        default=2.0,
        description="On SIGTERM, /readyz answers 503 for this long while requests are still "
        "served, so load balancers stop sending; then the server stops accepting.",
    )
    drain_s: float = Field(
        default=10.0,
        description="After the shutdown delay, longest wait for in-flight requests before "
        "they are cancelled (uvicorn's graceful shutdown timeout).",
    )
    otlp_endpoint: str | None = Field(
        default=None,
        description="Base URL of an OpenTelemetry collector's OTLP/HTTP receiver "
        "(http://collector:4318; /v1/traces is added). Set, or OTEL_EXPORTER_OTLP_ENDPOINT "
        "set: each /rerank and /events is traced (request, Redis, queue wait, model run), "
        "joining the caller's trace from its W3C traceparent header. Unset: no tracing, "
        "at no cost. Needs the tracing extra.",
    )
    demo: bool = Field(
        default=True,
        description="Serve the demo page at /demo (app/demo.py): a sample user of the model's "
        "models/<version>/demo.json reranked in the browser, its history sent with each "
        "request; only a film added with its form (POST /items) is written to Redis. "
        "Production sets false: /demo is then 404.",
    )

    @field_validator(
        "max_batch",
        "retry_after_s",
        "redis_max_connections",
        "max_candidates",
        "max_k",
        "max_history",
        "max_items_per_call",
        "explain_top",
        "max_body_bytes",
        "feedback_ttl_s",
    )
    @classmethod
    def _positive_int(cls, value: int, info: Any) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name}={value} must be at least 1")
        return value

    @field_validator(
        "cache_size",
        "items_queue",
        "onnx_threads",
        "max_inflight",
        "max_waiting",
        "redis_retry_ms",
        "shutdown_delay_s",
        "drain_s",
        "history_ttl_days",
        "embedded_redis_maxmemory_mb",
        "feedback_top_k",
        "model_inline_ms",
    )
    @classmethod
    def _not_negative(cls, value: float, info: Any) -> float:
        if value < 0:
            raise ValueError(f"{info.field_name}={value} must not be negative")
        return value

    @field_validator(
        "redis_timeout_ms",
        "version_poll_s",
        "latency_target_ms",
        "queue_timeout_ms",
        "queue_interval_ms",
        "body_timeout_s",
    )
    @classmethod
    def _positive_time(cls, value: float, info: Any) -> float:
        if value <= 0:
            raise ValueError(f"{info.field_name}={value} must be greater than 0")
        return value

    @field_validator("port")
    @classmethod
    def _port(cls, value: int) -> int:
        if not 1 <= value <= 65535:
            raise ValueError(f"port={value} must be in 1..65535")
        return value

    @field_validator("embedded_redis_port")
    @classmethod
    def _embedded_port(cls, value: int) -> int:
        if not 0 <= value <= 65535:
            raise ValueError(f"embedded_redis_port={value} must be in 0..65535 (0: any)")
        return value

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError(f"key_prefix={value!r} must be non-empty without spaces")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(REDIS_SCHEMES):
            raise ValueError(f"redis_url must start with one of {', '.join(REDIS_SCHEMES)}")
        return value

    @field_validator("otlp_endpoint")
    @classmethod
    def _otlp_endpoint(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"otlp_endpoint={value!r} must start with http:// or https://")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level={value!r} must be one of {', '.join(LOG_LEVELS)}")
        return value.upper()

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str) -> str:
        if value.lower() not in LOG_FORMATS:
            raise ValueError(f"log_format={value!r} must be one of {', '.join(LOG_FORMATS)}")
        return value.lower()

    @field_validator("onnx_providers", mode="before")
    @classmethod
    def _split_providers(cls, value: Any) -> Any:
        # From the environment a comma-separated string; from code a list.
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("onnx_providers")
    @classmethod
    def _known_providers(cls, value: list[str]) -> list[str]:
        import onnxruntime  # the service needs it anyway; imported here to keep config light

        known = set(onnxruntime.get_all_providers())
        unknown = [p for p in value if p not in known]
        if unknown:
            raise ValueError(f"onnx_providers: unknown provider(s) {unknown}")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _key_length(cls, value: list[SecretStr]) -> list[SecretStr]:
        # Never name the key itself in the message: it would land in the logs.
        short = [i for i, k in enumerate(value) if len(k.get_secret_value()) < 16]
        if short:
            raise ValueError(f"api_keys: key(s) number {short} shorter than 16 characters")
        return value

    @model_validator(mode="after")
    def _ops_need_keys(self) -> Settings:
        if self.protect_ops and not self.api_keys:
            raise ValueError("protect_ops=true needs api_keys: no key could open /healthz")
        return self

    @model_validator(mode="after")
    def _cluster_over_tcp(self) -> Settings:
        if self.redis_cluster and (self.redis_url or "unix://").startswith("unix://"):
            raise ValueError("redis_cluster=true needs a redis:// or rediss:// redis_url")
        return self

    @property
    def redis_timeout_s(self) -> float:
        return self.redis_timeout_ms / 1000.0

    @property
    def redis_retry_s(self) -> float:
        return self.redis_retry_ms / 1000.0

    @property
    def history_ttl_s(self) -> int:
        """The history expiry in whole seconds, at least 1; 0 when histories never expire."""
        return max(1, round(self.history_ttl_days * 86400)) if self.history_ttl_days else 0


def settings_table() -> str:
    """The settings as a Markdown table (environment variable, default, description)."""
    rows = ["| Variable | Default | Description |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if default is None or default == []:
            shown = "unset"
        elif isinstance(default, list):
            shown = f"`{','.join(default)}`"
        else:
            shown = f"`{default}`"
        rows.append(f"| `RERANK_{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows) + "\n"
