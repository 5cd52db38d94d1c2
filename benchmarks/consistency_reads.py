"""Point reads on a Milvus server at each consistency level, in the two patterns the writer has:
a read right after its own write (a session marker or a memory it just wrote) and a read with no
recent write (the first check of a new session). Interleaved, medians over repeats.

    .venv/bin/python benchmarks/consistency_reads.py --uri http://127.0.0.1:19530

Uses plain inserts into a scratch collection (no partition key), so it also runs on the Milvus 2.3.5
that `pip install milvus` gives, whose upsert misroutes partition-keyed rows (milvus-io/milvus#30607).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

LEVELS = ("Strong", "Session", "Bounded")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", required=True)
    ap.add_argument("--reads", type=int, default=40, help="reads per (pattern, level) per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--idle-s", type=float, default=1.0, help="pause before a 'no recent write' read")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/consistency-reads.json"))
    args = ap.parse_args()
    from pymilvus import DataType, MilvusClient

    client = MilvusClient(uri=args.uri)
    version = client.get_server_version()
    name = f"consistency_probe_{int(time.time())}"
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("state", DataType.VARCHAR, max_length=32)
    schema.add_field("vec", DataType.FLOAT_VECTOR, dim=2)
    index = client.prepare_index_params()
    index.add_index(field_name="vec", index_type="FLAT", metric_type="L2")
    client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")
    client.load_collection(name)
    rng = np.random.default_rng(0)
    results: dict[str, dict[str, list[float]]] = {p: {lvl: [] for lvl in LEVELS} for p in ("after_write", "idle")}
    missed: dict[str, int] = dict.fromkeys(LEVELS, 0)
    n = 0
    try:
        for _ in range(args.repeats):
            per: dict[str, dict[str, list[float]]] = {p: {lvl: [] for lvl in LEVELS} for p in results}
            for i in range(args.reads):
                for lvl in LEVELS:
                    n += 1
                    key = f"k{n}"
                    client.insert(name, [{"id": key, "state": "done", "vec": rng.random(2).tolist()}])
                    t0 = time.perf_counter()
                    rows = client.get(name, ids=[key], output_fields=["state"], consistency_level=lvl)
                    per["after_write"][lvl].append(1000 * (time.perf_counter() - t0))
                    missed[lvl] += not rows  # read-your-writes failed at this level
                    if i % 4 == 0:  # fewer idle probes: each waits --idle-s
                        time.sleep(args.idle_s)
                        t0 = time.perf_counter()
                        client.get(name, ids=[key], output_fields=["state"], consistency_level=lvl)
                        per["idle"][lvl].append(1000 * (time.perf_counter() - t0))
            for p in per:
                for lvl in LEVELS:
                    results[p][lvl].append(statistics.median(per[p][lvl]))
            print("  ".join(f"{p}/{lvl} p50 {per[p][lvl] and statistics.median(per[p][lvl]):.1f} ms"
                            for p in per for lvl in LEVELS), flush=True)
    finally:
        client.drop_collection(name)
    out = {"benchmark": "consistency-reads", "when": datetime.now(UTC).isoformat(timespec="seconds"),
           "server_version": version, "command": " ".join(sys.argv),
           "p50_ms_median_of_repeats": {p: {lvl: round(statistics.median(v), 2) for lvl, v in d.items()}
                                        for p, d in results.items()},
           "read_your_write_misses": {lvl: f"{m} of {args.reads * args.repeats}" for lvl, m in missed.items()}}
    print(json.dumps(out, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
