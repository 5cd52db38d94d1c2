"""Milvus plumbing under MilvusStore: one shared client per database, the collections' schemas
(with BM25 full-text search on the searchable texts), paged queries and dense or hybrid search.

Hybrid search fuses dense MiniLM cosine with Milvus' BM25 (computed by Milvus from the `text`
field) by reciprocal rank: dense embeddings alone miss names and rare words ("adoption agencies").
Collections created before BM25 existed keep working with dense search only.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from tsubasa.config import MilvusConfig
from tsubasa.schema import validate_identifier

log = logging.getLogger(__name__)

class _LiteNoise(logging.Filter):
    """Milvus Lite lacks AllocTimestamp; query_iterator falls back to a client timestamp and works,
    but the unimplemented call is logged with a traceback on every page. Drop just that."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "Method not implemented" not in msg and "failed to get mvccTs" not in msg


for _name in ("grpc._server", "pymilvus", "pymilvus.client.iterator.query_iterator"):
    logging.getLogger(_name).addFilter(_LiteNoise())

TURNS, OBSERVATIONS, MEMORIES, HISTORY, SESSIONS = "turns", "observations", "memories", "history", "sessions"
SEARCHABLE = (TURNS, OBSERVATIONS, MEMORIES)
"""Collections searched by text (the others are read by key or filter)."""
SPARSE = "sparse"
MARKER_DIM = 2  # Milvus needs a vector field in every collection; session markers carry a dummy one
MAX_TEXT = 16_384
QUERY_PAGE = 1000
QUERY_LIMIT = 16_384  # Milvus caps offset+limit of one query at 16384
STRONG = "Strong"
"""Consistency of every read that must see this deployment's own latest writes (evolution, dedup,
markers). Passed per call, so it holds whatever level a collection was created with."""
EMBEDDED = "embedded"
"""Turn field: whether `vec` holds the turn's embedding (turns are embedded on demand)."""


def scope_filter(tenant_id: str, user_id: str | None = None, **equals: str) -> str:
    """Filter expression for one tenant (and user, and other string fields); identifiers are
    validated first, so nothing a caller passes can change the expression's structure."""
    parts = [f'tenant_id == "{validate_identifier(tenant_id, "tenant_id")}"']
    if user_id is not None:
        parts.append(f'user_id == "{validate_identifier(user_id, "user_id")}"')
    for field, value in equals.items():
        parts.append(f'{field} == "{validate_identifier(value, field)}"')
    return " and ".join(parts)


_CLIENTS: dict[str, Any] = {}
_CLIENTS_LOCK = threading.Lock()


class StoreLockedError(RuntimeError):
    """A Milvus Lite file is held by another process (it admits one process at a time)."""


class MilvusVersionError(RuntimeError):
    """The Milvus server is too old for this store."""


MIN_SERVER_VERSION = (2, 4, 0)
"""Older servers route the upsert of a partition-keyed row to the wrong partition, so filtered
reads miss it (milvus-io/milvus#30607, fixed in 2024-02). Measured here on the `pip install milvus`
server (v2.3.5-lite): 18 turns upserted, `count(*)` 18, a query by tenant returned 2."""


def check_server_version(version: str, uri: str) -> None:
    """Refuse a Milvus server older than MIN_SERVER_VERSION (Milvus Lite reports `milvus_lite-x`)."""
    if version.startswith("milvus_lite"):
        return
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", version)
    if m is None:
        log.warning("Milvus at %s reports version %r; cannot check it is >= %s", uri, version,
                    ".".join(map(str, MIN_SERVER_VERSION)))
        return
    if tuple(int(x) for x in m.groups()) < MIN_SERVER_VERSION:
        raise MilvusVersionError(
            f"Milvus at {uri} is {version}; TSUBASA needs {'.'.join(map(str, MIN_SERVER_VERSION))} or newer "
            "(2.5 for milvus.bm25): older servers upsert partition-keyed rows into the wrong partition and "
            "a user's reads miss them (milvus-io/milvus#30607)")


_OPENED_HERE: set[str] = set()


def _locked(uri: str) -> StoreLockedError:
    return StoreLockedError(
        f"Milvus Lite file {uri} is in use by another process (a Lite file admits one process at a time): "
        f"wait for it or stop it, or run `milvus-lite server` on the file and set milvus.uri to its URL so "
        f"that several processes can share it")


def _lite_file_locked(path: str) -> bool:
    """Whether another process holds Milvus Lite's LOCK file in `path` (probed, then released)."""
    import fcntl

    lock = Path(path).expanduser() / "LOCK"
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def milvus_client(uri: str, token: str | None, db_name: str):
    """One MilvusClient per (uri, db) per process: a Milvus Lite file admits a single process,
    and its client is safe to share between threads."""
    from pymilvus import MilvusClient

    key = f"{uri}|{db_name}"
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            if "://" not in uri:
                Path(uri).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
            kwargs: dict[str, Any] = {"uri": uri}
            if token:
                kwargs["token"] = token
            if db_name:
                kwargs["db_name"] = db_name
            local = "://" not in uri
            # Probe Milvus Lite's lock first (a clear error instead of pymilvus' logged traceback), but
            # only for a file this process never opened: our own lock may outlive close() a while.
            if local and uri not in _OPENED_HERE and _lite_file_locked(uri):
                raise _locked(uri)
            try:
                client = MilvusClient(**kwargs)
            except Exception as exc:
                if local and _lite_file_locked(uri):
                    raise _locked(uri) from exc
                raise
            if not local:
                try:
                    check_server_version(client.get_server_version(), uri)
                except MilvusVersionError:
                    client.close()
                    raise
            _CLIENTS[key] = client
            if local:
                _OPENED_HERE.add(uri)
        return _CLIENTS[key]


class MilvusCollections:
    """The five collections of one TSUBASA deployment in one Milvus database."""

    def __init__(self, cfg: MilvusConfig, uri: str | None = None) -> None:
        self.cfg = cfg
        self.uri = uri or cfg.uri
        if not self.uri:
            raise ValueError("milvus.uri is empty")
        token = cfg.token.get_secret_value() if cfg.token else None
        self.client = milvus_client(self.uri, token, cfg.db_name)
        self.dim = cfg.dim
        self.names = {k: f"{cfg.collection_prefix}_{k}" for k in (TURNS, OBSERVATIONS, MEMORIES, HISTORY, SESSIONS)}
        self.bm25: dict[str, bool] = {}
        self.turn_flags = False
        """Whether the turn collection has the `embedded` flag (collections made before it have
        every turn embedded on arrival, and keep it so)."""
        self._ensure_collections()

    # ---- schema -------------------------------------------------------------------------------
    def _ensure_collections(self) -> None:
        from pymilvus import DataType, Function, FunctionType, MilvusClient

        def base(schema, pk_len: int = 64) -> None:
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=pk_len)
            schema.add_field("tenant_id", DataType.VARCHAR, max_length=128, is_partition_key=True)
            schema.add_field("user_id", DataType.VARCHAR, max_length=128)

        def text(schema, name: str, n: int = MAX_TEXT, analyzed: bool = False) -> None:
            schema.add_field(name, DataType.VARCHAR, max_length=n, enable_analyzer=analyzed)

        specs: dict[str, tuple[list[tuple[str, Any]], int]] = {
            TURNS: ([("event_id", 128), ("session_id", 128), ("speaker", 128), ("text", MAX_TEXT),
                     ("source_id", 128), ("session_date", 64), ("ts", "int"), ("seq", "int"),
                     (EMBEDDED, "bool")], self.dim),
            OBSERVATIONS: ([("observation_id", 64), ("session_id", 128), ("speaker", 128), ("text", 4096),
                            ("event_date", 16), ("report_date", 16), ("source_ids", 8192), ("attributed", "bool"),
                            ("idx", "int"), ("decision", 8192), ("applied", "bool")], self.dim),
            MEMORIES: ([("text", 8192), ("version", "int"), ("created_at", "int"), ("updated_at", "int"),
                        ("last_op", 16), ("source_ids", 16384), ("observation_ids", 16384),
                        ("event_date", 16)], self.dim),
            HISTORY: ([("memory_id", 64), ("version", "int"), ("text", 8192), ("op", 16),
                       ("observation_id", 64), ("at", "int")], self.dim),
            SESSIONS: ([("session_id", 128), ("state", 16), ("n", "int"), ("updated_at", "int")], MARKER_DIM),
        }
        for key, (fields, dim) in specs.items():
            name = self.names[key]
            if self.client.has_collection(name):
                self.client.load_collection(name)  # needed after reopening a database
                fields_now = {f["name"] for f in self.client.describe_collection(name)["fields"]}
                self.bm25[key] = SPARSE in fields_now
                self.turn_flags |= key == TURNS and EMBEDDED in fields_now
                continue
            bm25 = self.cfg.bm25 and key in SEARCHABLE
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            base(schema)
            for fname, kind in fields:
                if kind == "int":
                    schema.add_field(fname, DataType.INT64)
                elif kind == "bool":
                    schema.add_field(fname, DataType.BOOL)
                else:
                    text(schema, fname, kind, analyzed=bm25 and fname == "text")
            schema.add_field("vec", DataType.FLOAT_VECTOR, dim=dim)
            index = self.client.prepare_index_params()
            index.add_index("vec", index_type="AUTOINDEX", metric_type="COSINE")
            if bm25:  # Milvus computes BM25 term vectors of `text` itself (full-text search)
                schema.add_field(SPARSE, DataType.SPARSE_FLOAT_VECTOR)
                schema.add_function(Function(name=f"{key}_bm25", function_type=FunctionType.BM25,
                                             input_field_names=["text"], output_field_names=[SPARSE]))
                index.add_index(SPARSE, index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
            self.bm25[key] = bm25
            self.turn_flags |= key == TURNS
            self.client.create_collection(
                name, schema=schema, index_params=index, num_partitions=self.cfg.num_partitions,
                consistency_level=self.cfg.consistency_level,
            )

    # ---- helpers ------------------------------------------------------------------------------
    def _get(self, key: str, ids: list[str], fields: list[str], consistency: str = STRONG) -> list[dict[str, Any]]:
        """Rows by primary key. In Milvus a get is a query: below Strong it may miss a row just written."""
        return list(self.client.get(self.names[key], ids=ids, output_fields=fields, consistency_level=consistency))

    def _query_all(self, key: str, flt: str, fields: list[str], consistency: str = STRONG) -> list[dict[str, Any]]:
        """Every row matching `flt` (paged, so large users are not truncated)."""
        rows = self.client.query(self.names[key], filter=flt, output_fields=fields, limit=QUERY_LIMIT,
                                 consistency_level=consistency)
        if len(rows) < QUERY_LIMIT:
            return list(rows)
        rows = []  # larger than one query may return: page through an iterator
        it = self.client.query_iterator(self.names[key], batch_size=QUERY_PAGE, filter=flt,
                                        output_fields=fields, consistency_level=consistency)
        try:
            while batch := it.next():
                rows.extend(batch)
        finally:
            it.close()
        return rows

    def _search(self, key: str, vector: np.ndarray, flt: str, k: int, fields: list[str],
                text: str | None = None, consistency: str = STRONG, dense_flt: str | None = None,
                ) -> list[dict[str, Any]]:
        """Top-k rows under `flt` (the dense half under `dense_flt` when given) at `consistency`:
        dense cosine on `vec`; with `text` on a collection that has BM25, dense and BM25 full-text
        results fused by reciprocal rank (`_score` is then the RRF score)."""
        dense = [np.asarray(vector, dtype=np.float32).tolist()]
        dense_flt = dense_flt or flt
        param: dict[str, Any] = {"metric_type": "COSINE"}
        if self.cfg.search_ef:
            param["params"] = {"ef": max(self.cfg.search_ef, k)}
        if text is None or not self.bm25.get(key) or not text.strip():
            res = self.client.search(self.names[key], data=dense, filter=dense_flt, limit=k, output_fields=fields,
                                     search_params=param, consistency_level=consistency)
        else:
            from pymilvus import AnnSearchRequest, RRFRanker

            depth = max(k, self.cfg.hybrid_depth)
            reqs = [AnnSearchRequest(data=dense, anns_field="vec", param=param, limit=depth,
                                     expr=dense_flt),
                    AnnSearchRequest(data=[text], anns_field=SPARSE, param={"metric_type": "BM25"}, limit=depth,
                                     expr=flt)]
            res = self.client.hybrid_search(self.names[key], reqs, ranker=RRFRanker(self.cfg.rrf_k), limit=k,
                                            output_fields=fields, consistency_level=consistency)
        return [{**hit["entity"], "_score": float(hit["distance"])} for hit in res[0]] if res else []

    def close(self) -> None:
        """Release the shared client (Milvus Lite flushes its file)."""
        with _CLIENTS_LOCK:
            for key, client in list(_CLIENTS.items()):
                if client is self.client:
                    client.close()
                    del _CLIENTS[key]
