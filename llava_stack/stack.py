"""Local Triton nodes plus the control plane, until Ctrl-C.

Starts ``--nodes`` tritonserver processes serving ``model_repository/`` (the tiny
random-weight checkpoint unless one is given) in explicit model-control mode with
``llava`` loaded (the control plane loads and unloads the repository's other models on
demand), then the control plane as its own process with those nodes registered; once it
answers, prints where everything listens and example requests, and on Ctrl-C stops
everything it started: the control plane first, then the nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from control_plane.cli import SETTINGS_KEYS, add_settings_args, settings_from_args
from control_plane.server import exit_on_sigterm
from llava_node.launcher import (
    NodeStartError,
    TritonNode,
    TritonNodeConfig,
    free_port_block,
    resolve_checkpoint,
    stop_all,
)

__all__ = ["main", "run_stack"]

CONTROL_PLANE_START_S = 120.0
NODE_LOG_DIR = Path(__file__).resolve().parent.parent / "var" / "logs"  # beside var/data
CONTROL_PLANE_STOP_S = 20.0


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


def _start_nodes(checkpoint: Path, count: int) -> list[TritonNode]:
    host = "127.0.0.1"
    nodes: list[TritonNode] = []
    used: set[int] = set()
    for _ in range(count):
        base = free_port_block(host, 8000, avoid=used)
        used.update(range(base, base + 3))
        config = TritonNodeConfig(
            checkpoint=checkpoint,
            host=host,
            http_port=base,
            grpc_port=base + 1,
            metrics_port=base + 2,
            # The control plane decides what else each node loads, and when.
            model_control="explicit",
            load_models=["llava"],
            # kept after Ctrl-C: the paths printed below stay readable
            log_dir=NODE_LOG_DIR,
        )
        nodes.append(TritonNode(config))
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
    return nodes


def _control_plane_env(args: argparse.Namespace) -> dict[str, str]:
    """The control plane's settings, as the environment variables its process reads."""
    env = dict(os.environ)
    for key in SETTINGS_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            env[f"LLAVA_CP_{key.upper()}"] = json.dumps(value) if isinstance(value, list) else str(value)
    # the dev stack's nodes are local: nothing else may be registered
    env.setdefault("LLAVA_CP_WORKER_ALLOWED_HOSTS", "loopback")
    return env


def _wait_up(process: subprocess.Popen[bytes], url: str) -> bool:
    deadline = time.monotonic() + CONTROL_PLANE_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the control plane: it has the SIGINT of a Ctrl-C already, or gets a SIGTERM."""
    if process.poll() is None:
        try:
            process.wait(2)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
    try:
        process.wait(CONTROL_PLANE_STOP_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _banner(settings: Any) -> str:
    url = f"http://{settings.host}:{settings.port}"
    return (
        f"\ncontrol plane: {url}   (API docs {url}/docs)\n"
        f"dashboard:     {url}/admin/dashboard   (sign in with the admin token)\n"
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
        "Press Ctrl-C to stop the control plane and the nodes."
    )


def run_stack(args: argparse.Namespace) -> int:
    """Run nodes and control plane in the foreground."""
    exit_on_sigterm()
    if args.admin_token is None:
        args.admin_token = secrets.token_urlsafe(24)
    nodes: list[TritonNode] = []
    process: subprocess.Popen[bytes] | None = None
    try:
        nodes = _start_nodes(
            resolve_checkpoint(Path(args.checkpoint) if args.checkpoint else None), args.nodes
        )
        args.workers = (args.workers or []) + [n.http_url for n in nodes]
        env = _control_plane_env(args)
        settings = settings_from_args(args)
        if "LLAVA_CP_WORKER_ALLOWED_HOSTS" not in os.environ:
            settings = settings.model_copy(update={"worker_allowed_hosts": ["loopback"]})
        process = subprocess.Popen(
            [sys.executable, "-m", "control_plane", "serve", "--log-level", args.log_level], env=env
        )
        if not _wait_up(process, f"http://{settings.host}:{settings.port}"):
            print("error: the control plane did not start (its output is above)", file=sys.stderr)
            return 1
        print(_banner(settings), flush=True)
        return process.wait()
    except NodeStartError as exc:
        print(f"error: a Triton node failed to start:\n{exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if process is not None:
            _stop(process)
        if nodes:
            print(f"stopping {len(nodes)} Triton node(s)...", flush=True)
            stop_all(nodes)
            print(f"stopped {len(nodes)} Triton node(s)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m llava_stack``."""
    parser = argparse.ArgumentParser(prog="python -m llava_stack", description=__doc__.splitlines()[0])
    add_settings_args(parser)
    parser.add_argument("--nodes", type=int, default=2, help="Triton nodes to start (default 2)")
    parser.add_argument("--checkpoint", help="llava-hf checkpoint directory (default: the tiny test one)")
    parser.add_argument("--log-level", default="warning", help="the control plane's log level")
    return run_stack(parser.parse_args(argv))
