"""The shape of the code: packages stand on each other in one direction, no import circles,
small modules, and the control plane's processes free of torch and of node code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("llava_wire", "llava_node", "control_plane", "llava_stack")
# who may import whom (the dev stack stands above both sides; both stand on the wire package)
MAY_IMPORT = {
    "llava_wire": {"llava_wire"},
    "llava_node": {"llava_wire", "llava_node"},
    "control_plane": {"llava_wire", "control_plane"},
    "llava_stack": {"llava_wire", "llava_node", "control_plane", "llava_stack"},
}
MAX_CONTROL_PLANE_LINES = 400
NODE_SIDE = ("torch", "transformers", "llava_node", "tokenizers", "PIL")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports (inside functions too; ``TYPE_CHECKING`` ones too)."""
    out: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).strip(".")
            # `from pkg import mod` imports the module mod (as import-linter reads it), not pkg's names
            subs = [f"{base}.{a.name}" for a in node.names]
            names = [n for n in subs if n in known] or [base]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module_name(path):
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    # a package's __init__ is not an edge target unless imported as such: keep modules only
    return {m: imports_of(p, known) for m, p in known.items()}


def test_no_arrow_between_the_control_plane_and_the_node() -> None:
    wrong = [
        f"{m} imports {dep}"
        for m, deps in graph().items()
        for dep in deps
        if dep.split(".")[0] not in MAY_IMPORT[m.split(".")[0]]
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_circle_anywhere() -> None:
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in g:
        if v not in index:
            visit(v)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_control_plane_modules_are_small() -> None:
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines())
        for p in (ROOT / "control_plane").rglob("*.py")
    }
    big = {p: n for p, n in sizes.items() if n >= MAX_CONTROL_PLANE_LINES}
    assert not big, big


def test_preprocessing_needs_no_engine_code() -> None:
    """llava_preprocess (CPU instances) needs the tokenizer and the image processor, not
    the engine (it had imported the engine package, and so torch, for a path helper)."""
    known = modules()
    todo = [ROOT / "model_repository" / "llava_preprocess" / "1" / "model.py"]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [known[m] for m in imports_of(path, known)]
    reached = {module_name(p) for p in seen if p.is_relative_to(ROOT / "llava_node")}
    assert reached and not any(m.startswith("llava_node.engine") for m in reached), reached


def _imported_by(code: str) -> set[str]:
    """Top-level modules a fresh interpreter has imported after running ``code``."""
    probe = code + "\nimport sys\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return set(out.stdout.split())


def test_the_control_plane_imports_no_node_code_when_it_runs() -> None:
    """At run time, not only at import time: an app through its lifespan, with a request
    served and its node client, the CLI's commands, and the dev stack's own code."""
    app_run = """
import asyncio, tempfile
from fastapi.testclient import TestClient
from control_plane.config import Settings
from control_plane.main import create_app
from control_plane.nodes.fake import FakeNodeClient, FakeNode
nodes = FakeNodeClient([FakeNode("http://127.0.0.1:9000", tokens=["a", "b"])])
settings = Settings(data_dir=tempfile.mkdtemp(), workers=["http://127.0.0.1:9000"], poll_interval_s=60, lease_period_s=120)
with TestClient(create_app(settings, node_client=nodes)) as c:
    r = c.post("/worker_generate_stream", json={"model": "llava", "prompt": "hi"})
    assert r.status_code == 200, r.text
    c.post("/admin/sql", json={"query": "SELECT 1"})
import control_plane.cli, control_plane.server, control_plane.nodes.triton, control_plane.models_cli
"""
    loaded = _imported_by(app_run)
    assert "control_plane" in loaded and "llava_wire" in loaded
    assert not loaded & set(NODE_SIDE), loaded & set(NODE_SIDE)
    # the CLI's SQL command, as a process
    out = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "control_plane",
            "sql",
            "--data-dir",
            "/nonexistent",
            "SELECT 1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
    assert "control_plane" in imported and not imported & set(NODE_SIDE), imported & set(NODE_SIDE)


def test_the_architecture_document_names_every_module() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT / pkg).as_posix()
            if path.name == "__init__.py" and rel != "engine/__init__.py":
                continue
            if f"`{rel}" not in doc and f"`{pkg}/{rel}`" not in doc and f" `{rel}`" not in doc:
                missing.append(f"{pkg}/{rel}")
    assert not missing, f"docs/architecture.md does not name: {missing}"
