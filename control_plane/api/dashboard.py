"""The admin dashboard: ``GET /admin/dashboard`` (the page), ``GET /admin/dashboard/data``
(its series, JSON), the sign-in form that turns the admin token into a browser session,
and the page's files.

Who may look: with an admin token configured, ``Authorization: Bearer <admin token>`` (as
every admin route), or the session cookie of :mod:`control_plane.dashboard.session`, which
only these ``GET`` routes accept; without one, the dashboard is open like the rest of the
admin API (which ``serve`` allows on a loopback host only). It only reads: the history
through the read-only SQL path on admin SQL's own threads, the live load from memory.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from control_plane.api.deps import CPDep, bearer_token, require_admin
from control_plane.api.errors import plain_error
from control_plane.api.routes import family_route
from control_plane.container import ControlPlane
from control_plane.dashboard import session
from control_plane.dashboard.assets import ASSETS, AssetMissing, load_asset
from control_plane.dashboard.queries import HistoryReader, Rows
from control_plane.dashboard.ranges import TimeRange, iso, parse_range
from control_plane.dashboard.series import build_plots, error_table, model_event_table
from control_plane.errors import BadRequest, Forbidden, NotFound, Unauthorized
from control_plane.storage.sql import QueryHandle, SqlInterrupted

__all__ = ["router"]

router = APIRouter(prefix=session.COOKIE_PATH, tags=["dashboard"], route_class=family_route(plain_error))

READ_FLUSH_TIMEOUT_S = 2.0  # the writes queued before a refresh, so it shows them; bounded
MAX_LOGIN_BYTES = 4096
# The page loads its own files only: no inline script, nothing from another origin; plotly
# sets inline styles; no framing (the sign-in form cannot be clickjacked).
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _signed_in(request: Request, cp: ControlPlane) -> bool:
    """A browser session for the configured admin token, on a safe method."""
    return request.method in ("GET", "HEAD") and session.valid(
        cp.settings.admin_token, request.cookies.get(session.COOKIE_NAME)
    )


async def require_viewer(request: Request, cp: CPDep) -> None:
    """The admin token as a bearer header, or a dashboard session (``GET`` only)."""
    if not cp.settings.admin_token or (bearer_token(request) is None and _signed_in(request, cp)):
        return
    if bearer_token(request) is None:
        raise Unauthorized(
            f"sign in at {session.COOKIE_PATH} with the admin token, or send 'Authorization: Bearer <admin token>'"
        )
    await require_admin(request, cp)


ViewerDep = Depends(require_viewer)


def _page(name: str, status_code: int = 200, replace: dict[str, str] | None = None) -> Response:
    try:
        body = load_asset(name).body
    except AssetMissing as exc:
        raise NotFound(str(exc)) from None
    for key, value in (replace or {}).items():
        body = body.replace(key.encode(), value.encode())
    return Response(body, status_code=status_code, media_type=ASSETS[name], headers=PAGE_HEADERS)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _login_page(message: str, status_code: int) -> Response:
    return _page("login.html", status_code, {"{{message}}": _escape(message)})


@router.get("", response_class=Response)
async def dashboard_page(request: Request, cp: CPDep) -> Response:
    """The dashboard (HTML). Without credentials, the sign-in form (401)."""
    try:
        await require_viewer(request, cp)
    except Unauthorized as exc:
        message = "" if bearer_token(request) is None else exc.message
        return _login_page(message, 401)
    return _page("dashboard.html", replace={"{{signed_in}}": "true" if cp.settings.admin_token else "false"})


def _same_origin(request: Request) -> bool:
    """A form post from a page of this host, as the browser tells (``Sec-Fetch-Site``,
    else ``Origin``), or from a client that is no browser (it sends neither)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "")


@router.post("/login", response_class=Response)
async def login(request: Request, cp: CPDep) -> Response:
    """Sign in with the admin token (form field ``token``): a session cookie for the
    dashboard's pages (``HttpOnly``, ``SameSite=Strict``, path ``/admin/dashboard``), then
    back to the dashboard (303). A wrong token: the form again (401)."""
    if not _same_origin(request):
        raise Forbidden("sign-in is only accepted from the dashboard's own page")
    expected = cp.settings.admin_token
    if not expected:
        return RedirectResponse(session.COOKIE_PATH, status_code=303)
    raw = await request.body()
    if len(raw) > MAX_LOGIN_BYTES:
        raise BadRequest("the sign-in form is too large")
    token = parse_qs(raw.decode("utf-8", "replace")).get("token", [""])[0].strip()
    if not token or not secrets.compare_digest(token.encode(), expected.encode()):
        await asyncio.sleep(0.2)  # a typo costs little; guessing costs more
        return _login_page("That is not the admin token.", 401)
    response = RedirectResponse(session.COOKIE_PATH, status_code=303)
    response.set_cookie(
        session.COOKIE_NAME,
        session.issue(expected),
        max_age=session.SESSION_S,
        path=session.COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https",
    )
    return response


@router.post("/logout", response_class=Response)
async def logout() -> Response:
    """End the browser session (the cookie is cleared)."""
    response = RedirectResponse(session.COOKIE_PATH, status_code=303)
    response.delete_cookie(session.COOKIE_NAME, path=session.COOKIE_PATH, httponly=True, samesite="strict")
    return response


@router.get("/assets/{name}", response_class=Response)
async def asset(name: str, request: Request) -> Response:
    """The page's files (no credentials: they are the package's own): its script, style,
    and plotly.js from the installed ``plotly`` package; gzipped when the client takes it."""
    if name not in ASSETS or name.endswith(".html"):
        raise NotFound(f"no dashboard file {name!r}")
    try:
        file = await asyncio.to_thread(load_asset, name)
    except AssetMissing as exc:
        raise NotFound(str(exc)) from None
    headers = {
        "ETag": file.etag,
        "Cache-Control": "private, max-age=3600",
        "X-Content-Type-Options": "nosniff",
    }
    if request.headers.get("if-none-match") == file.etag:
        return Response(status_code=304, headers=headers)
    if "gzip" in request.headers.get("accept-encoding", ""):
        gzipped = await asyncio.to_thread(lambda: file.gzipped)
        if gzipped is not None:
            headers |= {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
            return Response(gzipped, media_type=file.media_type, headers=headers)
    return Response(file.body, media_type=file.media_type, headers=headers)


def live_view(cp: ControlPlane) -> dict[str, Any]:
    """The load now, from memory: per worker its state, streams in flight and queue on the
    node; requests waiting for room in this control plane."""
    workers = sorted(cp.store.all(), key=lambda w: w.id)
    return {
        "at": iso(time.time()),
        "waiting": cp.service.admission.waiting,
        "rejected": cp.service.admission.rejected,
        "inflight": sum(w.inflight for w in workers),
        "workers": [
            {
                "id": w.id,
                "name": w.name,
                "state": w.state.value,
                "inflight": w.inflight,
                "active": w.active,
                "queue_length": w.queue_length,
                "models": sorted(m for m, s in w.models.items() if s.ready),
                "last_error": w.last_error,
            }
            for w in workers
        ],
    }


async def _read(cp: ControlPlane, span: TimeRange, request: Request) -> Rows:
    executor = cp.sql
    if executor is None:
        raise SqlInterrupted("the SQL interface is not running")
    s = cp.settings
    reader = HistoryReader(
        s.sqlalchemy_url, cp.db.dialect, timeout_s=s.sql_timeout_s, max_result_bytes=s.sql_max_result_bytes
    )

    def job(handle: QueryHandle) -> Rows:
        cp.writer.flush(READ_FLUSH_TIMEOUT_S)
        return reader.read(span, handle)

    return await executor.run(job, disconnected=request.is_disconnected)


@router.get("/data", dependencies=[ViewerDep])
async def dashboard_data(
    request: Request,
    cp: CPDep,
    range_: Annotated[
        str | None, Query(alias="range", description="15m, 1h, 6h, 24h or 7d, ending now")
    ] = None,
    since: Annotated[str | None, Query(description="start: Unix seconds or ISO 8601 (UTC)")] = None,
    until: Annotated[str | None, Query(description="end: Unix seconds or ISO 8601; default now")] = None,
    bucket: Annotated[str | None, Query(description="seconds per point; default about 60 points")] = None,
) -> JSONResponse:
    """The dashboard's series over a time range: node states (a timeline), requests per
    minute, TTFT and decode tokens/s percentiles per node and per API, errors by kind,
    model loads with their cold-start times, in-flight and queued load, prefix-cache hit
    rates and routing reasons; and the live load. At most 31 days and 720 points a series
    (400 beyond, saying what is allowed); read-only, on admin SQL's threads and limits."""
    span = parse_range(range_, since, until, bucket)
    rows = await _read(cp, span, request)
    body = {
        "range": span.to_json(),
        "generated_at": iso(time.time()),
        "database": cp.db.dialect,
        "live": live_view(cp),
        "plots": build_plots(rows, span),
        "tables": {"errors": error_table(rows), "model_events": model_event_table(rows)},
        "truncated": rows.truncated,
        "query_ms": round(rows.elapsed_ms, 1),
    }
    return JSONResponse(body, headers={"Cache-Control": "no-store"})
