"""Assemble the writing/reading components from Settings (lazily: the LLM loads on first use)."""

from __future__ import annotations

from functools import cached_property

from tsubasa.config import Settings
from tsubasa.embed import Embedder, load_embedder
from tsubasa.llm import Engine, load_engine
from tsubasa.llm.models import load_tokenizer
from tsubasa.memory.retrieve import Retriever
from tsubasa.memory.store import MilvusStore
from tsubasa.memory.writer import MemoryWriter


class MemorySystem:
    """Store + embedder + engine + writer + retriever for one process."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self._engine = engine

    @cached_property
    def store(self) -> MilvusStore:
        return MilvusStore(self.settings.milvus, uri=self.settings.milvus_uri)

    @cached_property
    def embedder(self) -> Embedder:
        return load_embedder(self.settings.embedder)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = load_engine(self.settings.model)
        return self._engine

    @cached_property
    def writer(self) -> MemoryWriter:
        return MemoryWriter(self.store, self.embedder, self.engine, self.settings.memory)

    @cached_property
    def count_tokens(self):
        if self._engine is not None:
            return self._engine.count_tokens
        tok = load_tokenizer(self.settings.model.name, self.settings.model.cache_dir)
        return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])

    @cached_property
    def retriever(self) -> Retriever:
        return Retriever(self.store, self.embedder, self.count_tokens)
