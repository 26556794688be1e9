"""The process harness the tests, benchmarks and checks share: a control plane as its own
process (``python -m control_plane serve``, in a session of its own, stopped by its PID,
never by name), and a stop-signal handler that unwinds a run and, as a last resort,
kills every process group it started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llava_node.launcher import PROJECT_ROOT, free_port

__all__ = ["ControlPlaneProcess", "StartedGroups"]

LAST_RESORT_S = 30.0


class StartedGroups:
    """Every process group a run started (each leader in a session of its own), so that a
    SIGTERM or SIGINT can unwind the run and, if unwinding has not ended it
    :data:`LAST_RESORT_S` later, kill the groups whose leaders are still its children."""

    def __init__(self) -> None:
        self.leaders: list[subprocess.Popen[bytes]] = []

    def track(self, proc: subprocess.Popen[bytes] | None) -> None:
        """Record a leader."""
        if proc is not None and proc not in self.leaders:
            self.leaders.append(proc)

    def kill_all(self) -> None:
        """SIGKILL every recorded group whose leader is still running."""
        for proc in self.leaders:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)

    def install(self) -> None:
        """Handle SIGTERM and SIGINT: raise in the main thread (its ``finally`` blocks stop
        what was started), with the last resort armed."""

        def on_signal(signum: int, _frame: Any) -> None:
            def last_resort() -> None:
                time.sleep(LAST_RESORT_S)
                self.kill_all()
                os._exit(128 + signum)

            signal.signal(signum, signal.SIG_IGN)  # one unwind at a time
            threading.Thread(target=last_resort, name="last-resort", daemon=True).start()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)


class ControlPlaneProcess:
    """``python -m control_plane serve`` on a free loopback port, logging to a file.

    ``src``: the source tree to run (another checkout, for a benchmark's baseline);
    ``groups``: where to record the process for a run's stop signals.
    """

    def __init__(
        self,
        data_dir: Path,
        workers: Sequence[str] = (),
        *,
        name: str = "control plane",
        poll_interval_s: float | None = 0.5,
        admin_token: str | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        src: Path = PROJECT_ROOT,
        log_level: str = "warning",
        groups: StartedGroups | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.workers = list(workers)
        self.name = name
        self.poll_interval_s = poll_interval_s
        self.admin_token = admin_token
        self.extra_args = list(extra_args)
        self.env = env or {}
        self.src = src
        self.log_level = log_level
        self.groups = groups
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / f"control-plane-{self.port}.log"

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """Its process id."""
        assert self.process is not None
        return self.process.pid

    @property
    def db_path(self) -> Path:
        """Its SQLite file (when no database URL is given)."""
        return self.data_dir / "control_plane.db"

    def command(self) -> list[str]:
        """The command line it runs."""
        cmd = [
            sys.executable,
            "-m",
            "control_plane",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        cmd += ["--data-dir", str(self.data_dir), "--log-level", self.log_level]
        if self.poll_interval_s is not None:
            cmd += ["--poll-interval", str(self.poll_interval_s)]
        if self.admin_token is not None:
            cmd += ["--admin-token", self.admin_token]
        for w in self.workers:
            cmd += ["--worker", w]
        return cmd + self.extra_args

    def start(self, timeout_s: float = 60.0) -> ControlPlaneProcess:
        """Start it and wait until ``/health`` answers."""
        env = {**os.environ, "PYTHONPATH": str(self.src), **self.env}
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.src,
                start_new_session=True,
            )
        if self.groups is not None:
            self.groups.track(self.process)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log()[-4000:]}")
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(f"{self.url}/health", timeout=1) as r,
            ):
                if r.status == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not up after {timeout_s:g} s:\n{self.log()[-4000:]}")

    def running(self) -> bool:
        """Whether it is still running."""
        return self.process is not None and self.process.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send it ``sig`` and wait for it to end (not for SIGSTOP and SIGCONT)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, sig)
            if sig not in (signal.SIGSTOP, signal.SIGCONT):
                self.process.wait(30)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM, SIGKILL after ``grace_s``; then whatever is left of its group."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def log(self) -> str:
        """Everything it logged."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 3000) -> str:
        """The end of its log."""
        return self.log()[-chars:] or "(no log)"
