"""Writer actors: the raw-log appends and the session processing of the users routed to them.

Users are sharded over writers by a stable hash of `tenant:user`. Each writer holds the embedder,
the store and the LLM (the consumers hold none of them, so they restart in a second) and has two
lanes: `append` (its own thread, so raw-log writes never wait behind a slow LLM call) and
`process` (one session at a time). A consumer submits a user's session only after the append of
its turns returned and keeps at most one session per user in flight, so a user's sessions apply
in order. Both are idempotent (event-id keys; `done` / `extracted` markers), so a retry after any
crash is safe.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Callable
from typing import Any

import ray

from tsubasa.config import Settings
from tsubasa.llm.base import Engine
from tsubasa.schema import Event

log = logging.getLogger(__name__)

EngineFactory = Callable[[], Engine]


def shard_of(tenant_id: str, user_id: str, n_writers: int) -> int:
    """The writer that owns a user (stable across processes and restarts)."""
    return zlib.crc32(f"{tenant_id}:{user_id}".encode()) % n_writers


def set_torch_threads(n: int) -> None:
    """Several ingest actors share the cores: one intra-op thread each is fastest on small machines."""
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:  # pragma: no cover
        pass


class SessionWriter:
    """Appends turns and processes closed sessions of the users routed to it."""

    def __init__(self, settings: Settings, engine_factory: EngineFactory | None = None, shard: int = 0) -> None:
        from tsubasa.memory.runtime import MemorySystem

        set_torch_threads(settings.kafka.actor_torch_threads)
        self.shard = shard
        self.system = MemorySystem(settings, engine=engine_factory() if engine_factory else None)
        self.system.writer  # load store, embedder and engine now, not on the first session  # noqa: B018
        self.processed = 0
        self.skipped = 0
        self.failed = 0
        self.appended = 0

    @ray.method(concurrency_group="append")
    def append(self, events: list[Event]) -> dict[str, int]:
        """Store turn events in the raw log; ids already stored are skipped (never rewritten)."""
        new = self.system.writer.append(events).new_turns if events else 0
        self.appended += new
        return {"appended": new, "duplicates": len(events) - new}

    def process(self, tenant_id: str, user_id: str, session_id: str) -> dict[str, Any]:
        """Extract and evolve one closed session; a no-op if it was already processed."""
        try:
            res = self.system.writer.process_session(tenant_id, user_id, session_id)
        except Exception:
            self.failed += 1
            log.exception("session %s:%s:%s failed", tenant_id, user_id, session_id)
            raise
        self.skipped += int(res.skipped)
        self.processed += int(not res.skipped)
        return {"skipped": res.skipped, "observations": res.observations, "ops": res.ops,
                "fallbacks": res.fallbacks, "pid": os.getpid()}

    @ray.method(concurrency_group="control")
    def stats(self) -> dict[str, int]:
        return {"shard": self.shard, "pid": os.getpid(), "processed": self.processed, "skipped": self.skipped,
                "failed": self.failed, "appended": self.appended}
