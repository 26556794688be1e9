"""Start and stop a real ``tritonserver`` (from the ``nvidia-pytriton`` wheel) on this host.

The wheel ships NVIDIA's ``tritonserver`` binary, the Python backend and one
``triton_python_backend_stub`` build per Python version. Three things make it run
from a virtual environment, and :class:`TritonNode` does them itself:

1. a private backend directory holds the Python backend's library and the stub built
   for the running interpreter's version (the wheel's own backend folder has no stub);
2. the interpreter's ``LIBDIR`` comes first on ``LD_LIBRARY_PATH``, so the stub links
   the libpython that matches the venv's standard library;
3. ``PYTHONPATH`` names the venv's site-packages and this project, so model code
   imports torch, transformers and ``llava_node``.

Command line (serves until Ctrl-C)::

    python -m llava_node.launcher --checkpoint var/checkpoints/tiny-llava --http-port 8000
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "DEFAULT_MODEL_REPOSITORY",
    "DEFAULT_TINY_CHECKPOINT",
    "PROJECT_ROOT",
    "NodeStartError",
    "TritonNode",
    "TritonNodeConfig",
    "ephemeral_port_range",
    "free_port",
    "free_port_block",
    "resolve_checkpoint",
    "stop_all",
    "tritonserver_paths",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_REPOSITORY = PROJECT_ROOT / "model_repository"
LOG_TAIL_CHARS = 6000


class NodeStartError(RuntimeError):
    """The server exited or did not become ready in time; the message ends with its log."""


@dataclass(frozen=True)
class TritonPaths:
    """Where the parts of the pytriton-shipped Triton server live on this host."""

    binary: Path
    python_backend_dir: Path
    stub: Path
    lib_dirs: tuple[Path, ...]


def tritonserver_paths(python_version: str | None = None) -> TritonPaths:
    """Locate ``tritonserver``, the Python backend and the stub for ``python_version``.

    ``python_version`` defaults to the running interpreter's ``"MAJOR.MINOR"``.
    """
    import importlib.util

    # Locate the package without importing it: its __init__ pulls in client libraries
    # (gevent, ...) that a node does not need.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise NodeStartError("the nvidia-pytriton package (which ships tritonserver) is not installed")
    root = Path(next(iter(spec.submodule_search_locations))).resolve() / "tritonserver"
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise NodeStartError(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return TritonPaths(
        binary=root / "bin" / "tritonserver",
        python_backend_dir=root / "backends" / "python",
        stub=stub,
        lib_dirs=tuple(p for p in (libs,) if p.is_dir()),
    )


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux's default when
    it cannot be read)."""
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


# Listening ports are taken below the ephemeral range. A port inside it can be handed to an
# outgoing connection at any moment, and a readiness poll of a port inside it that nobody
# listens on yet can connect to itself (TCP simultaneous open: source port == destination
# port); the poll then reads its own request back as the answer and holds the port, so the
# server that was about to listen there cannot bind. CI lost a run to exactly that
# ("BadStatusLine: GET /v2/health/ready HTTP/1.1" from 80 tests' node fixtures).
_LOWEST_PORT = 10000


def _listen_ranges() -> list[range]:
    low, high = ephemeral_port_range()
    ranges = [range(_LOWEST_PORT, max(_LOWEST_PORT, low)), range(max(high + 1, _LOWEST_PORT), 65536)]
    return [r for r in ranges if len(r)]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now, outside the ephemeral range."""
    ranges = _listen_ranges()
    rng = random.Random()
    for _ in range(1000):
        r = rng.choices(ranges, weights=[len(r) for r in ranges])[0]
        port = rng.choice(r)
        if _port_free(host, port):
            return port
    raise RuntimeError(f"no free port on {host} outside the ephemeral range")


def free_port_block(host: str, start: int, size: int = 3, avoid: set[int] | None = None) -> int:
    """The first port >= ``start`` such that ``size`` consecutive ports are free and outside
    the ephemeral range (a node's HTTP, gRPC and metrics ports, Triton's convention that
    control planes rely on); past the end it wraps to the lowest port :func:`free_port` uses."""
    avoid = avoid or set()
    low, high = ephemeral_port_range()
    port, wrapped = max(start, 1024), False
    while True:
        if port + size > 65536:
            if wrapped:
                raise RuntimeError("no free port block found")
            port, wrapped = _LOWEST_PORT, True
        block = range(port, port + size)
        if block[-1] >= low and block[0] <= high:  # overlaps the ephemeral range
            port = high + 1
            continue
        if not avoid.intersection(block) and all(_port_free(host, p) for p in block):
            return port
        port += size


def _port_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``port`` now. Probed with ``SO_REUSEADDR``, as
    tritonserver's HTTP, gRPC and metrics servers bind: connections of a server stopped a
    moment ago (TIME_WAIT) do not keep it from the port, so a restarted stack gets the
    same ports again; a port something listens on is still taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def stop_all(nodes: Sequence[TritonNode]) -> None:
    """Stop nodes in parallel (each waits for its server to exit, then kills what is left)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, len(nodes))) as pool:
        list(pool.map(lambda n: n.stop(), nodes))


def _python_env_paths(extra: str = "") -> list[str]:
    # This project, then an explicit PYTHONPATH (it may pin packages, e.g. numpy<2),
    # then the running interpreter's site-packages (the stub does not read .pth files).
    paths = [str(PROJECT_ROOT)]
    for p in [*extra.split(os.pathsep), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]:
        if p and p not in paths:
            paths.append(p)
    return paths


@dataclass
class TritonNodeConfig:
    """How to start one Triton node. Ports of 0 are replaced by free ports."""

    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    checkpoint: Path | None = None
    host: str = "127.0.0.1"
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    model_control: str = "none"  # "none" loads everything; "explicit" leaves it to the caller
    load_models: Sequence[str] = ()
    work_dir: Path | None = None
    # where the server's log goes (kept after stop; None: the work directory, which a
    # temporary one takes with it at stop)
    log_dir: Path | None = None
    log_verbose: int = 0
    startup_timeout_s: float = 180.0
    env: Mapping[str, str] = field(default_factory=dict)
    extra_args: Sequence[str] = ()


class TritonNode:
    """One ``tritonserver`` process: start, wait until ready, stop.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. The server runs
    in its own process group, and :meth:`stop` ends that group by its id, so the
    Python-backend stub processes go with it.
    """

    def __init__(self, config: TritonNodeConfig) -> None:
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.work_dir: Path = Path()
        self.log_path: Path = Path()
        self.http_port = config.http_port
        self.grpc_port = config.grpc_port
        self.metrics_port = config.metrics_port

    # -- addresses ---------------------------------------------------------------
    @property
    def http_url(self) -> str:
        """Base URL of the node's HTTP/REST endpoint."""
        return f"http://{self.config.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the node's gRPC endpoint, as tritonclient expects it."""
        return f"{self.config.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """URL of the node's Prometheus metrics."""
        return f"http://{self.config.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int:
        """Process id of the running server."""
        if self.process is None:
            raise RuntimeError("node not started")
        return self.process.pid

    # -- lifecycle -----------------------------------------------------------------
    def command(self) -> list[str]:
        """The ``tritonserver`` command line this node runs."""
        paths = tritonserver_paths()
        cfg = self.config
        cmd = [
            str(paths.binary),
            f"--model-repository={cfg.model_repository}",
            f"--backend-directory={self.work_dir / 'backends'}",
            f"--http-address={cfg.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={cfg.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={cfg.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            f"--model-control-mode={cfg.model_control}",
            "--strict-readiness=true",
            "--exit-on-error=false",
            f"--log-verbose={cfg.log_verbose}",
            "--backend-config=python,shm-default-byte-size=4194304",
            "--backend-config=python,shm-growth-byte-size=4194304",
        ]
        cmd += [f"--load-model={m}" for m in cfg.load_models]
        cmd += list(cfg.extra_args)
        return cmd

    def environment(self) -> dict[str, str]:
        """Environment for the server: library path, Python path, checkpoint."""
        paths = tritonserver_paths()
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        ld = [libdir, *(str(p) for p in paths.lib_dirs)]
        if env.get("LD_LIBRARY_PATH"):
            ld.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in ld if p)
        env["PYTHONPATH"] = os.pathsep.join(_python_env_paths(env.get("PYTHONPATH", "")))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        if self.config.checkpoint is not None:
            env["LLAVA_CHECKPOINT"] = str(Path(self.config.checkpoint).resolve())
        env.update(self.config.env)
        return env

    def _prepare_backend_dir(self) -> None:
        paths = tritonserver_paths()
        backend = self.work_dir / "backends" / "python"
        backend.mkdir(parents=True, exist_ok=True)
        for src in paths.python_backend_dir.iterdir():
            if src.is_file():
                _link(src, backend / src.name)
        _link(paths.stub, backend / "triton_python_backend_stub")

    def start(self, wait: bool = True) -> TritonNode:
        """Start the server; with ``wait``, return once it is ready or raise."""
        if self.process is not None:
            raise RuntimeError("node already started")
        cfg = self.config
        if self.work_dir == Path():
            if cfg.work_dir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="triton-node-")
                self.work_dir = Path(self._tmp.name)
            else:
                self.work_dir = Path(cfg.work_dir)
                self.work_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_backend_dir()
        self.http_port = self.http_port or free_port(cfg.host)
        self.grpc_port = self.grpc_port or free_port(cfg.host)
        self.metrics_port = self.metrics_port or free_port(cfg.host)
        log_dir = Path(cfg.log_dir) if cfg.log_dir is not None else self.work_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"tritonserver-{self.http_port}.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(),
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        if wait:
            try:
                self.wait_ready(cfg.startup_timeout_s)
            except BaseException:
                self.stop()
                raise
        return self

    def is_running(self) -> bool:
        """Whether the server process is alive."""
        return self.process is not None and self.process.poll() is None

    def is_ready(self, timeout_s: float = 2.0) -> bool:
        """Whether ``/v2/health/ready`` answers 200."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=timeout_s) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the server is ready; raise :class:`NodeStartError` with its log."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.is_running():
                code = self.process.returncode if self.process else None
                raise NodeStartError(
                    f"tritonserver exited with code {code} before it was ready\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            failed = self.failed_models()
            if failed:
                reasons = "; ".join(f"{name}: {why}" for name, why in failed.items())
                raise NodeStartError(f"models failed to load: {reasons}\n{self.log_tail()}")
            time.sleep(0.2)
        raise NodeStartError(f"tritonserver was not ready after {timeout_s:.0f} s\n{self.log_tail()}")

    def repository_index(self, timeout_s: float = 2.0) -> list[dict[str, Any]]:
        """The server's model repository index (name, version, state, reason)."""
        req = urllib.request.Request(f"{self.http_url}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return list(json.loads(r.read()))

    def failed_models(self) -> dict[str, str]:
        """Models that the server tried and failed to load, with the reason given.

        Called once the HTTP endpoint answers. In ``none`` mode every model is loaded
        before that endpoint opens, and in
        ``explicit`` mode the ``--load-model`` ones are: a failure shows at once, so
        start-up need not wait out its timeout.
        """
        try:
            index = self.repository_index()
        except (urllib.error.URLError, OSError, ValueError):
            return {}
        wanted = set(self.config.load_models)
        if self.config.model_control == "none" and not self.is_ready():
            # Endpoints open only after the start-up loads: live but not ready is final.
            reasons = {m["name"]: m.get("reason", "") for m in index if m.get("state") != "READY"}
            return reasons or {"(repository)": "a model failed to load; see the log below"}
        return {
            m["name"]: m.get("reason", "")
            for m in index
            if m.get("state") == "UNAVAILABLE"
            and m.get("reason")
            and (self.config.model_control == "none" or m["name"] in wanted)
        }

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The server's error lines, then the last ``chars`` characters of its log."""
        try:
            text = self.log_path.read_bytes().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        # glog format: error lines start with "E" and a date; they explain failures
        # better than the tail, which is often the server's option table.
        errors = [line for line in text.splitlines() if line[:1] == "E" and line[1:5].isdigit()]
        head = "errors in the log:\n" + "\n".join(errors[-20:]) + "\n" if errors else ""
        return f"{head}log tail ({self.log_path}):\n{text[-chars:]}"

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the server process alone (not its stubs)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, sig)

    def _terminate(self, timeout_s: float) -> None:
        proc = self.process
        if proc is None:
            return
        pgid = proc.pid  # start_new_session=True made the server its group's leader
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGCONT)  # a stopped server cannot act on SIGTERM
                os.killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)  # whatever is left of the group: stubs too
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        self.process = None

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the server and its stub processes (SIGTERM, then SIGKILL), by process group."""
        self._terminate(timeout_s)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self.work_dir = Path()

    def kill(self) -> None:
        """SIGKILL the server alone, as a crash would; its stubs notice and exit."""
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)

    def restart(self, wait: bool = True) -> TritonNode:
        """Start again on the same ports and work directory (stopping it first if running)."""
        self._terminate(20.0)
        return self.start(wait=wait)

    def __enter__(self) -> TritonNode:
        return self.start() if self.process is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def describe(self) -> dict[str, object]:
        """Addresses and process id, for printing."""
        return {
            "http": self.http_url,
            "grpc": self.grpc_url,
            "metrics": self.metrics_url,
            "pid": self.process.pid if self.process else None,
            "log": str(self.log_path),
        }


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the process that started us dies,
    so a crashed or killed launcher leaves no server behind (Linux only)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        if dst.resolve() == src.resolve():
            return
        dst.unlink()
    dst.symlink_to(src)


@contextlib.contextmanager
def running_nodes(configs: Sequence[TritonNodeConfig]) -> Iterator[list[TritonNode]]:
    """Start several nodes (in parallel), yield them, stop them all on exit."""
    nodes = [TritonNode(c) for c in configs]
    try:
        for n in nodes:
            n.start(wait=False)
        for n in nodes:
            n.wait_ready(n.config.startup_timeout_s)
        yield nodes
    finally:
        for n in nodes:
            n.stop()


DEFAULT_TINY_CHECKPOINT = PROJECT_ROOT / "var" / "checkpoints" / "tiny-llava"


def resolve_checkpoint(checkpoint: Path | None) -> Path:
    """The checkpoint to serve: the one given, else ``$LLAVA_CHECKPOINT``, else the
    tiny random-weight checkpoint (built on first use), saying so."""
    if checkpoint is None and os.environ.get("LLAVA_CHECKPOINT"):
        checkpoint = Path(os.environ["LLAVA_CHECKPOINT"])
    if checkpoint is not None:
        return checkpoint.resolve()
    from llava_node.tiny_checkpoint import build_tiny_checkpoint, is_checkpoint

    if not is_checkpoint(DEFAULT_TINY_CHECKPOINT):
        build_tiny_checkpoint(DEFAULT_TINY_CHECKPOINT)
    print(
        f"No checkpoint configured (--checkpoint or LLAVA_CHECKPOINT): serving the tiny "
        f"random-weight test checkpoint at {DEFAULT_TINY_CHECKPOINT}; its output is noise.",
        flush=True,
    )
    return DEFAULT_TINY_CHECKPOINT


def main(argv: list[str] | None = None) -> int:
    """Command line: start one node and serve until Ctrl-C."""
    parser = argparse.ArgumentParser(description="Run one Triton node serving model_repository/.")
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_MODEL_REPOSITORY)
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="llava-hf checkpoint directory (sets LLAVA_CHECKPOINT)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--model-control", choices=["none", "explicit"], default="none")
    parser.add_argument("--load-model", action="append", default=[])
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    args.checkpoint = resolve_checkpoint(args.checkpoint)
    cfg = TritonNodeConfig(
        model_repository=args.model_repository.resolve(),
        checkpoint=args.checkpoint,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        model_control=args.model_control,
        load_models=args.load_model,
        work_dir=args.work_dir,
        startup_timeout_s=args.startup_timeout,
    )
    node = TritonNode(cfg)
    t0 = time.monotonic()
    try:
        node.start()
    except NodeStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"ready_after_s": round(time.monotonic() - t0, 1), **node.describe()}))
    print("Triton node ready; press Ctrl-C to stop.", flush=True)
    try:
        while node.is_running():
            time.sleep(0.5)
        print(f"tritonserver exited:\n{node.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        node.stop()


if __name__ == "__main__":
    sys.exit(main())
