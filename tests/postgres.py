"""A real PostgreSQL server for tests: initdb into a temporary directory, ``postgres``
on a free loopback port, stopped by its process id.

PostgreSQL refuses to run as root; as root (CI, containers) the server runs as the
``postgres`` user where one exists, else as ``nobody``, from a directory it owns.
``scripts/test.sh`` installs the server where none is found.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from llava_node.launcher import free_port

__all__ = ["PostgresServer", "find_pg_bin"]


def find_pg_bin() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, or None if not installed."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("postgres"):
        return Path(initdb).resolve().parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name.split(".")[0])
    )
    for d in reversed(candidates):
        if (Path(d) / "initdb").is_file() and (Path(d) / "postgres").is_file():
            return Path(d)
    return None


class PostgresServer:
    """One throwaway PostgreSQL cluster (trust authentication, loopback only)."""

    def __init__(self, bin_dir: Path, user: str = "llava") -> None:
        self.bin_dir = bin_dir
        self.user = user
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="llava-pg-"))
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log_path = self.root / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                with contextlib.suppress(KeyError):
                    self._run_as = pwd.getpwnam(name)
                    break

    def _popen_kwargs(self) -> dict[str, object]:
        env = {
            "PATH": f"{self.bin_dir}:/usr/bin:/bin",
            "LC_ALL": "C",
            "LANG": "C",
            "HOME": str(self.root),
            "TZ": "UTC",
        }
        kwargs: dict[str, object] = {"env": env, "cwd": str(self.root)}
        if self._run_as is not None:
            kwargs.update(user=self._run_as.pw_uid, group=self._run_as.pw_gid, extra_groups=[])
        return kwargs

    def start(self, timeout_s: float = 60.0) -> PostgresServer:
        self.socket_dir.mkdir(parents=True)
        if self._run_as is not None:
            os.chmod(self.root, 0o755)
            for path in (self.root, self.socket_dir):
                os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)
        init = subprocess.run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            **self._popen_kwargs(),  # type: ignore[call-overload]
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
        log = open(self.log_path, "ab")  # noqa: SIM115 - the server writes to it until stopped
        try:
            self.process = subprocess.Popen(
                [
                    str(self.bin_dir / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-k",
                    str(self.socket_dir),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=60",
                    "-c",
                    "shared_buffers=32MB",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **self._popen_kwargs(),  # type: ignore[call-overload]
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited:\n{self.log()}")
            try:
                self.execute("SELECT 1")
                return self
            except Exception:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"postgres not ready after {timeout_s} s:\n{self.log()}")

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of ``database`` (psycopg 3 driver)."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def execute(self, sql: str, database: str = "postgres") -> list[tuple[object, ...]]:
        """Run one statement (autocommit) and return its rows."""
        import psycopg

        conninfo = f"host=127.0.0.1 port={self.port} user={self.user} dbname={database} connect_timeout=5"
        with psycopg.connect(conninfo, autocommit=True) as conn:
            cur = conn.execute(sql)  # type: ignore[arg-type]
            return list(cur.fetchall()) if cur.description else []

    def create_database(self, name: str) -> str:
        """Create an empty database; return its URL."""
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Fast shutdown by process id (SIGINT), then SIGKILL of its process group."""
        proc = self.process
        if proc is not None:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(15)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # backends left behind, if any
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            self.process = None
        shutil.rmtree(self.root, ignore_errors=True)
