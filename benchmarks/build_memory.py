"""Build the evaluation memory of LoCoMo conversations with the writer (extraction + evolution,
the real MemoryWriter on Milvus Lite), resumable, recording the writer's cost per session.

Every LLM reply is memoised in a reply cache (benchmarks/replay_cache.py): a killed run resumes at
the session it stopped in (processed sessions are skipped by the writer itself), and a second store
(static accumulation, or another retrieval setting) is rebuilt from the same replies without a call.
The stores feed benchmarks/retrieval.py (--memory-db) and `tsubasa eval locomo` (--milvus).
Cost rows give wall and LLM seconds and `cpu_s`, this process's CPU seconds over all its threads
(llama.cpp runs in-process): unlike wall time it does not grow while the machine is shared or the
process is stopped.

    .venv/bin/python benchmarks/build_memory.py --conversations conv-26 --mode evolving \\
        --db .tsubasa/eval-qwen15/evolving/milvus.db --cost benchmarks/results/writer-cost-qwen15.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from replay_cache import CachedEngine

from tsubasa.config import load_settings
from tsubasa.embed import load_embedder
from tsubasa.eval.locomo import load_locomo, parse_range, session_events
from tsubasa.llm import load_engine, writer_model
from tsubasa.memory.store import MilvusStore
from tsubasa.memory.writer import MemoryWriter


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", default="conv-26", help="comma-separated sample ids or 'all'")
    ap.add_argument("--sessions", default="all")
    ap.add_argument("--mode", choices=["evolving", "static"], default="evolving")
    ap.add_argument("--tenant", default="bench")
    ap.add_argument("--db", type=Path, required=True, help="Milvus Lite file to write (resumes if it exists)")
    ap.add_argument("--cache", type=Path, default=Path(".tsubasa/writer-cache/replies.jsonl"))
    ap.add_argument("--cost", type=Path, default=None, help="append per-session writer cost here (JSON)")
    args = ap.parse_args()
    settings = load_settings(memory={**load_settings().memory.model_dump(), "mode": args.mode})
    wcfg = writer_model(settings.model, settings.writer)
    engine = CachedEngine(lambda: load_engine(wcfg), args.cache)
    embedder = load_embedder(settings.embedder)
    args.db.parent.mkdir(parents=True, exist_ok=True)
    store = MilvusStore(settings.milvus, uri=str(args.db))
    writer = MemoryWriter(store, embedder, engine, settings.memory)  # type: ignore[arg-type]
    convs = load_locomo()
    if args.conversations != "all":
        want = args.conversations.split(",")
        convs = sorted((c for c in convs if c.sample_id in want), key=lambda c: want.index(c.sample_id))
    costs: list[dict] = []
    if args.cost and args.cost.is_file():
        costs = json.loads(args.cost.read_text()).get("sessions", [])
    done_keys = {(c["conversation"], c["session"], c["mode"]) for c in costs}
    t_all = time.perf_counter()
    for conv in convs:
        for i in parse_range(args.sessions, [s.index for s in conv.sessions]):
            sess = conv.session(i)
            calls0, secs0, hits0 = engine.calls, engine.seconds, engine.hits
            t0, cpu0 = time.perf_counter(), time.process_time()
            _, results = writer.ingest(session_events(conv, sess, args.tenant, conv.sample_id))
            r = results[0]
            row = {"conversation": conv.sample_id, "session": sess.index, "mode": args.mode,
                   "turns": len(sess.turns), "observations": r.observations, "ops": r.ops,
                   "fallbacks": r.fallbacks, "skipped": r.skipped, "wall_s": time.perf_counter() - t0,
                   "cpu_s": time.process_time() - cpu0,
                   "llm_calls": engine.calls - calls0, "llm_s": engine.seconds - secs0,
                   "cached_calls": engine.hits - hits0}
            print(f"{conv.sample_id} {sess.session_id}: {'skipped' if r.skipped else ''} {r.observations} obs, "
                  f"ops {r.ops}, {row['llm_calls']} LLM calls ({row['llm_s']:.0f} s), "
                  f"{row['cached_calls']} cached, {row['wall_s']:.0f} s", flush=True)
            if args.cost and not r.skipped and row["llm_calls"] and (conv.sample_id, sess.index, args.mode) \
                    not in done_keys:
                costs.append(row)
                fresh = [c for c in costs if c["llm_calls"]]
                args.cost.parent.mkdir(parents=True, exist_ok=True)
                args.cost.write_text(json.dumps({
                    "writer": {"name": wcfg.name, "engine": wcfg.engine, "threads": wcfg.threads},
                    "median_llm_s_per_session": statistics.median(c["llm_s"] for c in fresh),
                    "median_calls_per_session": statistics.median(c["llm_calls"] for c in fresh),
                    "sessions": costs, "command": " ".join(sys.argv)}, indent=2))
    counts = store.counts(args.tenant)
    print(f"done in {time.perf_counter() - t_all:.0f} s; " + "; ".join(
        f"{u}: {c['observations']} observations, {c['memories']} memories, {c['history']} versions"
        for (_, u), c in sorted(counts.items())))
    store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
