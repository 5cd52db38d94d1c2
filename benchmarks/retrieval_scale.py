"""Grounding-search latency at production scale: 100k memories over 1,000 tenants x 10 users,
filtered top-3 search (`MilvusStore.search_memories`, the gateway's read), Strong against Bounded.

    nice -n 10 .venv/bin/python benchmarks/retrieval_scale.py                 # Lite file + lite server
    .venv/bin/python benchmarks/retrieval_scale.py --backends server --uri http://127.0.0.1:19530 --no-bm25

Vectors are random unit 384-d vectors (numpy, seeded), not embedded texts: embedding 100k texts
would take about 20 min on 2 cores and random vectors are a harder case for the index (no clusters).
Texts are short synthetic sentences (the BM25 index is built from them, as in production). Rows go in
through the store's own schema (`MilvusStore` creates the collections; rows from `memory/rows.py`),
in batches; each query picks a random (tenant, user) and a random unit vector. Levels alternate
within each repeat; figures are medians over repeats of each repeat's p50/p99.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))  # local_services: milvus-lite server
sys.path.insert(0, str(ROOT))

LEVELS = ("Strong", "Bounded")


def _store(uri: str, prefix: str, dim: int, bm25: bool, ef: int):
    from tsubasa.config import MilvusConfig
    from tsubasa.memory.store import MilvusStore

    return MilvusStore(MilvusConfig(uri=uri, collection_prefix=prefix, dim=dim, bm25=bm25, search_ef=ef), uri=uri)


def _fill(store, tenants: int, users: int, per_user: int, dim: int, batch: int, seed: int) -> float:
    """Insert tenants x users x per_user memories; return seconds."""
    from tsubasa.memory.milvus import MEMORIES
    from tsubasa.memory.rows import mem_row
    from tsubasa.schema import EvolutionOp, MemoryRecord

    rng = np.random.default_rng(seed)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    rows, t0 = [], time.perf_counter()
    for t in range(tenants):
        for u in range(users):
            vecs = rng.standard_normal((per_user, dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            for i in range(per_user):
                rec = MemoryRecord(memory_id=f"m{t}-{u}-{i}", tenant_id=f"t{t:04d}", user_id=f"u{u:02d}",
                                   text=f"On day {i} user {u} of tenant {t} mentioned fact number {i}.",
                                   created_at=now, updated_at=now)
                rows.append(mem_row(rec, vecs[i].tolist(), EvolutionOp.ADD))
                if len(rows) >= batch:
                    store.client.insert(store.names[MEMORIES], rows)
                    rows = []
    if rows:
        store.client.insert(store.names[MEMORIES], rows)
    # Milvus Lite searches unflushed rows through a Python snapshot of its memtable (seconds a search
    # at 100k rows); flushing seals them into indexed segments, as a server does in the background.
    store.client.flush(store.names[MEMORIES])
    return time.perf_counter() - t0


def _measure(store, tenants: int, users: int, dim: int, queries: int, k: int, rng,
             short: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Per level, the latencies (ms) of `queries` searches, the two levels interleaved; `short`
    counts searches that returned fewer than k memories (every user has at least k)."""
    out: dict[str, list[float]] = {lvl: [] for lvl in LEVELS}
    short = short if short is not None else {}
    for _ in range(queries):
        tenant, user = f"t{rng.integers(tenants):04d}", f"u{rng.integers(users):02d}"
        q = rng.standard_normal(dim).astype(np.float32)
        q /= np.linalg.norm(q)
        for lvl in LEVELS:
            store.cfg = store.cfg.model_copy(update={"search_consistency": lvl})
            t0 = time.perf_counter()
            hits = store.search_memories(tenant, user, q, k, stale_ok=True)
            out[lvl].append((time.perf_counter() - t0) * 1000)
            assert all(h.tenant_id == tenant and h.user_id == user for h in hits), "another user's memory"
            short[lvl] = short.get(lvl, 0) + (len(hits) < k)
    return out


def _pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p))


def run_backend(name: str, uri: str, args) -> dict:
    store = _store(uri, f"scale{args.seed}", args.dim, args.bm25, args.ef[0])
    from tsubasa.memory.milvus import MEMORIES

    n = args.tenants * args.users * args.per_user
    have = store.client.query(store.names[MEMORIES], filter='tenant_id != ""', output_fields=["count(*)"])
    have_n = int(have[0]["count(*)"]) if have else 0
    fill_s = None
    if have_n < n:
        fill_s = _fill(store, args.tenants, args.users, args.per_user, args.dim, args.batch, args.seed)
        print(f"[{name}] inserted {n} memories in {fill_s:.1f}s", flush=True)
    by_ef = []
    for ef in args.ef:
        store.cfg = store.cfg.model_copy(update={"search_ef": ef})
        rng = np.random.default_rng(args.seed + 1)
        _measure(store, args.tenants, args.users, args.dim, args.warmup, args.k, rng)  # warm caches, load segments
        per_level: dict[str, dict[str, list[float]]] = {lvl: {"p50": [], "p99": [], "mean": []} for lvl in LEVELS}
        short: dict[str, int] = {}
        for r in range(args.repeats):
            lat = _measure(store, args.tenants, args.users, args.dim, args.queries, args.k, rng, short)
            for lvl, xs in lat.items():
                per_level[lvl]["p50"].append(_pct(xs, 50))
                per_level[lvl]["p99"].append(_pct(xs, 99))
                per_level[lvl]["mean"].append(float(np.mean(xs)))
            print(f"[{name}] ef {ef} repeat {r + 1}: " + "  ".join(
                f"{lvl} p50 {_pct(xs, 50):.2f} ms p99 {_pct(xs, 99):.2f} ms" for lvl, xs in lat.items()), flush=True)
        by_ef.append({"search_ef": ef, **{lvl: {
            "p50_ms_median": round(statistics.median(v["p50"]), 2),
            "p99_ms_median": round(statistics.median(v["p99"]), 2),
            "mean_ms_median": round(statistics.median(v["mean"]), 2), "p50_ms_repeats": [round(x, 2) for x in v["p50"]],
            "p99_ms_repeats": [round(x, 2) for x in v["p99"]],
            "short_results": f"{short.get(lvl, 0)} of {args.queries * args.repeats}"} for lvl, v in per_level.items()}})
    store.close()
    return {"uri_kind": name, "memories": n, "insert_seconds": None if fill_s is None else round(fill_s, 1),
            "by_search_ef": by_ef}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--users", type=int, default=10, help="users per tenant")
    ap.add_argument("--per-user", type=int, default=10, help="memories per user")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--queries", type=int, default=300, help="searches per level per repeat")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2000, help="rows per insert")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ef", type=lambda v: [int(x) for x in v.split(",")], default=[256, 0],
                    help="milvus.search_ef values to measure (0 = the index default, 64 on Milvus Lite)")
    ap.add_argument("--backends", default="file,server", help="file (Milvus Lite file), server (milvus-lite server)")
    ap.add_argument("--uri", default="", help="with --backends server: use this server instead of starting one")
    ap.add_argument("--bm25", action=argparse.BooleanOptionalAction, default=True,
                    help="BM25 field on the collection, as production creates it (Milvus < 2.5 has none)")
    ap.add_argument("--allow-old-server", action="store_true",
                    help="measure a Milvus server older than 2.4, which the store refuses (milvus-io/milvus#30607 "
                         "loses partition-keyed upserts): this benchmark only inserts, which that bug leaves alone")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/retrieval-scale.json"))
    args = ap.parse_args()
    if args.allow_old_server:
        import tsubasa.memory.milvus as milvus_mod

        milvus_mod.check_server_version = lambda version, uri: print(f"server {uri}: {version} (not checked)")

    from local_services import MilvusLiteServer

    uptime0 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    results = []
    for backend in args.backends.split(","):
        if backend == "file":
            results.append(run_backend("Milvus Lite file", str(tmp / "scale.db"), args))
        elif backend == "server" and args.uri:
            results.append(run_backend(f"server {args.uri}", args.uri, args))
        elif backend == "server":
            with MilvusLiteServer(tmp / "server") as server:
                results.append(run_backend("milvus-lite server", server.url, args))
        else:
            raise SystemExit(f"unknown backend {backend!r}")
    out = {
        "benchmark": "retrieval-scale", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "what": (f"filtered top-{args.k} search_memories (tenant_id partition key + user_id filter) over "
                 f"{args.tenants} tenants x {args.users} users x {args.per_user} memories; random unit "
                 f"{args.dim}-d vectors (not embedded texts), synthetic texts"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "uptime_start": uptime0,
                    "uptime_end": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    for r in results:
        for e in r["by_search_ef"]:
            figures = [f"{lvl} p50 {e[lvl]['p50_ms_median']} ms p99 {e[lvl]['p99_ms_median']} ms short "
                       f"{e[lvl]['short_results']}" for lvl in LEVELS]
            print(f"{r['uri_kind']} ef {e['search_ef']}: " + "  ".join(figures))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
