"""Real processes for end-to-end tests: control planes run under uvicorn, stopped by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llava_node.launcher import PROJECT_ROOT, TritonNode, TritonNodeConfig, free_port, free_port_block

_HANDED_OUT: set[int] = set()


def node_config(checkpoint: Path, **kwargs: Any) -> TritonNodeConfig:
    """A node on three consecutive free ports (HTTP, gRPC = HTTP + 1, metrics = HTTP + 2),
    Triton's own convention, which the control plane relies on to discover them."""
    base = free_port_block("127.0.0.1", 20000 + (os.getpid() % 500) * 40, avoid=_HANDED_OUT)
    _HANDED_OUT.update(range(base, base + 3))
    return TritonNodeConfig(
        checkpoint=checkpoint, http_port=base, grpc_port=base + 1, metrics_port=base + 2, **kwargs
    )  # type: ignore[arg-type]


def start_nodes(checkpoint: Path, count: int) -> list[TritonNode]:
    """Start ``count`` nodes in parallel and wait until all are ready."""
    nodes = []
    for _ in range(count):
        n = TritonNode(node_config(checkpoint))
        n.start(wait=False)  # ports are taken now, so the next block differs
        nodes.append(n)
    try:
        for n in nodes:
            n.wait_ready(180)
    except BaseException:
        for n in nodes:
            n.stop()
        raise
    return nodes


class ControlPlaneProcess:
    """``python -m control_plane serve`` in its own process (real uvicorn, real SQLite file)."""

    def __init__(
        self,
        data_dir: Path,
        workers: Sequence[str] = (),
        *,
        poll_interval_s: float = 0.5,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.workers = list(workers)
        self.poll_interval_s = poll_interval_s
        self.extra_args = list(extra_args)
        self.env = env or {}
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / f"control-plane-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "control_plane.db"

    def start(self, timeout_s: float = 60.0) -> ControlPlaneProcess:
        cmd = [
            sys.executable,
            "-m",
            "control_plane",
            "serve",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--poll-interval",
            str(self.poll_interval_s),
            "--log-level",
            "warning",
        ]
        for w in self.workers:
            cmd += ["--worker", w]
        cmd += self.extra_args
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **self.env}
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=PROJECT_ROOT
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"control plane exited:\n{self.log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"control plane not up after {timeout_s} s:\n{self.log_path.read_text()[-4000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, sig)
            self.process.wait(30)

    def stop(self) -> None:
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""
