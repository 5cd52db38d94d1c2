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
from typing import Any, Literal

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
TURN_VECTORS = "turn_vectors"
"""Dense vectors of raw turns, filled on demand, apart from the raw log (layout `split`)."""
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
"""Turn field of the `flagged` layout: whether `vec` holds the turn's embedding."""
TurnLayout = Literal["split", "flagged", "inline"]
"""Where raw turns keep their vectors. `split` (new collections with BM25): the raw log has text and
BM25 but no dense vector, and `turn_vectors` holds the vectors of the turns embedded so far, so an
appended turn costs Milvus no 384 floats (about half the upsert time of the placeholder, measured in
docs/benchmarks-store.md). `flagged` (new collections without BM25, which need a vector field, and
stores made before `split`): a placeholder `vec` and the `embedded` flag. `inline`: stores made before
either, every turn embedded on arrival."""


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
    """The collections of one TSUBASA deployment in one Milvus database (five, six with `turn_vectors`)."""

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
        self.turn_layout: TurnLayout = "split"
        self._ensure_collections()

    @property
    def turn_flags(self) -> bool:
        """Whether turns may be stored unembedded (every layout but `inline`)."""
        return self.turn_layout != "inline"

    # ---- schema -------------------------------------------------------------------------------
    def _ensure_collections(self) -> None:
        turn_fields = [("event_id", 128), ("session_id", 128), ("speaker", 128), ("text", MAX_TEXT),
                       ("source_id", 128), ("session_date", 64), ("ts", "int"), ("seq", "int")]
        specs: dict[str, tuple[list[tuple[str, Any]], int | None]] = {
            TURNS: (turn_fields, None) if self.cfg.bm25 else ([*turn_fields, (EMBEDDED, "bool")], self.dim),
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
            if not self.client.has_collection(name):
                self._create(key, fields, dim, bm25=self.cfg.bm25 and key in SEARCHABLE)
                if key == TURNS:
                    self.turn_layout = "split" if dim is None else "flagged"
                continue
            self.client.load_collection(name)  # needed after reopening a database
            fields_now = {f["name"] for f in self.client.describe_collection(name)["fields"]}
            self.bm25[key] = SPARSE in fields_now
            if key == TURNS:
                self.turn_layout = "split" if "vec" not in fields_now else "flagged" if EMBEDDED in fields_now \
                    else "inline"
        if self.turn_layout == "split":
            self.names[TURN_VECTORS] = f"{self.cfg.collection_prefix}_{TURN_VECTORS}"
            if self.client.has_collection(self.names[TURN_VECTORS]):
                self.client.load_collection(self.names[TURN_VECTORS])
            else:
                self._create(TURN_VECTORS, [], self.dim, bm25=False)

    def _create(self, key: str, fields: list[tuple[str, Any]], dim: int | None, bm25: bool) -> None:
        """Create one collection: id, tenant_id (partition key), user_id, `fields`, a dense `vec` of
        `dim` (none if None: then BM25 is its vector field) and with `bm25` Milvus' BM25 of `text`."""
        from pymilvus import DataType, Function, FunctionType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("tenant_id", DataType.VARCHAR, max_length=128, is_partition_key=True)
        schema.add_field("user_id", DataType.VARCHAR, max_length=128)
        for fname, kind in fields:
            if kind == "int":
                schema.add_field(fname, DataType.INT64)
            elif kind == "bool":
                schema.add_field(fname, DataType.BOOL)
            else:
                schema.add_field(fname, DataType.VARCHAR, max_length=kind, enable_analyzer=bm25 and fname == "text")
        index = self.client.prepare_index_params()
        if dim is not None:
            schema.add_field("vec", DataType.FLOAT_VECTOR, dim=dim)
            index.add_index("vec", index_type="AUTOINDEX", metric_type="COSINE")
        if bm25:  # Milvus computes BM25 term vectors of `text` itself (full-text search)
            schema.add_field(SPARSE, DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(Function(name=f"{key}_bm25", function_type=FunctionType.BM25,
                                         input_field_names=["text"], output_field_names=[SPARSE]))
            index.add_index(SPARSE, index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        self.bm25[key] = bm25
        self.client.create_collection(
            self.names[key], schema=schema, index_params=index, num_partitions=self.cfg.num_partitions,
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

    def _level(self, stale_ok: bool) -> str:
        """Consistency of a read: serving's level where it may lag, else Strong."""
        return self.cfg.search_consistency if stale_ok else STRONG

    def _dense_param(self, k: int) -> dict[str, Any]:
        param: dict[str, Any] = {"metric_type": "COSINE"}
        if self.cfg.search_ef:
            param["params"] = {"ef": max(self.cfg.search_ef, k)}
        return param

    def _search(self, key: str, vector: np.ndarray, flt: str, k: int, fields: list[str],
                text: str | None = None, consistency: str = STRONG, dense_flt: str | None = None,
                ) -> list[dict[str, Any]]:
        """Top-k rows under `flt` (the dense half under `dense_flt` when given) at `consistency`:
        dense cosine on `vec`; with `text` on a collection that has BM25, dense and BM25 full-text
        results fused by reciprocal rank (`_score` is then the RRF score)."""
        dense = [np.asarray(vector, dtype=np.float32).tolist()]
        dense_flt = dense_flt or flt
        if text is None or not self.bm25.get(key) or not text.strip():
            res = self.client.search(self.names[key], data=dense, filter=dense_flt, limit=k, output_fields=fields,
                                     search_params=self._dense_param(k), consistency_level=consistency)
        else:
            from pymilvus import AnnSearchRequest, RRFRanker

            depth = max(k, self.cfg.hybrid_depth)
            reqs = [AnnSearchRequest(data=dense, anns_field="vec", param=self._dense_param(depth), limit=depth,
                                     expr=dense_flt),
                    AnnSearchRequest(data=[text], anns_field=SPARSE, param={"metric_type": "BM25"}, limit=depth,
                                     expr=flt)]
            res = self.client.hybrid_search(self.names[key], reqs, ranker=RRFRanker(self.cfg.rrf_k), limit=k,
                                            output_fields=fields, consistency_level=consistency)
        return _hits(res)

    def _text_search(self, key: str, text: str, flt: str, k: int, fields: list[str],
                     consistency: str = STRONG) -> list[dict[str, Any]]:
        """Top-k rows under `flt` by Milvus' BM25 of `text` alone (`_score` is the BM25 score)."""
        res = self.client.search(self.names[key], data=[text], anns_field=SPARSE, filter=flt, limit=k,
                                 output_fields=fields, search_params={"metric_type": "BM25"},
                                 consistency_level=consistency)
        return _hits(res)

    def _fused_search(self, vector_key: str, text_key: str, vector: np.ndarray, text: str | None, flt: str,
                      k: int, fields: list[str], consistency: str = STRONG) -> list[dict[str, Any]]:
        """What `_search` does when the dense vectors and the BM25 text live in two collections under
        one primary key (raw turns: `turn_vectors` and `turns`): two searches, fused here by
        reciprocal rank as Milvus' RRFRanker does, then the rows of `text_key` by key. Without text
        (or BM25), dense alone with cosine scores."""
        hybrid = bool(text and text.strip()) and self.bm25.get(text_key, False)
        depth = max(k, self.cfg.hybrid_depth) if hybrid else k
        dense = self._search(vector_key, vector, flt, depth, ["id"], consistency=consistency)
        if not hybrid:
            ranked = [(h["id"], h["_score"]) for h in dense]
            rows: dict[str, dict[str, Any]] = {}
        else:
            lexical = self._text_search(text_key, str(text), flt, depth, ["id", *fields], consistency)
            ranked = rrf([[h["id"] for h in dense], [h["id"] for h in lexical]], self.cfg.rrf_k)[:k]
            rows = {h["id"]: h for h in lexical}
        missing = [pk for pk, _ in ranked if pk not in rows]
        if missing:
            rows.update((r["id"], r) for r in self._get(text_key, missing, ["id", *fields], consistency))
        # a vector whose row is gone (deleted between the two reads) is skipped
        return [{**rows[pk], "_score": score} for pk, score in ranked if pk in rows]

    def close(self) -> None:
        """Release the shared client (Milvus Lite flushes its file)."""
        with _CLIENTS_LOCK:
            for key, client in list(_CLIENTS.items()):
                if client is self.client:
                    client.close()
                    del _CLIENTS[key]


def _hits(res: Any) -> list[dict[str, Any]]:
    return [{**hit["entity"], "id": hit["id"], "_score": float(hit["distance"])} for hit in res[0]] if res else []


def rrf(rankings: list[list[str]], k: int) -> list[tuple[str, float]]:
    """Reciprocal rank fusion, as Milvus' RRFRanker: score = sum over lists of 1 / (k + rank), rank
    from 1; best first (ties by first appearance)."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, pk in enumerate(ranking, start=1):
            scores[pk] = scores.get(pk, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])
