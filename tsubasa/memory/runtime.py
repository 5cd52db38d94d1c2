"""Assemble the writing/reading components from Settings (lazily: the LLM loads on first use)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

from tsubasa.config import Settings
from tsubasa.embed import Embedder, load_embedder
from tsubasa.llm import Engine, load_engine, writer_model
from tsubasa.llm.models import load_tokenizer
from tsubasa.memory.retrieve import Retriever
from tsubasa.memory.store import MilvusStore
from tsubasa.memory.writer import MemoryWriter


class MemorySystem:
    """Store + embedder + writer engine + writer + retriever for one process.

    `engine`, when given, is the writer's LLM (the gateway passes the Serve LLM deployment, the
    evaluation its answering engine); otherwise the `writer` settings choose it (llama.cpp on a laptop).
    `count_tokens` counts under the answering model's tokenizer (default: the given engine's)."""

    def __init__(self, settings: Settings, engine: Engine | None = None,
                 count_tokens: Callable[[str], int] | None = None) -> None:
        self.settings = settings
        self._engine = engine
        self._count = count_tokens or (engine.count_tokens if engine is not None else None)

    @cached_property
    def store(self) -> MilvusStore:
        return MilvusStore(self.settings.milvus, uri=self.settings.milvus_uri)

    @cached_property
    def embedder(self) -> Embedder:
        return load_embedder(self.settings.embedder)

    @property
    def writer_engine(self) -> Engine:
        if self._engine is None:
            self._engine = load_engine(writer_model(self.settings.model, self.settings.writer))
        return self._engine

    @cached_property
    def writer(self) -> MemoryWriter:
        return MemoryWriter(self.store, self.embedder, self.writer_engine, self.settings.memory)

    @cached_property
    def count_tokens(self):
        """Tokens under the answering model's tokenizer (what grounding costs the model that reads it)."""
        if self._count is not None:
            return self._count
        tok = load_tokenizer(self.settings.model.name, self.settings.model.cache_dir)
        return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])

    @cached_property
    def retriever(self) -> Retriever:
        return Retriever(self.store, self.embedder, self.count_tokens, self.settings.memory.retrieval)
