"""LLM engines behind one protocol; the backend is chosen by `model.engine`."""

from __future__ import annotations

from pathlib import Path

from tsubasa.config import ModelConfig, WriterConfig
from tsubasa.llm.base import (
    AdapterNotLoadedError,
    ChatMessage,
    Engine,
    EngineCapabilityError,
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
    "EngineCapabilityError",
    "Generation",
    "Messages",
    "SamplingParams",
    "TopDScores",
    "load_engine",
    "msgs",
    "writer_model",
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
    elif cfg.engine == "llamacpp":
        from tsubasa.llm.llamacpp import LlamaCppEngine

        engine = LlamaCppEngine(cfg)
    elif cfg.engine == "openai":
        from tsubasa.llm.openai import OpenAIEngine

        engine = OpenAIEngine(cfg)
    else:
        from tsubasa.llm.hf import HFEngine

        engine = HFEngine(cfg)
    if shared:
        _SHARED[key] = engine
    return engine


def has_gguf(name: str) -> bool:
    """Whether the llama.cpp engine can run model `name` (without provisioning anything)."""
    from tsubasa.llm.models import QWEN15, SMOLLM2

    path = Path(name).expanduser()
    return name in (QWEN15, SMOLLM2) or (path.suffix == ".gguf" and path.is_file())


def writer_model(model: ModelConfig, writer: WriterConfig) -> ModelConfig:
    """The memory writer's ModelConfig: `model` with the writer's overrides (see WriterConfig.engine
    for `auto`). Equal configs share one engine through `load_engine`."""
    engine = writer.engine
    name = writer.name or model.name
    if engine == "auto":
        engine = "llamacpp" if model.engine == "hf" and model.device != "cuda" and has_gguf(name) else model.engine
    update = {k: v for k, v in writer.model_dump(exclude={"engine"}).items() if v is not None}
    return ModelConfig.model_validate({**model.model_dump(), **update, "engine": engine, "name": name})
