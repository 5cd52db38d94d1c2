"""Running the Serve app on one machine: a `milvus-lite server` (Serve replicas are separate
processes and a Milvus Lite file admits one), a local Ray, Serve's HTTP proxy on loopback.
Used by `tsubasa serve`, `tsubasa demo`, the e2e tests and the serving benchmark."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tsubasa.config import Settings

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when the process that started it dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `finally` blocks stop what this process started."""
    def _raise(*_: object) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, _raise)


class MilvusLiteServer:
    """`milvus-lite server --data-dir DIR` on a loopback port; stop() ends the process it started."""

    def __init__(self, data_dir: str | Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> MilvusLiteServer:
        exe = shutil.which("milvus-lite") or str(Path(sys.executable).with_name("milvus-lite"))
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir.parent / f"milvus-lite-{self.port}.log"
        self.proc = subprocess.Popen(
            [exe, "server", "--data-dir", str(self.data_dir), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True,  # noqa: SIM115
            preexec_fn=_die_with_parent)
        try:
            _wait_port(self.port, timeout_s, self.proc)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> MilvusLiteServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def shared_milvus(settings: Settings) -> Iterator[Settings]:
    """Settings whose Milvus several processes can use: a Lite file gets a `milvus-lite server`
    over the same data directory for as long as the block runs; a URL is used as is."""
    uri = settings.milvus_uri
    if "://" in uri:
        yield settings
        return
    with MilvusLiteServer(uri) as server:
        yield settings.model_copy(update={"milvus": settings.milvus.model_copy(update={"uri": server.uri})})


def local_ray_env() -> None:
    """Env every local Ray worker inherits (set before `ray.init`)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 token auth: off for loopback-only runs
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


_RAY_START_ATTEMPTS = 4
_RAY_RETRY_PAUSE_S = 20.0


def start_ray(settings: Settings) -> bool:
    """Start (or join) Ray; False when this process was already connected (then leave it running)."""
    import ray

    local_ray_env()
    if ray.is_initialized():
        return False
    sc = settings.serve
    if sc.ray_address:
        ray.init(address=sc.ray_address, log_to_driver=False)
        return True
    want = sc.llm_num_cpus * sc.llm_replicas + 0.25 * sc.gateway_replicas + 1
    kw = dict(num_cpus=sc.ray_num_cpus or max(os.cpu_count() or 1, int(want + 0.999)), include_dashboard=False,
              log_to_driver=False, configure_logging=True, logging_level=logging.WARNING)
    for attempt in range(1, _RAY_START_ATTEMPTS + 1):
        try:
            ray.init(**kw)
            break
        except Exception as exc:
            # Ray gives its raylet a fixed 30 s to register with the GCS. Right after another cluster's
            # shutdown on a 2-core machine the raylet has twice failed to come up (once for a minute:
            # both tries of a single retry failed, a run three minutes later passed): pause, try again.
            if "timed out during startup" not in str(exc) or attempt == _RAY_START_ATTEMPTS:
                raise
            log.warning("Ray's node did not start (%s); try %d of %d in %.0f s", exc, attempt + 1,
                        _RAY_START_ATTEMPTS, _RAY_RETRY_PAUSE_S)
            ray.shutdown()
            time.sleep(_RAY_RETRY_PAUSE_S)
    return True


def run_app(settings: Settings, name: str = "tsubasa", timeout_s: float = 600.0) -> str:
    """Deploy the app on the running Ray and wait until it is healthy; returns its base URL."""
    from ray import serve

    from services.serve.app import build_app

    sc = settings.serve
    serve.start(http_options={"host": sc.host, "port": sc.port, "request_timeout_s": sc.request_timeout_s * 2},
                logging_config={"log_level": "WARNING", "enable_access_log": False})
    serve.run(build_app(settings), name=name, route_prefix="/", blocking=False)
    base = f"http://{sc.host}:{sc.port}"
    wait_healthy(base, timeout_s)
    return base


def wait_healthy(base_url: str, timeout_s: float = 600.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base_url}/healthz", timeout=5)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{base_url}/healthz not ready after {timeout_s:.0f} s ({last})")


def shutdown(stop_ray: bool = True) -> None:
    """Stop Serve (and Ray, unless someone else started it in this process)."""
    import ray
    from ray import serve

    with contextlib.suppress(Exception):
        serve.shutdown()
    if stop_ray:
        with contextlib.suppress(Exception):
            ray.shutdown()
