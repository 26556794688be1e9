"""Dependencies shared by the API modules."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from control_plane.app import ControlPlane
from control_plane.errors import Unauthorized

__all__ = ["AdminDep", "CPDep", "get_cp"]


def get_cp(request: Request) -> ControlPlane:
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


def require_admin(request: Request, cp: CPDep) -> None:
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
