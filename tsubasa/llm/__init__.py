"""LLM engines behind one protocol; the backend is chosen by `model.engine`."""

from __future__ import annotations

from tsubasa.config import ModelConfig
from tsubasa.llm.base import (
    AdapterNotLoadedError,
    ChatMessage,
    Engine,
    Generation,
    Messages,
    SamplingParams,
    TopDScores,
    msgs,
)

__all__ = [
    "AdapterNotLoadedError",
    "ChatMessage",
    "Engine",
    "Generation",
    "Messages",
    "SamplingParams",
    "TopDScores",
    "load_engine",
    "msgs",
]

_SHARED: dict[str, Engine] = {}


def load_engine(cfg: ModelConfig | None = None, shared: bool = True) -> Engine:
    """Build the configured engine (one per process and config when `shared`)."""
    cfg = cfg or ModelConfig()
    key = cfg.model_dump_json()
    if shared and key in _SHARED:
        return _SHARED[key]
    if cfg.engine == "vllm":
        from tsubasa.llm.vllm import VLLMEngine

        engine: Engine = VLLMEngine(cfg)
    else:
        from tsubasa.llm.hf import HFEngine

        engine = HFEngine(cfg)
    if shared:
        _SHARED[key] = engine
    return engine
