"""Command line: ``serve`` the control plane, run read-only ``sql``, manage ``models``, or run the local ``stack``.

python -m control_plane serve --worker http://10.0.0.5:8000 --worker http://10.0.0.6:8000
python -m control_plane sql "SELECT * FROM worker_uptime_24h"
python -m control_plane models list      # models and their placements (admin API)
python -m control_plane stack            # two local Triton nodes + the control plane
python -m control_plane copy-db --from sqlite:///var/data/control_plane.db --to postgresql+psycopg://...
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from control_plane.models_cli import add_models_parser, run_models

__all__ = ["main", "prepare_grpc", "settings_from_args"]


def _add_settings_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 21001, LLaVA's controller port)")
    p.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite file in the data dir)")
    p.add_argument("--data-dir", help="where the default SQLite file lives")
    p.add_argument("--worker", action="append", dest="workers", help="a Triton node's HTTP URL (repeat)")
    p.add_argument("--poll-interval", type=float, dest="poll_interval_s")
    p.add_argument("--dispatch-policy", choices=["shortest_queue", "lottery", "round_robin", "power_of_two"])
    p.add_argument("--admin-token", help="bearer token required by /admin (default: none)")
    p.add_argument("--api-key", action="append", dest="api_keys", help="accepted API key (repeat)")
    p.add_argument("--public-url", help="base URL clients reach this control plane at")
    p.add_argument("--instance-name", help="this replica's name in the database (default hostname:port)")
    p.add_argument(
        "--lease-period", type=float, dest="lease_period_s", help="poll lease period in seconds (default 10)"
    )
    p.add_argument(
        "--discovery-dns", help="host:port whose A records are nodes (e.g. a Kubernetes headless Service)"
    )


def settings_from_args(args: argparse.Namespace) -> Any:
    """Settings from the environment, overridden by the options given."""
    from control_plane.config import Settings

    keys = [
        "host",
        "port",
        "database_url",
        "data_dir",
        "workers",
        "poll_interval_s",
        "dispatch_policy",
        "admin_token",
        "api_keys",
        "public_url",
        "instance_name",
        "lease_period_s",
        "discovery_dns",
    ]
    from pydantic import ValidationError

    overrides = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise SystemExit(f"error: invalid settings: {problems}") from None


def prepare_grpc(settings: Any) -> None:
    """Apply ``settings.grpc_experiments`` to this process before gRPC is imported (gRPC
    reads ``GRPC_EXPERIMENTS`` when it starts); an explicit environment variable wins."""
    import os

    if settings.grpc_experiments and "GRPC_EXPERIMENTS" not in os.environ:
        if "grpc" in sys.modules:
            logging.getLogger(__name__).warning("gRPC is already imported: GRPC_EXPERIMENTS may not apply")
        os.environ["GRPC_EXPERIMENTS"] = settings.grpc_experiments


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so ``finally`` blocks run (uvicorn re-raises the
    signal it caught after its own shutdown)."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def _serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    prepare_grpc(settings)
    exit_on_sigterm()
    print(f"control plane listening on http://{settings.host}:{settings.port} (Ctrl-C stops it)", flush=True)
    run_server(settings, args.log_level)
    return 0


def run_server(settings: Any, log_level: str) -> None:
    """Serve the control plane with uvicorn (uvloop, httptools) until it is stopped.
    Call :func:`prepare_grpc` first, before anything imports gRPC."""
    import uvicorn

    from control_plane.app import create_app
    from control_plane.http_guard import ClientTimeouts, guarded_protocol

    timeouts = ClientTimeouts(
        header_s=settings.client_header_timeout_s,
        body_s=settings.client_body_timeout_s,
        send_s=settings.client_send_timeout_s,
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        loop="uvloop",
        http=guarded_protocol(timeouts),  # httptools, with timeouts toward clients
        access_log=False,
    )


def _sql(args: argparse.Namespace) -> int:
    from control_plane.errors import ServiceError
    from control_plane.sql import format_table, run_readonly

    settings = settings_from_args(args)
    try:
        # The same limits as the admin API's (LLAVA_CP_SQL_TIMEOUT_S, LLAVA_CP_SQL_MAX_RESULT_BYTES).
        result = run_readonly(
            settings.sqlalchemy_url,
            args.query,
            max_rows=args.max_rows,
            timeout_s=args.timeout if args.timeout is not None else settings.sql_timeout_s,
            max_result_bytes=settings.sql_max_result_bytes,
        )
    except ServiceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(format_table(result))
    return 0


def _copy_db(args: argparse.Namespace) -> int:
    from control_plane.migrate import copy_database

    try:
        copied = copy_database(
            args.source, args.target, progress=lambda table, n: print(f"{table}: {n} rows", flush=True)
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"copied {sum(copied.values())} rows into {args.target.split('@')[-1]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m control_plane", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the control plane")
    _add_settings_args(serve)
    serve.add_argument("--log-level", default="info")
    sql = sub.add_parser("sql", help="run one read-only SQL query and print a table")
    _add_settings_args(sql)
    sql.add_argument("query")
    sql.add_argument("--max-rows", type=int, default=1000)
    sql.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sql.add_argument(
        "--timeout", type=float, help="stop the query after this many seconds (default: sql_timeout_s, 30)"
    )
    add_models_parser(sub)
    stack = sub.add_parser("stack", help="run two local Triton nodes and the control plane")
    _add_settings_args(stack)
    stack.add_argument("--nodes", type=int, default=2)
    stack.add_argument("--checkpoint", help="llava-hf checkpoint directory (default: the tiny test one)")
    stack.add_argument("--log-level", default="warning")
    copy = sub.add_parser(
        "copy-db", help="copy the worker store to another (empty) database, e.g. SQLite to PostgreSQL"
    )
    copy.add_argument("--from", dest="source", required=True, help="SQLAlchemy URL to copy from")
    copy.add_argument("--to", dest="target", required=True, help="SQLAlchemy URL of an empty database")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "serve":
        return _serve(args)
    if args.command == "sql":
        return _sql(args)
    if args.command == "copy-db":
        return _copy_db(args)
    if args.command == "models":
        return run_models(args)
    from control_plane.stack import run_stack

    return run_stack(args)
