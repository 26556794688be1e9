"""deploy/grafana/llava-fleet.json: an importable Grafana dashboard whose every PromQL
expression names only metrics that exist: the control plane's (its real registry), the
engines' (llava_wire.protocol, as model_repository/llava_engine exports them) and Triton's
(held against a real tiny node's /metrics, and the GPU ones against the tritonserver
library, which this host cannot make export them)."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from control_plane.metrics import ControlPlaneMetrics
from llava_node.launcher import TritonNode, tritonserver_paths
from llava_wire.protocol import ENGINE_METRICS, MODEL_INFO_METRIC
from tests.deploy.conftest import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "llava-fleet.json"

# Triton's metrics the dashboard uses. A CPU node exports these (checked on a real node
# below); the GPU ones only on a GPU host (checked against the library that exports them).
TRITON_METRICS = {
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_pending_request_count",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_request_duration_us",
    "nv_cpu_utilization",
    "nv_cpu_memory_used_bytes",
    "nv_cpu_memory_total_bytes",
}
TRITON_GPU_METRICS = {"nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes"}

_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}
_KEYWORDS |= {"inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    keywords, label lists (``by (...)``), matchers (``{...}``), ranges or numbers."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges ($__rate_interval)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS or re.fullmatch(r"\d+(e\d+)?", word):
            continue
        names.add(word)
    return names


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def exprs() -> list[str]:
    out = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            out.append(target["expr"])
    return out


def control_plane_names() -> set[str]:
    """Every sample name the control plane's registry can export."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    names: set[str] = set()
    for family in ControlPlaneMetrics().registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def engine_names() -> set[str]:
    return {name for name, _help, _kind in ENGINE_METRICS.values()} | {MODEL_INFO_METRIC}


def test_the_parser_finds_metric_names_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, api) (rate(cp_x_bucket{api="a b",le=~".+"}[$__rate_interval])))'
        " / clamp_min(sum without (model) (nv_y offset 5m), 1e-9) and on(instance) z"
    )
    assert metric_names(expr) == {"cp_x_bucket", "nv_y", "z"}


def test_the_dashboard_is_importable() -> None:
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for panel in d["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24


def test_every_metric_the_dashboard_uses_is_exported() -> None:
    known = control_plane_names() | engine_names() | TRITON_METRICS | TRITON_GPU_METRICS
    used: set[str] = set()
    for expr in exprs():
        names = metric_names(expr)
        assert names, expr
        assert not names - known, f"{expr}: {names - known} exported by nothing"
        used |= names
    # what the brief asks of the dashboard is there
    for needed in (
        "cp_requests_total",
        "cp_time_to_first_token_seconds_bucket",
        "cp_completion_tokens_total",
        "cp_inflight_requests",
        "cp_retries_total",
        "cp_routing_decisions_total",
        "cp_cached_prompt_tokens_total",
        "llava_engine_prefix_cache_hit_tokens_total",
        "cp_model_loads_total",
        "nv_inference_request_success",
        "nv_inference_queue_duration_us",
        "nv_gpu_utilization",
        MODEL_INFO_METRIC,
    ):
        assert needed in used, needed


def test_the_engine_exports_the_metrics_of_the_protocol() -> None:
    engine = (ROOT / "model_repository" / "llava_engine" / "1" / "model.py").read_text()
    assert "ENGINE_METRICS.items()" in engine  # every entry becomes a Triton custom metric
    preprocess = (ROOT / "model_repository" / "llava_preprocess" / "1" / "model.py").read_text()
    assert "name=MODEL_INFO_METRIC" in preprocess


def _library_strings() -> str:
    """The printable strings of the library ``tritonserver`` links (libtritonserver)."""
    paths = tritonserver_paths()
    dirs = [
        *paths.lib_dirs,
        paths.binary.parent,
        paths.binary.parent.parent.parent.parent / "nvidia_pytriton.libs",
    ]
    libs = sorted({lib for d in dirs for lib in Path(d).glob("libtritonserver*.so*")})
    assert libs, f"no libtritonserver in {dirs}"
    return subprocess.run(["strings", *map(str, libs)], capture_output=True, text=True, check=True).stdout


def test_the_gpu_metrics_are_ones_the_tritonserver_library_exports() -> None:
    strings = _library_strings()
    for name in sorted(TRITON_GPU_METRICS):
        # the compiler keeps short literals in 16-byte pieces: the name, or its pieces in order
        whole = name in strings
        pieces = name[:16] in strings and name[16:] in strings
        assert whole or pieces, f"{name} is not in Triton's library"


def test_triton_exports_the_node_metrics_the_dashboard_uses(node: TritonNode) -> None:
    with urllib.request.urlopen(node.metrics_url, timeout=10) as r:
        page = r.read().decode()
    exported = {line.split()[2] for line in page.splitlines() if line.startswith("# TYPE ")}
    assert not TRITON_METRICS - exported, f"not on a real node's /metrics: {TRITON_METRICS - exported}"
    assert MODEL_INFO_METRIC in exported  # the worktree's model code is what the node runs
    engine_exported = {name for name, _h, _k in ENGINE_METRICS.values()} - exported
    assert not engine_exported, f"engine metrics missing: {engine_exported}"
