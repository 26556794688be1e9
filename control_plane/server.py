"""Serving the app: uvicorn with the timeouts toward clients, and the process's signals."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

__all__ = ["exit_on_sigterm", "prepare_grpc", "run_server"]


def prepare_grpc(settings: Any) -> None:
    """Apply ``settings.grpc_experiments`` to this process before gRPC is imported (gRPC
    reads ``GRPC_EXPERIMENTS`` when it starts); an explicit environment variable wins."""
    if settings.grpc_experiments and "GRPC_EXPERIMENTS" not in os.environ:
        if "grpc" in sys.modules:
            logging.getLogger(__name__).warning("gRPC is already imported: GRPC_EXPERIMENTS may not apply")
        os.environ["GRPC_EXPERIMENTS"] = settings.grpc_experiments


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so ``finally`` blocks run (uvicorn re-raises the
    signal it caught after its own shutdown)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def run_server(settings: Any, log_level: str) -> None:
    """Serve the control plane with uvicorn (uvloop, httptools) until it is stopped.
    Call :func:`prepare_grpc` first, before anything imports gRPC."""
    import uvicorn

    from control_plane.http_guard import ClientTimeouts, guarded_protocol
    from control_plane.main import create_app

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
