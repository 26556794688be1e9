"""Schema-driven fuzzing of the control plane's OpenAPI document: no request gets a 5xx.

Runs against a real control plane (uvicorn) over the session's two real nodes, so
generation requests that happen to be valid reach Triton. Mutating fleet endpoints
(adding and removing workers) are left out: random URLs would register junk nodes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from llava_node.launcher import TritonNode
from tests.control_plane.conftest import wait_for
from tests.processes import ControlPlaneProcess


@pytest.fixture(scope="module")
def fuzz_cp(
    fleet: list[TritonNode], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlaneProcess]:
    cp = ControlPlaneProcess(
        tmp_path_factory.mktemp("cp-fuzz"),
        [n.http_url for n in fleet],
        env={
            # short generations keep the run bounded; the limits themselves are what is fuzzed
            "LLAVA_CP_MAX_NEW_TOKENS_CAP": "8",
            "LLAVA_CP_MAX_BODY_BYTES": "200000",
        },
    )
    cp.start()
    try:
        wait_for(lambda: httpx.post(f"{cp.url}/list_models").json()["models"] == ["llava"], 30, "ready")
        yield cp
    finally:
        cp.stop()


def operations(cp: ControlPlaneProcess) -> list[Any]:
    schema = schemathesis.openapi.from_url(f"{cp.url}/openapi.json").exclude(
        path_regex=r"^/admin/workers", method=["POST", "DELETE"]
    )
    return [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]


def test_no_input_gets_a_server_error(fuzz_cp: ControlPlaneProcess) -> None:
    """Hypothesis generates requests (valid and invalid) for every operation; none may 5xx."""
    failures: list[str] = []
    ops = operations(fuzz_cp)
    assert len(ops) >= 15
    for op in ops:

        @settings(
            max_examples=20,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        @given(case=op.as_strategy())
        def check(case: Any) -> None:
            response = case.call(timeout=60)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{response.text[:300]}\n{case.as_curl_command()}"
                )

        check()
    assert not failures, "\n\n".join(failures[:10])


def test_schema_covers_every_api_family(fuzz_cp: ControlPlaneProcess) -> None:
    paths = httpx.get(f"{fuzz_cp.url}/openapi.json").json()["paths"]
    for path in ["/worker_generate_stream", "/v1/chat/completions", "/admin/sql", "/get_worker_address"]:
        assert path in paths
    assert "requestBody" in paths["/worker_generate_stream"]["post"]
