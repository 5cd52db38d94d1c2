"""The raw turn log: append-only, idempotent by event id, vectors filled on demand.

A mixin of MilvusStore. The ingest path appends turns without embedding them (unless
`memory.embed_turns_on_ingest`): the memory path never reads raw-turn vectors, only the rag-turns
baseline and turn search do, and they fill a user's missing vectors in batches first
(`embed_missing_turns`). Where the vectors live depends on the collection's layout
(`milvus.TurnLayout`): in `turn_vectors` beside the log (`split`, new stores with BM25), or in the
turn row itself with an `embedded` flag (`flagged`) or always (`inline`, stores made before either).
Reads that decide what to store (ids already stored) are Strong; searches pass `stale_ok`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import numpy as np

from tsubasa.memory.milvus import EMBEDDED, TURN_VECTORS, TURNS, MilvusCollections, scope_filter
from tsubasa.memory.rows import TURN_FIELDS, turn_from_row, turn_order, turn_row
from tsubasa.schema import Turn

EmbedFn = Callable[[list[str]], np.ndarray]
"""Texts -> unit vectors (`Embedder.embed`)."""
EMBED_BATCH = 256
"""Turns embedded per call when filling missing turn vectors."""


class TurnLog(MilvusCollections):
    """Raw turns on Milvus, in any of the three layouts."""

    def existing_turn_ids(self, turns: Sequence[Turn]) -> set[str]:
        if not turns:
            return set()
        return {r["id"] for r in self._get(TURNS, [t.pk for t in turns], ["id"])}

    def upsert_turns(self, turns: Sequence[Turn], vectors: np.ndarray | None = None,
                     embed: EmbedFn | None = None) -> int:
        """Store the turns not stored before (idempotent by event id: the first write of an id
        stays) and return how many. Vectors: `vectors` (one per turn), else `embed` applied to the
        new turns only, else none (needs `turn_flags`; filled later by `embed_missing_turns`)."""
        if not turns:
            return 0
        seen = self.existing_turn_ids(turns)
        fresh = []
        for i, t in enumerate(turns):
            if t.pk not in seen:
                seen.add(t.pk)
                fresh.append(i)
        if not fresh:
            return 0
        new = [turns[i] for i in fresh]
        if vectors is not None:
            vecs: np.ndarray | None = np.asarray(vectors)[fresh]
        elif embed is not None:
            vecs = embed([t.rendered() for t in new])
        elif self.turn_flags:
            vecs = None
        else:
            raise ValueError(f"{self.names[TURNS]} was made before turns could be stored unembedded: embed them")
        if self.turn_layout == "split":
            # the log first: a crash before the vectors leaves turns that turn search embeds on demand
            self.client.upsert(self.names[TURNS], [turn_row(t) for t in new])
            if vecs is not None:
                self._upsert_vectors(new, vecs)
        else:
            self.client.upsert(self.names[TURNS], [self._inline_row(t, None if vecs is None else vecs[j])
                                                   for j, t in enumerate(new)])
        return len(new)

    def _upsert_vectors(self, turns: Sequence[Turn], vectors: np.ndarray) -> None:
        self.client.upsert(self.names[TURN_VECTORS], [
            {"id": t.pk, "tenant_id": t.tenant_id, "user_id": t.user_id,
             "vec": np.asarray(v, dtype=np.float32).tolist()} for t, v in zip(turns, vectors, strict=True)])

    def _inline_row(self, t: Turn, vector: np.ndarray | None) -> dict[str, Any]:
        """A turn row of the `flagged` or `inline` layout, which carries the vector."""
        row = turn_row(t)
        row["vec"] = np.asarray(vector if vector is not None else self._placeholder, dtype=np.float32).tolist()
        if self.turn_layout == "flagged":
            row[EMBEDDED] = vector is not None
        return row

    @cached_property
    def _placeholder(self) -> np.ndarray:
        """Where a `flagged` turn is not embedded yet: a unit vector (cosine of a zero vector is
        undefined); dense turn searches filter these rows out by the `embedded` flag."""
        v = np.zeros(self.dim, dtype=np.float32)
        v[0] = 1.0
        return v

    def _unembedded(self, tenant_id: str, user_id: str) -> list[Turn]:
        flt = scope_filter(tenant_id, user_id)
        if self.turn_layout == "flagged":
            rows = self._query_all(TURNS, f"{flt} and {EMBEDDED} == false", TURN_FIELDS)
        else:  # split: the log's ids without a vector, then those rows by key
            have = {r["id"] for r in self._query_all(TURN_VECTORS, flt, ["id"])}
            missing = [r["id"] for r in self._query_all(TURNS, flt, ["id"]) if r["id"] not in have]
            rows = [r for i in range(0, len(missing), EMBED_BATCH)
                    for r in self._get(TURNS, missing[i:i + EMBED_BATCH], TURN_FIELDS)]
        return sorted(map(turn_from_row, rows), key=turn_order)

    def embed_missing_turns(self, tenant_id: str, user_id: str, embed: EmbedFn) -> int:
        """Embed the user's turns stored without a vector, in batches; return how many."""
        if not self.turn_flags:
            return 0
        turns = self._unembedded(tenant_id, user_id)
        for i in range(0, len(turns), EMBED_BATCH):
            batch = turns[i:i + EMBED_BATCH]
            vecs = embed([t.rendered() for t in batch])
            if self.turn_layout == "split":
                self._upsert_vectors(batch, vecs)
            else:
                self.client.upsert(self.names[TURNS],
                                   [self._inline_row(t, v) for t, v in zip(batch, vecs, strict=True)])
        return len(turns)

    def session_turns(self, tenant_id: str, user_id: str, session_id: str) -> list[Turn]:
        rows = self._query_all(TURNS, scope_filter(tenant_id, user_id, session_id=session_id), TURN_FIELDS)
        return sorted(map(turn_from_row, rows), key=turn_order)

    def list_turns(self, tenant_id: str, user_id: str) -> list[Turn]:
        rows = self._query_all(TURNS, scope_filter(tenant_id, user_id), TURN_FIELDS)
        return sorted(map(turn_from_row, rows), key=turn_order)

    def search_turns(self, tenant_id: str, user_id: str, vector: np.ndarray, k: int,
                     text: str | None = None, stale_ok: bool = False) -> list[tuple[Turn, float]]:
        """Top-k embedded turns of one user (call `embed_missing_turns` first); with `text`, hybrid
        (dense + BM25, which needs no turn vector) where the collection has BM25."""
        flt = scope_filter(tenant_id, user_id)
        level = self._level(stale_ok)
        if self.turn_layout == "split":
            hits = self._fused_search(TURN_VECTORS, TURNS, vector, text, flt, k, TURN_FIELDS, level)
        else:
            dense_flt = f"{flt} and {EMBEDDED} == true" if self.turn_layout == "flagged" else flt
            hits = self._search(TURNS, vector, flt, k, TURN_FIELDS, text, level, dense_flt)
        return [(turn_from_row(h), h["_score"]) for h in hits]
