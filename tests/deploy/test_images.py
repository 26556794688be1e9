"""The images: what the Dockerfiles install matches what the code imports, and the Triton
image's Python backend matches the model code (and the Triton the tests run).

NVIDIA's ``tritonserver:<YY.MM>-py3`` images run Python-backend models in a stub built
for the image's own Python: 3.10 in the 23.05 to 24.11 releases (Ubuntu 22.04), 3.12
from 24.12 on (Ubuntu 24.04), per NVIDIA's release notes and compatibility matrix.
The model code (``model_repository/*/1/model.py`` and every ``llava_node`` module they
import) must run on that Python.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest
import vermin

from tests.deploy.conftest import ROOT, dockerfile_args, dockerfile_instructions

NODE_DOCKERFILE = ROOT / "deploy" / "triton-node.Dockerfile"
CP_DOCKERFILE = ROOT / "Dockerfile"
PROJECT_PACKAGES = ("llava_wire", "llava_node", "control_plane", "llava_stack")
PROVIDED_BY_TRITON = {"triton_python_backend_utils"}
# top-level module -> the requirement that provides it
REQUIREMENT_OF = {
    "torch": "torch",
    "triton": "torch",  # OpenAI Triton ships with torch's CUDA builds (the GPU kernels)
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "PIL": "pillow",
    "numpy": "numpy",
    "fastapi": "fastapi",
    "starlette": "fastapi",
    "uvicorn": "uvicorn",
    "sqlalchemy": "sqlalchemy",
    "pydantic": "pydantic",
    "pydantic_settings": "pydantic-settings",
    "prometheus_client": "prometheus-client",
    "httpx": "httpx",
    "orjson": "orjson",
    "aiohttp": "aiohttp",
    "tritonclient": "tritonclient",
    "grpc": "tritonclient",  # tritonclient[grpc]
    "psycopg": "psycopg",
}


def triton_python(release: str) -> str:
    """The Python of NVIDIA's ``tritonserver:<release>-py3`` image."""
    year, month = (int(x) for x in release.split("."))
    if (year, month) < (23, 5):
        return "3.8"
    return "3.10" if (year, month) < (24, 12) else "3.12"


def triton_release(server_version: str) -> str:
    """The NGC release (YY.MM) of a Triton server version: 2.30.0 is 23.01, one minor a month."""
    minor = int(server_version.split(".")[1])
    months = minor - 30
    assert months >= 0, server_version
    return f"{23 + months // 12}.{months % 12 + 1:02d}"


def requirements(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(re.split(r"[\[<>=!~ ;]", line, maxsplit=1)[0].lower())
    return names


def module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_closure(start: list[Path], exclude: set[str] = frozenset()) -> tuple[list[Path], set[str]]:  # type: ignore[assignment]
    """The project files ``start`` imports, transitively (imports inside functions too),
    and the third-party top-level modules imported along the way."""
    seen: dict[Path, None] = {}
    third_party: set[str] = set()
    todo = list(start)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen[path] = None
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                top = name.split(".")[0]
                if top in PROJECT_PACKAGES:
                    if any(name == e or name.startswith(e + ".") for e in exclude):
                        continue
                    parts = name.split(".")
                    for i in range(1, len(parts) + 1):  # packages' __init__ run too
                        f = module_file(".".join(parts[:i]))
                        if f is not None:
                            todo.append(f)
                elif top not in sys.stdlib_module_names and top not in ("__future__", *PROVIDED_BY_TRITON):
                    third_party.add(top)
    return list(seen), third_party


def model_code() -> tuple[list[Path], set[str]]:
    models = sorted(ROOT.glob("model_repository/*/1/model.py"))
    assert len(models) == 2
    return import_closure(models)


def test_the_node_image_is_nvidias_triton_with_the_python_the_args_say() -> None:
    args = dockerfile_args(NODE_DOCKERFILE)
    assert dockerfile_instructions(NODE_DOCKERFILE, "FROM") == [
        "nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3"
    ]
    assert re.fullmatch(r"\d\d\.\d\d", args["TRITON_VERSION"])
    assert args["TRITON_PYTHON"] == triton_python(args["TRITON_VERSION"])


def test_the_node_image_carries_the_models_and_the_node_code_on_the_python_path() -> None:
    copies = dict(c.split()[:2][::-1] for c in dockerfile_instructions(NODE_DOCKERFILE, "COPY"))
    assert copies["/models/"] == "model_repository/"
    assert copies["/opt/llava/llava_node/"] == "llava_node/"
    assert copies["/opt/llava/llava_wire/"] == "llava_wire/"
    files, _ = model_code()
    assert {f.relative_to(ROOT).parts[0] for f in files} <= {"model_repository", "llava_node", "llava_wire"}
    env = " ".join(dockerfile_instructions(NODE_DOCKERFILE, "ENV"))
    assert "PYTHONPATH=/opt/llava" in env and "LLAVA_CHECKPOINT=/checkpoints/llava" in env
    cmd = json.loads(dockerfile_instructions(NODE_DOCKERFILE, "CMD")[0])
    assert cmd[0] == "tritonserver" and "--model-repository=/models" in cmd


def test_the_model_code_runs_on_the_images_python() -> None:
    major, minor = (int(x) for x in dockerfile_args(NODE_DOCKERFILE)["TRITON_PYTHON"].split("."))
    wanted = (major, minor)
    files, _ = model_code()
    assert any(f.parts[-2:] == ("engine", "batching.py") for f in files)  # the walk reaches the engine
    for f in files:
        source = f.read_text()
        ast.parse(source, filename=str(f), feature_version=wanted)  # syntax
        needed = vermin.detect(source, path=str(f))[1]  # standard library and syntax, per version
        assert needed is not None and needed <= wanted, f"{f.relative_to(ROOT)} needs Python {needed}"


def test_the_node_requirements_cover_the_model_codes_imports() -> None:
    _, third_party = model_code()
    assert {"torch", "transformers", "numpy"} <= third_party
    unknown = third_party - set(REQUIREMENT_OF)
    assert not unknown, f"add {unknown} to REQUIREMENT_OF and deploy/triton-node.requirements.txt"
    listed = requirements(ROOT / "deploy" / "triton-node.requirements.txt")
    assert {REQUIREMENT_OF[m] for m in third_party} <= listed
    assert "nvidia-pytriton" not in listed  # the image has its own Triton


def test_the_control_plane_image_covers_its_imports_and_postgresql() -> None:
    files, third_party = import_closure(sorted((ROOT / "control_plane").rglob("*.py")))
    # the control plane stands on the wire package alone: no node code, no torch
    assert {f.relative_to(ROOT).parts[0] for f in files} == {"control_plane", "llava_wire"}
    unknown = third_party - set(REQUIREMENT_OF)
    assert not unknown, f"add {unknown} to REQUIREMENT_OF and deploy/control-plane.requirements.txt"
    listed = requirements(ROOT / "deploy" / "control-plane.requirements.txt")
    assert {REQUIREMENT_OF[m] for m in third_party} | {"psycopg"} <= listed
    assert not {"torch", "transformers", "nvidia-pytriton"} & (listed | third_party)
    copies = {c.split()[0] for c in dockerfile_instructions(CP_DOCKERFILE, "COPY")}
    assert {"control_plane/", "llava_wire/"} <= copies and "llava_node/" not in copies
    assert json.loads(dockerfile_instructions(CP_DOCKERFILE, "ENTRYPOINT")[0]) == [
        "python",
        "-m",
        "control_plane",
    ]


@pytest.mark.parametrize(
    ("version", "release"), [("2.30.0", "23.01"), ("2.51.0", "24.10"), ("2.53.0", "24.12")]
)
def test_triton_release_numbers(version: str, release: str) -> None:
    assert triton_release(version) == release
