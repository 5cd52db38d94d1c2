"""Fixtures for tests that need real services: a Kafka-compatible broker (tansu), an S3 server for
the broker's persistent storage, a `milvus-lite server` shared by several processes, and local Ray.

Each service is a child process on a free loopback port (tests/support/local_services.py); the
session-scoped ones are started only when a test asks for them.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

SUPPORT = Path(__file__).resolve().parents[1] / "support"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """One `milvus-lite server` for the session; isolate tests by collection prefix."""
    from local_services import MilvusLiteServer

    server = MilvusLiteServer(tmp_path_factory.mktemp("milvus-server")).start()
    yield server
    server.stop()


@pytest.fixture()
def broker(tmp_path):
    """A fresh in-memory tansu broker for one test."""
    from local_services import TansuBroker

    b = TansuBroker(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture()
def s3_server(tmp_path):
    from local_services import S3Server

    s = S3Server(tmp_path / "s3").start()
    yield s
    s.stop()


@pytest.fixture()
def persistent_broker(tmp_path, s3_server):
    """A tansu broker whose storage (S3) survives `restart()`."""
    from local_services import TansuBroker

    b = TansuBroker(tmp_path / "broker", s3=s3_server).start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def ray_local():
    """Local Ray (auth off, no dashboard); workers can import tests/support."""
    import ingest_workload
    import ray
    import scripted

    # test-support modules travel by value, so workers need not import tests/support
    for module in (ingest_workload, scripted):
        ray.cloudpickle.register_pickle_by_value(module)
    if ray.is_initialized():  # started by another test module: share it
        yield ray
        return
    os.environ["RAY_AUTH_MODE"] = "disabled"
    path = os.pathsep.join([str(SUPPORT), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                                       "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture()
def ingest_settings(tmp_path, broker, milvus_server):
    """Settings for an ingest test: its own topic, group and collections on the shared servers."""
    return make_ingest_settings(tmp_path, broker.bootstrap, milvus_server.url)


def make_ingest_settings(tmp_path: Path, bootstrap: str, milvus_url: str, **kafka):
    from tsubasa.config import load_settings

    tag = uuid.uuid4().hex[:8]
    cfg = {"bootstrap_servers": bootstrap, "topic": f"events-{tag}", "dead_letter_topic": f"events-{tag}.dlq",
           "group_id": f"ingest-{tag}", "partitions": 4, "consumers": 2, "writers": 2, "max_retries": 1,
           "retry_backoff_s": 0.2, "commit_interval_s": 0.5, "session_idle_timeout_s": 2.0, **kafka}
    # These tests count the writer's extraction calls per session (an LLM output is never asked for
    # twice): one call per session, so the session is read whole. Windowed extraction, the default,
    # has its own tests (test_memory_writer.py, the inspector and demo e2e on LoCoMo sessions).
    return load_settings(data_dir=tmp_path / "data", milvus={"uri": milvus_url, "collection_prefix": f"t{tag}"},
                         kafka=cfg, memory={"extract_window_turns": 0})


@pytest.fixture()
def cli_env(tmp_path, monkeypatch, tiny_cfg, locomo_path):
    """Environment for running the `tsubasa` CLI in-process: a fresh data dir, tiny-qwen3, LoCoMo, and
    a wide terminal so rich tables do not wrap. Returns the test's tmp_path."""
    monkeypatch.setenv("TSUBASA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TSUBASA_MODEL__NAME", "tiny-qwen3")
    monkeypatch.setenv("TSUBASA_MODEL__CACHE_DIR", str(tiny_cfg.cache_dir))
    monkeypatch.setenv("TSUBASA_LOCOMO", str(locomo_path))
    monkeypatch.setenv("COLUMNS", "200")
    return tmp_path
