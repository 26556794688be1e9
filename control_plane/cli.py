"""Command line: ``serve`` the control plane, run read-only ``sql``, manage ``models``, copy the store.

python -m control_plane serve --worker http://10.0.0.5:8000 --worker http://10.0.0.6:8000
python -m control_plane sql "SELECT * FROM worker_uptime_24h"
python -m control_plane models list      # models and their placements (admin API)
python -m control_plane copy-db --from sqlite:///var/data/control_plane.db --to postgresql+psycopg://...
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from control_plane.models_cli import add_models_parser, run_models

__all__ = ["DISPATCH_POLICIES", "SETTINGS_KEYS", "add_settings_args", "main", "settings_from_args"]


# The settings the options set (every setting is also an environment variable LLAVA_CP_*).
SETTINGS_KEYS = (
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
)


# config.DispatchPolicy's values, spelled out: the command line imports config only once it has parsed them
DISPATCH_POLICIES = ["cache_aware", "shortest_queue", "lottery", "round_robin", "power_of_two"]


def add_settings_args(p: argparse.ArgumentParser) -> None:
    """The options that override settings (:data:`SETTINGS_KEYS`)."""
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 21001, LLaVA's controller port)")
    p.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite file in the data dir)")
    p.add_argument("--data-dir", help="where the default SQLite file lives")
    p.add_argument("--worker", action="append", dest="workers", help="a Triton node's HTTP URL (repeat)")
    p.add_argument("--poll-interval", type=float, dest="poll_interval_s")
    p.add_argument(
        "--dispatch-policy",
        choices=DISPATCH_POLICIES,
        help="how a node is chosen for a request (default cache_aware)",
    )
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
    from pydantic import ValidationError

    from control_plane.config import Settings

    overrides = {k: getattr(args, k) for k in SETTINGS_KEYS if getattr(args, k, None) is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise SystemExit(f"error: invalid settings: {problems}") from None


def _serve(args: argparse.Namespace) -> int:
    from control_plane.server import exit_on_sigterm, prepare_grpc, run_server

    settings = settings_from_args(args)
    prepare_grpc(settings)
    exit_on_sigterm()
    print(f"control plane listening on http://{settings.host}:{settings.port} (Ctrl-C stops it)", flush=True)
    run_server(settings, args.log_level)
    return 0


def _sql(args: argparse.Namespace) -> int:
    from control_plane.errors import ServiceError
    from control_plane.storage.sql import format_table, run_readonly

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
    from control_plane.storage.migrate import copy_database

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
    add_settings_args(serve)
    serve.add_argument("--log-level", default="info")
    sql = sub.add_parser("sql", help="run one read-only SQL query and print a table")
    add_settings_args(sql)
    sql.add_argument("query")
    sql.add_argument("--max-rows", type=int, default=1000)
    sql.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sql.add_argument(
        "--timeout", type=float, help="stop the query after this many seconds (default: sql_timeout_s, 30)"
    )
    add_models_parser(sub)
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
    return run_models(args)
