"""Schema-driven fuzzing of the control plane's OpenAPI document: no request gets a 5xx.

Runs against a real control plane (uvicorn) over the session's two real nodes, so
generation requests that happen to be valid reach Triton. Every API family is fuzzed,
the admin API and the workers' push endpoints with their credentials (so that cases get
past authentication), except removing workers (random ids would remove the real nodes).

``FUZZ_EXAMPLES`` sets the cases per operation (default 20 in CI; ``FUZZ_EXAMPLES=100``
gave the figure in docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from llava_node.launcher import TritonNode
from tests.control_plane.conftest import TINY_SERVED_NAME, wait_for
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
            "LLAVA_CP_ADMIN_TOKEN": ADMIN,
            "LLAVA_CP_WORKER_TOKEN": WORKER,
        },
    )
    cp.start()
    try:
        wait_for(
            lambda: httpx.post(f"{cp.url}/list_models").json()["models"] == [TINY_SERVED_NAME], 60, "ready"
        )
        yield cp
    finally:
        cp.stop()


ADMIN = "fuzz-admin"
WORKER = "fuzz-worker"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))


def operations(cp: ControlPlaneProcess) -> list[Any]:
    schema = schemathesis.openapi.from_url(f"{cp.url}/openapi.json").exclude(
        path_regex=r"^/admin/workers", method=["DELETE"]
    )
    return [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]


def credential(path: str) -> dict[str, str]:
    """The header that gets a case past authentication on ``path``."""
    if path.startswith("/admin"):
        return {"Authorization": f"Bearer {ADMIN}"}
    if path in ("/register_worker", "/receive_heart_beat"):
        return {"Authorization": f"Bearer {WORKER}"}
    return {}


def both_modes(op: Any) -> Any:
    """Cases that fit the schema and cases that do not (wrong types, missing fields, ...)."""
    from hypothesis import strategies as st
    from schemathesis.generation.modes import GenerationMode

    strategies = [op.as_strategy(GenerationMode.POSITIVE)]
    with contextlib.suppress(Exception):  # an operation without inputs has no negative cases
        strategies.append(op.as_strategy(GenerationMode.NEGATIVE))
    return st.one_of(strategies)


def test_no_input_gets_a_server_error(fuzz_cp: ControlPlaneProcess) -> None:
    """Hypothesis generates requests (valid and invalid) for every operation; none may 5xx."""
    failures: list[str] = []
    cases = 0
    ops = operations(fuzz_cp)
    assert len(ops) >= 15
    for op in ops:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        @given(case=both_modes(op))
        def check(case: Any) -> None:
            nonlocal cases
            cases += 1
            response = case.call(timeout=60, headers=credential(case.path))
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{response.text[:300]}\n{case.as_curl_command()}"
                )

        check()
    print(f"fuzz: {cases} cases over {len(ops)} operations, {len(failures)} with a 5xx")
    assert not failures, "\n\n".join(failures[:10])
    assert cases >= len(ops) * min(EXAMPLES, 5)


def test_schema_covers_every_api_family(fuzz_cp: ControlPlaneProcess) -> None:
    paths = httpx.get(f"{fuzz_cp.url}/openapi.json").json()["paths"]
    for path in ["/worker_generate_stream", "/v1/chat/completions", "/admin/sql", "/get_worker_address"]:
        assert path in paths
    assert "requestBody" in paths["/worker_generate_stream"]["post"]
