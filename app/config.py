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
    model_dir: Path = Field(
        default=Path("models"),
        description="Folder of exported model versions (models/<version>/model.onnx ...).",
    )
    host: str = Field(default="127.0.0.1", description="Address `rerank serve` binds to.")
    port: int = Field(default=8000, description="Port `rerank serve` listens on.")
    max_batch: int = Field(
        default=32, description="Most requests scored together in one ONNX Runtime call."
    )
    max_wait_ms: float = Field(
        default=2.0,
        description="Upper bound on any deliberate wait for a batch to fill; the batcher has "
        "none: a request that finds the model idle runs at once, and a batch is what queued "
        "up while the previous one ran.",
    )
    queue_limit: int = Field(
        default=256,
        description="Most requests waiting for the model; beyond it requests get 503 at once.",
    )
    retry_after_s: int = Field(
        default=1,
        description="Retry-After seconds sent with a 503: past the in-flight limit, or with "
        "the batch queue full.",
    )
    redis_timeout_ms: float = Field(
        default=50.0,
        description="Deadline for the Redis calls of one request; past it the answer is "
        "degraded (the caller's order).",
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
    version_poll_s: float = Field(
        default=1.0,
        description="How often the service reads rr:active to notice a new model version.",
    )
    log_level: str = Field(default="INFO", description="Logging level of the service.")
    max_body_bytes: int = Field(
        default=1_048_576,
        description="Largest request body accepted, in bytes; a larger one gets 413 before "
        "it is read whole.",
    )
    max_inflight: int = Field(
        default=64,
        description="Most /rerank and /events requests one process works on at once; beyond "
        "the current limit a request gets 503 with Retry-After at once, before its body is "
        "read (0: no limit).",
    )
    admission_target_ms: float = Field(
        default=6.0,
        description="Time in the process (Redis waits left out) that the adaptive in-flight "
        "limit allows (app/admission.py), or more where admission_base_ratio says so. The "
        "limit starts at 16 and moves only in a 100 ms window in which it refused a request "
        "(closed early once 4 answers in it passed the target): when the 90th percentile of "
        "that time passed the target, it is cut in proportion (down to 1); else it grows by "
        "half, up to max_inflight. 0: the limit stays at max_inflight.",
    )
    admission_base_ratio: float = Field(
        default=1.8,
        description="The admission target is at least this multiple of the process's own "
        "unloaded time: the lowest 90th percentile of the 100 ms windows in which the limit "
        "refused nothing, a minimum that may rise 1% a window. So a slower machine is not "
        "held to a faster one's target: 6 ms is 1.8x the 3.3 ms measured on the 2-core box "
        "it was set on. 0: admission_target_ms alone.",
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="API keys, comma separated. Set: /rerank and /events need one in "
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

    @field_validator(
        "max_batch",
        "queue_limit",
        "retry_after_s",
        "redis_max_connections",
        "max_candidates",
        "max_k",
        "max_history",
        "explain_top",
        "max_body_bytes",
    )
    @classmethod
    def _positive_int(cls, value: int, info: Any) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name}={value} must be at least 1")
        return value

    @field_validator(
        "cache_size",
        "onnx_threads",
        "max_wait_ms",
        "max_inflight",
        "admission_target_ms",
        "admission_base_ratio",
        "shutdown_delay_s",
        "drain_s",
    )
    @classmethod
    def _not_negative(cls, value: float, info: Any) -> float:
        if value < 0:
            raise ValueError(f"{info.field_name}={value} must not be negative")
        return value

    @field_validator("redis_timeout_ms", "version_poll_s")
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
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0


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
