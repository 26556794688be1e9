"""deploy/kubernetes: every manifest valid against the Kubernetes API's own JSON schemas
(bundled by kubernetes-validate, offline), and the pieces fit together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from control_plane.fleet.discovery import parse_target
from tests.deploy.conftest import NODE_ENV, ROOT, SETTINGS_ENV, load_yaml, load_yaml_documents

K8S = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes release these manifests are meant for


def manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def resources() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> resource, from the files kustomization.yaml applies."""
    listed = load_yaml(K8S / "kustomization.yaml")["resources"]
    out = {}
    for name in listed:
        for doc in load_yaml_documents(K8S / name):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
def test_manifests_are_valid_kubernetes_objects(path: Path) -> None:
    docs = load_yaml_documents(path)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any error


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    listed = load_yaml(K8S / "kustomization.yaml")["resources"]
    assert sorted(listed) == sorted(p.name for p in manifests() if p.name != "secret.example.yaml")


def container(resource: dict[str, Any]) -> dict[str, Any]:
    containers = resource["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def test_triton_nodes_ask_for_gpus_and_probe_tritons_health(
    resources: dict[tuple[str, str], dict[str, Any]],
) -> None:
    nodes = resources[("Deployment", "triton-node")]
    c = container(nodes)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # time to load a 7B model
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert c["command"][0] == "tritonserver" and "--model-repository=/models" in c["command"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert set(env) <= NODE_ENV
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts[env["LLAVA_CHECKPOINT"]]["readOnly"] is True
    assert "/dev/shm" in mounts


def test_the_headless_service_is_what_the_control_plane_resolves(
    resources: dict[tuple[str, str], dict[str, Any]],
) -> None:
    nodes = resources[("Deployment", "triton-node")]
    svc = resources[("Service", "triton-nodes")]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= nodes["spec"]["template"]["metadata"]["labels"].items()
    cp = container(resources[("Deployment", "llava-control-plane")])
    env = {e["name"]: e for e in cp["env"]}
    host, port = parse_target(env["LLAVA_CP_DISCOVERY_DNS"]["value"])
    namespace = svc["metadata"]["namespace"]
    assert host == f"{svc['metadata']['name']}.{namespace}.svc.cluster.local"
    assert port == next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "http") == 8000


def test_control_plane_replicas_share_a_database_under_distinct_names(
    resources: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = resources[("Deployment", "llava-control-plane")]
    assert deployment["spec"]["replicas"] >= 2
    c = container(deployment)
    env = {e["name"]: e for e in c["env"]}
    assert set(env) <= SETTINGS_ENV, set(env) - SETTINGS_ENV
    assert env["LLAVA_CP_INSTANCE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["LLAVA_CP_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "llava-control-plane"
    assert env["LLAVA_CP_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "llava-control-plane"
    assert env["LLAVA_CP_HOST"]["value"] == "0.0.0.0"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    port = c["ports"][0]["containerPort"]
    assert str(port) == env["LLAVA_CP_PORT"]["value"]
    svc = resources[("Service", "llava-control-plane")]
    assert svc["spec"]["ports"][0]["targetPort"] == c["ports"][0]["name"]
    assert svc["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    secret = load_yaml(K8S / "secret.example.yaml")
    assert set(secret["stringData"]) == {
        e["valueFrom"]["secretKeyRef"]["key"]
        for e in env.values()
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert secret["stringData"]["database-url"].startswith("postgresql+psycopg://")


@pytest.mark.parametrize(
    ("deployment", "service", "port_name"),
    [("triton-node", "triton-nodes", "metrics"), ("llava-control-plane", "llava-control-plane", "http")],
)
def test_pods_and_services_are_annotated_for_prometheus_on_their_metrics_port(
    resources: dict[tuple[str, str], dict[str, Any]], deployment: str, service: str, port_name: str
) -> None:
    pod = resources[("Deployment", deployment)]["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in container(resources[("Deployment", deployment)])["ports"]}
    svc = resources[("Service", service)]
    for annotated in (pod["metadata"], svc["metadata"]):
        notes = annotated["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert notes["prometheus.io/path"] == "/metrics"
        assert int(notes["prometheus.io/port"]) == ports[port_name]  # a string, as annotations must be
    assert any(p["targetPort"] == port_name for p in svc["spec"]["ports"])
    if deployment == "triton-node":  # Triton's metrics stay on (they are by default)
        assert not any(
            "--allow-metrics=false" in a for a in container(resources[("Deployment", deployment)])["command"]
        )
