"""deploy/k8s/: every manifest validated offline against the Kubernetes API's own schemas
(kubernetes-validate ships them, strict: unknown fields are errors), then the rules the
schemas cannot express: probes on the service's routes, a grace period longer than the
service's drain, the HPA and the PDB aimed at the Deployment's pods, the GPU variant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app.config import Settings

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
# An older minor that managed clusters still run, and a recent one.
KUBERNETES_VERSIONS = ("1.31.0", "1.35.0")


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((f"{path.relative_to(K8S)}:{doc['kind']}", doc))
    return out


DOCS = documents()


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [d for _, d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


@pytest.mark.parametrize(("name", "doc"), DOCS, ids=[n for n, _ in DOCS])
def test_manifest_is_valid_kubernetes(name: str, doc: dict[str, Any]) -> None:
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_a_broken_manifest() -> None:
    broken = find("Deployment", "rerank")
    broken = {**broken, "spec": {**broken["spec"], "replicas": "three"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)
    unknown = {**find("Service", "rerank"), "spek": {}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, KUBERNETES_VERSIONS[0], strict=True)


def test_every_kind_is_there() -> None:
    kinds = {d["kind"] for _, d in DOCS}
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Job",
    } <= kinds


@pytest.mark.parametrize("name", ["rerank", "rerank-gpu"])
def test_probes_ports_and_grace_period(name: str) -> None:
    deployment = find("Deployment", name)
    c = container(deployment)
    port = c["ports"][0]
    assert port["containerPort"] == 8000 and port["name"] == "http"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    settings = find("ConfigMap", "rerank")["data"]
    drain = float(settings["RERANK_SHUTDOWN_DELAY_S"]) + float(settings["RERANK_DRAIN_S"])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > drain + 3  # 3 s: the preStop sleep runs inside the grace period too
    assert "time.sleep(3)" in " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    assert c["envFrom"] == [{"configMapRef": {"name": "rerank"}}]


def test_configmap_holds_only_real_settings() -> None:
    data = find("ConfigMap", "rerank")["data"]
    known = {f"RERANK_{name.upper()}" for name in Settings.model_fields}
    assert set(data) <= known, set(data) - known
    for d in ("deployment.yaml", "gpu/deployment-gpu.yaml"):
        for env in container(
            find("Deployment", "rerank" if d == "deployment.yaml" else "rerank-gpu")
        ).get("env", []):
            assert env["name"] in known, env["name"]
    settings = Settings(_env_file=None, **{k[7:].lower(): v for k, v in data.items()})  # type: ignore[arg-type]
    assert settings.redis_url is not None and settings.redis_url.startswith("redis+cluster://")


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize(
    ("service", "deployment"), [("rerank", "rerank"), ("rerank-gpu", "rerank-gpu")]
)
def test_service_selects_its_deployment_only(service: str, deployment: str) -> None:
    selector = find("Service", service)["spec"]["selector"]
    for _, doc in DOCS:
        if doc["kind"] in ("Deployment", "Job"):
            labels = doc["spec"]["template"]["metadata"]["labels"]
            wanted = doc["kind"] == "Deployment" and doc["metadata"]["name"] == deployment
            assert selects(selector, labels) == wanted, doc["metadata"]["name"]
    assert find("Service", service)["spec"]["ports"][0]["targetPort"] == "http"


def test_deployment_selector_matches_its_pods() -> None:
    for _, doc in DOCS:
        if doc["kind"] == "Deployment":
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selects(selector, doc["spec"]["template"]["metadata"]["labels"])


def test_hpa_targets_the_deployment() -> None:
    hpa = find("HorizontalPodAutoscaler", "rerank")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    deployment = find("Deployment", target["name"])
    assert (target["apiVersion"], target["kind"]) == (deployment["apiVersion"], "Deployment")
    assert hpa["spec"]["minReplicas"] >= 2  # with the PDB: a drain never empties the service
    cpu = container(deployment)["resources"]["requests"]["cpu"]
    assert cpu  # utilization targets are relative to the request
    metric = hpa["spec"]["metrics"][0]["resource"]
    assert metric["name"] == "cpu" and 0 < metric["target"]["averageUtilization"] < 100


def test_pdb_selects_the_deployments_pods() -> None:
    pdb = find("PodDisruptionBudget", "rerank")
    deployment = find("Deployment", "rerank")
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert find("HorizontalPodAutoscaler", "rerank")["spec"]["minReplicas"] > 1


def test_job_loads_a_model_version() -> None:
    job = [d for _, d in DOCS if d["kind"] == "Job"]
    assert len(job) == 1
    spec = job[0]["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    c = spec["containers"][0]
    assert c["command"][:2] == ["rerank", "load"] and c["command"][2].startswith("models/")
    assert c["envFrom"] == [{"configMapRef": {"name": "rerank"}}]
    assert c["image"] == container(find("Deployment", "rerank"))["image"]


def test_gpu_variant_requests_a_gpu_on_gpu_nodes() -> None:
    gpu = find("Deployment", "rerank-gpu")
    pod = gpu["spec"]["template"]["spec"]
    c = container(gpu)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert c["image"].endswith(":gpu")  # built with --build-arg VARIANT=gpu
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["RERANK_ONNX_PROVIDERS"].startswith("CUDAExecutionProvider")
    cpu = container(find("Deployment", "rerank"))
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
