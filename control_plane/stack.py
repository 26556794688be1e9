"""The main job: local Triton nodes plus the control plane, until Ctrl-C.

Starts ``--nodes`` tritonserver processes serving ``model_repository/`` (the tiny
random-weight checkpoint unless one is given) in explicit model-control mode with
``llava`` loaded (the control plane loads and unloads the repository's other models
on demand), then the control plane with those nodes registered, prints where
everything listens and an example request, and on Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["free_port_block", "run_stack", "stop_all"]


def free_port_block(host: str, start: int, size: int = 3, avoid: set[int] | None = None) -> int:
    """The first port >= ``start`` such that ``size`` consecutive ports are free."""
    avoid = avoid or set()
    port = start
    while port < 65000:
        block = range(port, port + size)
        if not avoid.intersection(block) and all(_free(host, p) for p in block):
            return port
        port += size
    raise RuntimeError("no free port block found")


def _free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _push_status(settings: Any) -> str:
    """What /register_worker and /receive_heart_beat accept, in words."""
    if settings.open_worker_registration:
        return "open (LLAVA_CP_OPEN_WORKER_REGISTRATION): any client may register a worker"
    if settings.worker_token:
        return "/register_worker and /receive_heart_beat need 'Authorization: Bearer <worker or admin token>'"
    if settings.admin_token:
        return (
            "/register_worker and /receive_heart_beat need 'Authorization: Bearer <admin token>' "
            "(or set LLAVA_CP_WORKER_TOKEN)"
        )
    return "off (set LLAVA_CP_WORKER_TOKEN, or LLAVA_CP_OPEN_WORKER_REGISTRATION=true)"


def stop_all(nodes: list[Any]) -> None:
    """Stop nodes in parallel (each waits for its server to exit, then kills what is left)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, len(nodes))) as pool:
        list(pool.map(lambda n: n.stop(), nodes))


def run_stack(args: argparse.Namespace) -> int:
    """Run nodes and control plane in the foreground."""
    from control_plane.cli import exit_on_sigterm, prepare_grpc, run_server, settings_from_args

    prepare_grpc(settings_from_args(args))  # before anything imports gRPC
    from llava_node.launcher import NodeStartError, TritonNode, TritonNodeConfig, resolve_checkpoint

    exit_on_sigterm()
    checkpoint = resolve_checkpoint(Path(args.checkpoint) if args.checkpoint else None)
    host = "127.0.0.1"
    nodes: list[TritonNode] = []
    used: set[int] = set()
    try:
        for _ in range(args.nodes):
            base = free_port_block(host, 8000, avoid=used)
            used.update(range(base, base + 3))
            nodes.append(
                TritonNode(
                    TritonNodeConfig(
                        checkpoint=checkpoint,
                        host=host,
                        http_port=base,
                        grpc_port=base + 1,
                        metrics_port=base + 2,
                        # The control plane decides what else each node loads, and when.
                        model_control="explicit",
                        load_models=["llava"],
                    )
                )
            )
        started = time.monotonic()
        for n in nodes:
            n.start(wait=False)
        for n in nodes:
            n.wait_ready(n.config.startup_timeout_s)
        print(f"{len(nodes)} Triton node(s) ready in {time.monotonic() - started:.1f} s:")
        for n in nodes:
            print(
                f"  http {n.http_url}  grpc {n.grpc_url}  metrics {n.metrics_url}  (pid {n.pid}, log {n.log_path})"
            )

        if args.admin_token is None:
            args.admin_token = secrets.token_urlsafe(24)
        args.workers = (args.workers or []) + [n.http_url for n in nodes]
        settings = settings_from_args(args)
        if "LLAVA_CP_WORKER_ALLOWED_HOSTS" not in os.environ:
            # the dev stack's nodes are local: nothing else may be registered
            settings = settings.model_copy(update={"worker_allowed_hosts": ["loopback"]})
        url = f"http://{settings.host}:{settings.port}"
        print(
            f"\ncontrol plane: {url}   (API docs {url}/docs)\n"
            f"database:      {settings.sqlalchemy_url}\n"
            f"admin token:   {settings.admin_token}\n"
            f"worker pushes: {_push_status(settings)}\n"
            f"worker hosts:  {', '.join(settings.worker_allowed_hosts)} (LLAVA_CP_WORKER_ALLOWED_HOSTS)\n\n"
            "Try it:\n"
            f"  curl -s -X POST {url}/list_models\n"
            f"  curl -sN {url}/worker_generate_stream -d "
            '\'{"model": "llava", "prompt": "USER: Hello ASSISTANT:", "max_new_tokens": 32}\' | tr \'\\0\' \'\\n\'\n'
            f"  curl -s -H 'Authorization: Bearer {settings.admin_token}' {url}/admin/workers\n"
            f"  .venv/bin/python -m control_plane models list --url {url} --admin-token {settings.admin_token}\n"
            f"  .venv/bin/python -m control_plane sql --database-url '{settings.sqlalchemy_url}' "
            "'SELECT * FROM worker_uptime_24h'\n\n"
            "Press Ctrl-C to stop the control plane and the nodes.",
            flush=True,
        )
        run_server(settings, args.log_level)
        return 0
    except NodeStartError as exc:
        print(f"error: a Triton node failed to start:\n{exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if nodes:
            print(f"stopping {len(nodes)} Triton node(s)...", flush=True)
            stop_all(nodes)
            print(f"stopped {len(nodes)} Triton node(s)")
