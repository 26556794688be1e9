"""``python -m control_plane models ...``: the model lifecycle of a running control plane.

Calls its admin API over HTTP, so it acts on the live fleet:

    python -m control_plane models list
    python -m control_plane models show llava-b
    python -m control_plane models load llava-b [--worker 2]
    python -m control_plane models unload llava-b [--worker 2]
    python -m control_plane models pin llava-b
    python -m control_plane models unpin llava-b

``--url`` (default ``http://$LLAVA_CP_HOST:$LLAVA_CP_PORT``) and ``--admin-token``
(default ``$LLAVA_CP_ADMIN_TOKEN``) say where and how.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_models_parser", "run_models"]


def add_models_parser(sub: Any) -> None:
    """The ``models`` subcommand and its actions."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the control plane (default http://$LLAVA_CP_HOST:$LLAVA_CP_PORT)")
    common.add_argument("--admin-token", help="admin bearer token (default $LLAVA_CP_ADMIN_TOKEN)")
    common.add_argument("--json", action="store_true", help="print the API's JSON answer")
    common.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for an answer")
    models = sub.add_parser("models", help="list, load, unload and pin models on a running control plane")
    actions = models.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every model with its state on each node", parents=[common])
    for name, text in [
        ("show", "one model, with its placements"),
        ("load", "load a model (on the best node, or --worker) and wait until it is loaded"),
        ("unload", "unload a model (from every node, or --worker)"),
        ("pin", "never unload a model"),
        ("unpin", "let a model be unloaded when idle again"),
    ]:
        p = actions.add_parser(name, help=text, parents=[common])
        p.add_argument("model")
        if name in ("load", "unload"):
            p.add_argument("--worker", type=int, dest="worker_id", help="worker id (see 'models list')")


def _request(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    model = getattr(args, "model", "")
    path = f"/admin/models/{model}"
    if args.action == "list":
        return "GET", "/admin/models", None
    if args.action == "show":
        return "GET", path, None
    if args.action in ("load", "unload"):
        body = {"worker_id": args.worker_id} if args.worker_id is not None else {}
        return "POST", f"{path}/{args.action}", body
    return ("POST" if args.action == "pin" else "DELETE"), f"{path}/pin", None


def _placements(model: dict[str, Any]) -> str:
    return ", ".join(f"{p['worker_id']}:{p['state']}" for p in model["placements"]) or "-"


def _table(models: list[dict[str, Any]]) -> str:
    from control_plane.storage.sql import QueryResult, format_table

    rows = [
        (
            m["model"],
            m["state"],
            m["replicas"],
            "yes" if m["pinned"] else "",
            f"{m['min_replicas']}/{m['max_replicas'] if m['max_replicas'] is not None else '-'}",
            m["inflight"],
            m["last_used_at"] or "",
            _placements(m),
        )
        for m in models
    ]
    columns = ["model", "state", "replicas", "pinned", "min/max", "inflight", "last used", "worker:state"]
    return format_table(QueryResult(columns, rows, False))


def run_models(args: argparse.Namespace) -> int:
    """Run one ``models`` action against the admin API; print the answer."""
    import logging

    import httpx

    from control_plane.config import Settings

    logging.getLogger("httpx").setLevel(logging.WARNING)  # no request lines among the output
    settings = Settings()
    url = (args.url or f"http://{settings.host}:{settings.port}").rstrip("/")
    token = args.admin_token if args.admin_token is not None else settings.admin_token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    method, path, body = _request(args)
    try:
        r = httpx.request(method, url + path, json=body, headers=headers, timeout=args.timeout)
    except httpx.HTTPError as exc:
        print(f"error: could not reach the control plane at {url}: {exc}", file=sys.stderr)
        return 1
    try:
        answer = r.json()
    except ValueError:
        answer = {"detail": r.text}
    if r.status_code >= 400:
        print(f"error ({r.status_code}): {answer.get('detail', answer)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(answer, indent=2))
    elif args.action == "list":
        print(_table(answer["models"]))
    elif args.action in ("show", "pin", "unpin"):
        print(_table([answer]))
        for p in answer["placements"]:
            reason = f"  ({p['reason']})" if p["reason"] and p["state"] != "loaded" else ""
            print(f"  worker {p['worker_id']} {p['worker']}: {p['state']}{reason}")
    elif args.action == "load":
        took = f" in {answer['duration_ms'] / 1000:.1f} s" if "duration_ms" in answer else " (already)"
        print(f"model {answer['model']} loaded on worker {answer['worker_id']} ({answer['worker']}){took}")
    else:
        workers = ", ".join(str(w) for w in answer["unloaded_from"])
        print(f"model {answer['model']} unloaded from worker(s) {workers}")
    return 0
