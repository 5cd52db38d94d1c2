"""Shared fixtures: real Milvus Lite in a temp dir, the real embedder, real tiny-qwen3."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Tests use tiny-qwen3 and the SmolLM2 GGUF; the 1.1 GB default model must never be fetched by a test.
os.environ.setdefault("TSUBASA_NO_MODEL_DOWNLOAD", "1")
sys.path.insert(0, str(Path(__file__).parent / "support"))  # `from scripted import ScriptedEngine`

LOCOMO = Path(os.environ.get("TSUBASA_LOCOMO", Path(__file__).resolve().parents[1] / "../shared/data/locomo10.json"))
from testenv import MODEL_CACHE  # noqa: E402


@pytest.fixture(scope="session")
def locomo_path() -> Path:
    if not LOCOMO.is_file():
        pytest.skip(f"LoCoMo data not found at {LOCOMO} (set TSUBASA_LOCOMO); CC BY-NC 4.0, not shipped")
    return LOCOMO


@pytest.fixture(scope="session")
def embedder():
    from tsubasa.embed import load_embedder

    return load_embedder()


@pytest.fixture(scope="session")
def tiny_cfg():
    from tsubasa.config import ModelConfig

    return ModelConfig(name="tiny-qwen3", cache_dir=MODEL_CACHE, max_new_tokens=16, batch_size=4)


@pytest.fixture(scope="session")
def _shared_tiny_engine(tiny_cfg):
    from tsubasa.llm import load_engine

    return load_engine(tiny_cfg)


@pytest.fixture()
def tiny_engine(_shared_tiny_engine):
    """The session's tiny-qwen3 engine, with no adapter left loaded by an earlier test."""
    yield _shared_tiny_engine
    for name in _shared_tiny_engine.loaded_adapters():
        _shared_tiny_engine.unload_adapter(name)


@pytest.fixture()
def settings(tmp_path):
    from tsubasa.config import load_settings

    return load_settings(data_dir=tmp_path / "data", model={"name": "tiny-qwen3", "cache_dir": MODEL_CACHE},
                         milvus={"uri": str(tmp_path / "milvus.db")})


@pytest.fixture()
def store(settings):
    from tsubasa.memory.store import MilvusStore

    s = MilvusStore(settings.milvus, uri=settings.milvus_uri)
    yield s
    s.close()
