"""docker-compose.yml: its structure, checked without a Docker engine.

Services, published ports, volumes, health checks, GPU reservations, start order, and
that every setting comes from the environment with a safe default and names a real
setting of the control plane or the node.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.deploy.conftest import NODE_ENV, ROOT, SETTINGS_ENV, dockerfile_args, load_yaml

COMPOSE = ROOT / "docker-compose.yml"
NODES = ("triton-node-1", "triton-node-2")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE)
    assert isinstance(data, dict)
    return data


def test_services_and_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"control-plane", *NODES}
    node_args = dockerfile_args(ROOT / "deploy" / "triton-node.Dockerfile")
    for name in NODES:
        node = services[name]
        assert node["build"]["dockerfile"] == "deploy/triton-node.Dockerfile"
        assert (ROOT / node["build"]["context"] / node["build"]["dockerfile"]).is_file()
        # the build pins the same Triton release and Python as the Dockerfile's defaults
        assert node["build"]["args"] == {k: node_args[k] for k in ("TRITON_VERSION", "TRITON_PYTHON")}
    cp = services["control-plane"]
    assert cp["build"]["dockerfile"] == "Dockerfile" and (ROOT / "Dockerfile").is_file()
    assert cp["command"] == ["serve"]


def test_nodes_mount_the_models_and_a_checkpoint_and_start_triton_on_them(compose: dict[str, Any]) -> None:
    for name in NODES:
        node = compose["services"][name]
        mounts = {v.split(":")[-2] if v.count(":") >= 2 else v.split(":")[1]: v for v in node["volumes"]}
        assert mounts["/models"].startswith("./model_repository:")
        assert mounts["/models"].endswith(":ro")
        checkpoint = node["environment"]["LLAVA_CHECKPOINT"]
        assert checkpoint in mounts and mounts[checkpoint].startswith("${LLAVA_CHECKPOINT_DIR:-")
        assert "--model-repository=/models" in node["command"]
        assert node["command"][0] == "tritonserver"
        assert set(node["environment"]) <= NODE_ENV
        assert node["shm_size"]  # the Python backend's shared memory


def test_ports(compose: dict[str, Any]) -> None:
    published: list[str] = []
    for name in NODES:
        ports = compose["services"][name]["ports"]
        # HTTP, gRPC and metrics on Triton's defaults inside: the control plane finds
        # gRPC and metrics from the HTTP port (+1, +2)
        assert [p.rsplit(":", 1)[1] for p in ports] == ["8000", "8001", "8002"]
        published += [p.rsplit(":", 1)[0] for p in ports]
    cp_ports = compose["services"]["control-plane"]["ports"]
    assert [p.rsplit(":", 1)[1] for p in cp_ports] == ["21001"]
    published += [p.rsplit(":", 1)[0] for p in cp_ports]
    # every port published on 127.0.0.1 unless said otherwise, each host port distinct
    for p in published:
        assert p.startswith("${LLAVA_PUBLISH_ADDR:-127.0.0.1}:"), p
    defaults = [re.search(r":-(\d+)}$", p).group(1) for p in published]  # type: ignore[union-attr]
    assert len(set(defaults)) == len(defaults), defaults


def test_gpu_reservations(compose: dict[str, Any]) -> None:
    gpus = []
    for name in NODES:
        devices = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        gpus.append(devices[0]["device_ids"])
    assert gpus[0] != gpus[1]  # one GPU each
    assert "deploy" not in compose["services"]["control-plane"]  # the control plane needs none


def test_health_checks_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in NODES:
        check = services[name]["healthcheck"]
        assert check["test"][0] == "CMD"
        assert "http://127.0.0.1:8000/v2/health/ready" in " ".join(check["test"])
        assert check["start_period"]  # model loading takes minutes
    cp = services["control-plane"]
    assert "/health" in " ".join(cp["healthcheck"]["test"])
    depends = cp["depends_on"]
    assert set(depends) == set(NODES)
    assert "service_healthy" in {d["condition"] for d in depends.values()}


def test_the_sqlite_file_lives_in_a_volume(compose: dict[str, Any]) -> None:
    cp = compose["services"]["control-plane"]
    data_dir = cp["environment"]["LLAVA_CP_DATA_DIR"]
    named = [v.split(":") for v in cp["volumes"]]
    assert [data_dir] == [target for source, target in named if source in compose["volumes"]]


def test_every_setting_comes_from_the_environment_with_a_safe_default(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    references = re.findall(r"(?<!\$)\$\{([^}]*)\}", text)
    assert references
    required = []
    for ref in references:
        m = re.fullmatch(r"(\w+)(:-|:\?)(.*)", ref)
        assert m, f"${{{ref}}} has no default"
        if m.group(2) == ":?":
            required.append(m.group(1))
    assert required == ["LLAVA_CP_ADMIN_TOKEN"]  # no default admin token: it must be chosen
    env = compose["services"]["control-plane"]["environment"]
    assert set(env) <= SETTINGS_ENV, set(env) - SETTINGS_ENV
    assert env["LLAVA_CP_HOST"] == "0.0.0.0"
    workers = re.fullmatch(r"\$\{LLAVA_CP_WORKERS:-(.*)\}", env["LLAVA_CP_WORKERS"]).group(1)  # type: ignore[union-attr]
    assert workers.split(",") == [f"http://{n}:8000" for n in NODES]
