"""Dependencies shared by the API modules.

Every dependency is ``async def``: FastAPI runs a plain ``def`` dependency in a worker
thread, a thread hop per request on the first-token path for work that needs no I/O.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from control_plane.container import ControlPlane
from control_plane.errors import Forbidden, Unauthorized

__all__ = [
    "AdminDep",
    "CPDep",
    "WorkerCredentialDep",
    "get_cp",
    "require_api_key",
    "require_api_key_for_llava",
    "worker_credential",
]


async def get_cp(request: Request) -> ControlPlane:
    """The app's :class:`ControlPlane`."""
    cp: ControlPlane = request.app.state.cp
    return cp


CPDep = Annotated[ControlPlane, Depends(get_cp)]


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header, if any."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def require_admin(request: Request, cp: CPDep) -> None:
    """Admin endpoints need the admin token, when one is configured."""
    expected = cp.settings.admin_token
    if not expected:
        return
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("this admin endpoint needs 'Authorization: Bearer <admin token>'")
    if not secrets.compare_digest(token, expected):
        raise Unauthorized("the admin token is wrong")


AdminDep = Depends(require_admin)


async def worker_credential(request: Request, cp: CPDep) -> bool:
    """Check the credential of a worker's push (``/register_worker``, ``/receive_heart_beat``);
    returns whether it is the admin token (only admins change a registered worker).

    Accepted: the admin token or the worker token as ``Authorization: Bearer``; without
    either configured the endpoints are off, unless ``open_worker_registration`` is set.
    """
    s = cp.settings
    token = bearer_token(request)
    if token is not None and s.admin_token and secrets.compare_digest(token, s.admin_token):
        return True
    if token is not None and s.worker_token and secrets.compare_digest(token, s.worker_token):
        return False
    if s.open_worker_registration:
        return False
    if not s.admin_token and not s.worker_token:
        raise Forbidden(
            "worker registration and pushed heartbeats are off: this control plane has no worker token; "
            "set LLAVA_CP_WORKER_TOKEN (workers send 'Authorization: Bearer <token>'), or "
            "LLAVA_CP_OPEN_WORKER_REGISTRATION=true on a trusted network"
        )
    if token is None:
        raise Unauthorized("this endpoint needs 'Authorization: Bearer <worker token or admin token>'")
    raise Unauthorized("the worker token is wrong")


WorkerCredentialDep = Annotated[bool, Depends(worker_credential)]


async def require_api_key(request: Request, cp: CPDep) -> None:
    """Inference APIs need one of the configured API keys, when any are configured."""
    keys = cp.settings.api_keys
    if not keys:
        return
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    if not any(secrets.compare_digest(token, k) for k in keys):
        raise Unauthorized("incorrect API key")


async def require_api_key_for_llava(request: Request, cp: CPDep) -> None:
    """LLaVA's protocol checks API keys only when ``llava_api_requires_key`` is set."""
    if cp.settings.llava_api_requires_key:
        await require_api_key(request, cp)
