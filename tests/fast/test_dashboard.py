"""The dashboard on fake nodes: who may see it (the admin token, the browser session and
what the session may not do), bounded ranges, and every plot's series after real traffic
through the control plane (both APIs, an error, a cold start)."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import pytest

from control_plane.dashboard import session
from control_plane.dashboard.assets import load_asset
from control_plane.dashboard.queries import HistoryReader
from control_plane.dashboard.ranges import MAX_BUCKETS, parse_range
from control_plane.dashboard.series import build_plots, error_kind, state_segments
from control_plane.errors import BadRequest
from tests.fast.harness import Harness, Response, eventually, node

TOKEN = "dash-admin-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
PLOTS = {
    "timeline",
    "requests",
    "errors",
    "ttft_worker",
    "ttft_api",
    "tokens_worker",
    "tokens_api",
    "load",
    "model_loads",
    "cache",
    "routing",
}


def cookie_of(r: Response) -> str:
    header = r.headers["set-cookie"]
    assert "HttpOnly" in header and "SameSite=strict" in header and f"Path={session.COOKIE_PATH}" in header
    return header.split(";", 1)[0]


async def sign_in(h: Harness, token: str = TOKEN) -> Response:
    return await h.client.post(
        "/admin/dashboard/login",
        f"token={token}".encode(),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )


async def test_the_page_asks_for_the_token_and_a_session_only_reads(tmp_path: Path) -> None:
    async with Harness(tmp_path, [node(9000)], admin_token=TOKEN).running() as h:
        page = await h.client.get("/admin/dashboard")
        assert page.status == 401 and b'name="token"' in page.body  # the sign-in form
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert (await h.client.get("/admin/dashboard/data")).status == 401
        wrong = await sign_in(h, "nope")
        assert wrong.status == 401 and b"not the admin token" in wrong.body
        assert "set-cookie" not in wrong.headers
        foreign = await h.client.post(
            "/admin/dashboard/login", f"token={TOKEN}".encode(), headers={"origin": "http://evil.example"}
        )
        assert foreign.status == 403
        cross_site = await h.client.post(
            "/admin/dashboard/login", f"token={TOKEN}".encode(), headers={"sec-fetch-site": "cross-site"}
        )
        assert cross_site.status == 403

        ok = await sign_in(h)
        assert ok.status == 303 and ok.headers["location"] == "/admin/dashboard"
        cookie = {"cookie": cookie_of(ok)}
        assert TOKEN not in cookie["cookie"]  # an HMAC of an expiry, never the token
        page = await h.client.get("/admin/dashboard", headers=cookie)
        assert page.status == 200 and b"plot-timeline" in page.body
        assert (await h.client.get("/admin/dashboard/data?range=15m", headers=cookie)).status == 200
        # the cookie is no admin credential anywhere else, and never for a write
        assert (await h.client.get("/admin/workers", headers=cookie)).status == 401
        assert (await h.client.post("/admin/sql", {"query": "SELECT 1"}, headers=cookie)).status == 401
        assert (await h.client.post("/admin/models/llava/unload", headers=cookie)).status == 401
        # a wrong bearer is refused even beside a good cookie; a right one works alone
        bad = {**cookie, "Authorization": "Bearer wrong"}
        assert (await h.client.get("/admin/dashboard/data", headers=bad)).status == 401
        assert (await h.client.get("/admin/dashboard/data", headers=BEARER)).status == 200
        out = await h.client.post("/admin/dashboard/logout", headers=cookie)
        assert out.status == 303 and "Max-Age=0" in out.headers["set-cookie"]


def test_sessions_expire_and_end_with_the_token() -> None:
    value = session.issue(TOKEN, now=1000.0, lifetime_s=60)
    assert session.valid(TOKEN, value, now=1030.0)
    assert not session.valid(TOKEN, value, now=1061.0)
    assert not session.valid("another token", value, now=1030.0)
    assert not session.valid(TOKEN, value.replace(".", ".0"), now=1030.0)
    assert not session.valid(TOKEN, "99999999999." + value.split(".")[1], now=1030.0)
    assert not session.valid("", value, now=1030.0)


async def test_without_an_admin_token_the_dashboard_is_open_as_the_admin_api_is(tmp_path: Path) -> None:
    async with Harness(tmp_path, [node(9000)]).running() as h:
        page = await h.client.get("/admin/dashboard")
        assert page.status == 200 and b'data-signed-in="false"' in page.body
        assert (await h.client.get("/admin/dashboard/data")).status == 200


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("range=2y", "range must be one of 15m, 1h, 6h, 24h, 7d"),
        ("since=yesterday", "since must be Unix seconds or an ISO 8601 time"),
        ("since=2026-01-01T00:00:00Z&until=2025-01-01T00:00:00Z", "since must be before until"),
        ("since=0&until=99999999999", "at most 31 days"),
        ("since=nan", "finite"),
        ("range=24h&bucket=1", f"at most {MAX_BUCKETS}"),
        ("range=1h&bucket=0.001", "at least 1 second"),
        ("range=1h&since=1", "either range or since/until"),
    ],
)
async def test_a_range_out_of_bounds_is_a_400_that_says_why(tmp_path: Path, query: str, message: str) -> None:
    async with Harness(tmp_path, [node(9000)]).running() as h:
        r = await h.client.get(f"/admin/dashboard/data?{query}")
        assert r.status == 400, r.body
        assert message in r.json()["detail"]


def test_ranges_pick_round_buckets() -> None:
    now = 1_800_000_000.0
    assert parse_range("1h", now=now).bucket_s == 60
    assert parse_range("15m", now=now).bucket_s == 15
    assert parse_range("24h", now=now).bucket_s == 1800
    assert parse_range("7d", now=now).buckets <= MAX_BUCKETS
    r = parse_range(since="2027-01-15T08:00:00Z", until="2027-01-15T09:00:00+00:00", now=now)
    assert (r.since, r.until - r.since, r.buckets) == (1_800_000_000.0, 3600, 60)
    with pytest.raises(BadRequest):
        parse_range(since=str(now - 10), until=str(now - 20), now=now)


def test_errors_are_sorted_into_kinds() -> None:
    assert error_kind("worker http://n:8000 failed: Stub process is not healthy") == "node failed"
    assert error_kind("worker http://n:8000: connection refused") == "unreachable"
    assert error_kind("no token for 60 s: the stream stalled") == "stalled"
    assert error_kind("left running by a previous run of the control plane") == "abandoned at restart"
    assert error_kind("invalid request: 2 images for 1 placeholder") == "bad request"
    assert error_kind("model llava-13b could not be loaded on any node") == "model load failed"
    assert error_kind("the prompt has 1 <image> placeholder(s) but 0 image(s) were given") == "bad request"
    assert error_kind("") == "unknown"


async def traffic(h: Harness) -> None:
    """Both APIs; some land on the node that fails mid-stream (an error each)."""
    for i in range(6):
        await h.llava(prompt=f"USER: hello {i} ASSISTANT:")
        await h.chat(messages=[{"role": "user", "content": f"hi {i}"}])
    assert (await h.chat(model="llava-13b")).status == 200  # a cold start on the node that lists it


async def test_every_plot_has_series_after_traffic(tmp_path: Path) -> None:
    big = dict.fromkeys(("llava-13b", "llava-13b_preprocess", "llava-13b_engine"), "")
    failing = node(9010, fail_after=2)
    # tokens 2 ms apart: a decode rate needs decode time, which a node that sends every
    # token at once leaves to the clocks' jitter (duration_ms - ttft_ms <= 0, no series)
    a = node(9000, queued=2, active=1, load_delay_s=0.05, token_delay_s=0.002)
    a.models.update(big)
    async with Harness(
        # (no migrations: the node failing mid-stream must leave errors to plot)
        tmp_path,
        [a, failing],
        admin_token=TOKEN,
        dispatch_policy="round_robin",
        max_migrations=0,
    ).running() as h:
        await traffic(h)
        await eventually(lambda: h.cp.service.admission.waiting == 0)
        await asyncio.sleep(0.1)  # a few polls: heartbeats with the nodes' queues
        r = await h.client.get("/admin/dashboard/data?range=15m&bucket=5", headers=BEARER)
        assert r.status == 200, r.body
        body: dict[str, Any] = r.json()
        assert body["range"]["bucket_s"] == 5 and body["range"]["buckets"] == 180
        empty = {k for k, traces in body["plots"].items() if not traces or not any(t["x"] for t in traces)}
        assert set(body["plots"]) == PLOTS and not empty, empty
        names = {k: {t["name"] for t in v} for k, v in body["plots"].items()}
        assert {"llava ok", "openai ok"} <= names["requests"]
        assert {"llava p50", "openai p95"} <= names["ttft_api"]
        assert "node failed" in names["errors"]
        assert "llava-13b loaded" in names["model_loads"]
        assert "healthy" in names["timeline"]
        assert any(n.endswith("queued on node") for n in names["load"])
        assert body["tables"]["errors"][0]["kind"] == "node failed"
        assert any(e["event"] == "loaded" for e in body["tables"]["model_events"])
        assert {w["name"] for w in body["live"]["workers"]} == {a.http_url, failing.http_url}
        total = sum(sum(t["y"]) for t in body["plots"]["requests"]) * 5 / 60
        count = await h.client.post("/admin/sql", {"query": "SELECT COUNT(*) FROM requests"}, headers=BEARER)
        assert round(total) == count.json()["rows"][0][0]


async def test_the_timeline_starts_with_the_state_before_the_range(tmp_path: Path) -> None:
    flaky = node(9000)
    async with Harness(tmp_path, [flaky, node(9010)], offline_after_s=0.2).running() as h:
        flaky.up = False
        await eventually(lambda: h.worker(flaky).state.value == "offline", what="offline")
        flaky.up = True
        await eventually(lambda: h.worker(flaky).state.value == "healthy", what="healthy again")
        h.cp.writer.flush(2.0)
        now = time.time()
        span = parse_range(since=str(now - 30), until=str(now + 1), now=now)
        s = h.settings
        rows = HistoryReader(s.sqlalchemy_url, "sqlite", timeout_s=5, max_result_bytes=1 << 20).read(span)
        segments = state_segments(rows, span, now=now + 1)[flaky.http_url]
        assert [seg[2] for seg in segments] == ["unknown", "healthy", "unhealthy", "offline", "healthy"]
        assert span.since < segments[0][0] and segments[-1][1] == now + 1  # registered in the range
        assert all(a[1] == b[0] for a, b in itertools.pairwise(segments))  # no gaps
        # a range that starts later begins with the state the node was in then
        late = parse_range(since=str(segments[-1][0] + 0.001), until=str(now + 1), now=now)
        later = state_segments(
            HistoryReader(s.sqlalchemy_url, "sqlite", timeout_s=5, max_result_bytes=1 << 20).read(late),
            late,
            now=now + 1,
        )
        assert [seg[2] for seg in later[flaky.http_url]] == ["healthy"]
        assert build_plots(rows, span)["timeline"]


async def test_the_page_files_ship_with_the_package_and_plotly_is_local(tmp_path: Path) -> None:
    async with Harness(tmp_path, [node(9000)], admin_token=TOKEN).running() as h:
        js = await h.client.get("/admin/dashboard/assets/plotly.min.js", headers={"accept-encoding": "gzip"})
        assert js.status == 200 and js.headers["content-encoding"] == "gzip"
        assert len(js.body) < len(load_asset("plotly.min.js").body) / 2
        again = await h.client.get(
            "/admin/dashboard/assets/plotly.min.js", headers={"if-none-match": js.headers["etag"]}
        )
        assert again.status == 304
        for name in ("dashboard.js", "dashboard.css"):
            assert (await h.client.get(f"/admin/dashboard/assets/{name}")).status == 200
        assert (await h.client.get("/admin/dashboard/assets/../config.py")).status == 404
        assert (await h.client.get("/admin/dashboard/assets/dashboard.html")).status == 404
        page = load_asset("dashboard.html").body.decode() + load_asset("dashboard.js").body.decode()
        assert "http://" not in page and "https://" not in page  # nothing from the internet
