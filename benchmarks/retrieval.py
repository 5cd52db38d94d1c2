"""Evidence recall@k on LoCoMo: utterance RAG vs observation memories.

For every scored LoCoMo question (categories 1-4) with evidence, a method "covers" it at k when every
evidence turn id is in the provenance of its top-k retrieved items (per-conversation retrieval,
MiniLM embeddings, Milvus). Methods:
  utterance-rag     raw turns (the turn log)
  locomo-obs        LoCoMo's own GPT-written `observation` field (carries turn ids): strong extractor
  tsubasa-evolved   our evolved memories (from an ingested Milvus db, where given)
  tsubasa-observed  our extracted observations before evolution (same db)
Each method runs with dense retrieval (MiniLM cosine) and hybrid retrieval (dense + Milvus BM25,
reciprocal-rank fused): `--search dense,hybrid`. Mean grounding tokens are counted with the serving
model's tokenizer.

    .venv/bin/python benchmarks/retrieval.py --memory-db .tsubasa/conv26/milvus.db --memory-tenant bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tsubasa.config import MilvusConfig, ModelConfig, load_settings
from tsubasa.embed import load_embedder
from tsubasa.eval.locomo import LocomoNotFoundError, load_locomo, session_events
from tsubasa.llm.models import load_tokenizer
from tsubasa.memory.retrieve import Retriever
from tsubasa.memory.store import MilvusStore
from tsubasa.memory.writer import MemoryWriter
from tsubasa.schema import Observation, stable_id

UTT, LOCOMO_OBS = "bench-utt", "bench-locomo-obs"


def _recall(retriever: Retriever, tenant: str, user: str, qa, ks: list[int], source: str, count) -> dict:
    hits = {k: 0 for k in ks}
    tokens: dict[int, list[int]] = {k: [] for k in ks}
    for q in qa:
        full = retriever.retrieve(tenant, user, q.question, k=max(ks), source=source)
        for k in ks:
            g = full.top(k, count)
            hits[k] += int(set(q.evidence) <= g.source_ids)
            tokens[k].append(g.tokens)
    return {k: {"covered": hits[k], "tokens": tokens[k]} for k in ks}


def _merge(total: dict, part: dict) -> None:
    for k, v in part.items():
        t = total.setdefault(k, {"covered": 0, "tokens": []})
        t["covered"] += v["covered"]
        t["tokens"].extend(v["tokens"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", default="all", help="comma-separated sample ids or 'all'")
    ap.add_argument("--ks", default="1,3,5,10")
    ap.add_argument("--memory-db", type=Path, help="Milvus Lite file with ingested conversations (copied first)")
    ap.add_argument("--memory-tenant", default="bench")
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct", help="tokenizer used for token counts")
    ap.add_argument("--search", default="dense,hybrid", help="retrieval modes to compare: dense, hybrid or both")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/retrieval.json"))
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    modes = [m.strip() for m in args.search.split(",") if m.strip()]
    if not modes or set(modes) - {"dense", "hybrid"}:
        ap.error("--search: give dense, hybrid or dense,hybrid")
    try:
        convs = load_locomo()
    except LocomoNotFoundError as exc:
        print(f"skipped: {exc}")
        return 0
    if args.conversations != "all":
        want = set(args.conversations.split(","))
        convs = [c for c in convs if c.sample_id in want]
    t0 = time.perf_counter()
    embedder = load_embedder()
    tok = load_tokenizer(args.model, ModelConfig().cache_dir)

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    work = Path(tempfile.mkdtemp(prefix="tsubasa-retrieval-"))
    store = MilvusStore(MilvusConfig(), uri=str(work / "index.db"))
    writer = MemoryWriter(store, embedder, engine=None)
    retrievers = {m: Retriever(store, embedder, count, m) for m in modes}
    mem_store = None
    mem_retrievers: dict[str, Retriever] = {}
    if args.memory_db:
        copy = work / "memory.db"
        # Milvus Lite is single-process: never open the original (a directory with milvus-lite 3.x)
        (shutil.copytree if args.memory_db.is_dir() else shutil.copy)(args.memory_db, copy)
        mem_store = MilvusStore(MilvusConfig(), uri=str(copy))
        mem_retrievers = {m: Retriever(mem_store, embedder, count, m) for m in modes}

    totals: dict[str, dict] = {}
    per_conv: dict[str, dict] = {}
    n_questions = 0
    for conv in convs:
        qa = [q for q in conv.qa if q.scored and q.evidence]
        n_questions += len(qa)
        user = conv.sample_id
        events = [e for s in conv.sessions for e in session_events(conv, s, UTT, user, close=False)]
        writer.append(events)
        obs = [Observation(observation_id=stable_id(LOCOMO_OBS, user, str(si), str(i), prefix="o"),
                           tenant_id=LOCOMO_OBS, user_id=user, session_id=f"session_{si}", speaker=sp, text=text,
                           report_date=conv.session(si).when.date(), source_ids=ev, index=i)
               for si, items in conv.observations.items() for i, (sp, text, ev) in enumerate(items)]
        store.upsert_observations(obs, embedder.embed([o.text for o in obs]))
        results = {}
        for m, r in retrievers.items():
            results[f"utterance-rag [{m}]"] = _recall(r, UTT, user, qa, ks, "turns", count)
            results[f"locomo-obs [{m}]"] = _recall(r, LOCOMO_OBS, user, qa, ks, "observations", count)
        if mem_store is not None and mem_store.list_memories(args.memory_tenant, user):
            # Compare on the sessions the memory db has processed (all of them once an ingest finished):
            # questions whose evidence lies in those sessions, utterance RAG over those sessions' turns.
            done = [s for s in conv.sessions
                    if (st := mem_store.session_state(args.memory_tenant, user, s.session_id)) and st.state == "done"]
            done_ids = {t.dia_id for s in done for t in s.turns}
            sub = [q for q in qa if set(q.evidence) <= done_ids]
            scope = f"sessions {done[0].index}-{done[-1].index}" if len(done) < len(conv.sessions) else "same convs"
            part_tenant = f"{UTT}-part"
            writer.append([e for s in done for e in session_events(conv, s, part_tenant, user, close=False)])
            results_q = {}
            for m in modes:
                for name, (r, tenant, source) in {
                        f"utterance-rag ({scope}) [{m}]": (retrievers[m], part_tenant, "turns"),
                        f"tsubasa-evolved ({scope}) [{m}]": (mem_retrievers[m], args.memory_tenant, "memories"),
                        f"tsubasa-observed ({scope}) [{m}]": (mem_retrievers[m], args.memory_tenant, "observations"),
                }.items():
                    results[name] = _recall(r, tenant, user, sub, ks, source, count)
                    results_q[name] = len(sub)
            per_conv.setdefault(user, {})["memory_sessions"] = [s.index for s in done]
        else:
            results_q = {}
        nq = {m: results_q.get(m, len(qa)) for m in results}
        per_conv[user] = {**per_conv.get(user, {}),
                          **{m: {k: r[k]["covered"] / max(1, nq[m]) for k in ks} for m, r in results.items()}}
        per_conv[user]["questions"] = len(qa)
        for method, r in results.items():
            _merge(totals.setdefault(method, {"questions": 0}), r)
            totals[method]["questions"] += nq[method]
        print(f"{user}: {len(qa)} questions, " + ", ".join(
            f"{m}@{ks[1]}={v[ks[1]]:.2f}" for m, v in per_conv[user].items() if isinstance(v, dict)), flush=True)

    summary = {}
    print(f"\nEvidence recall@k (all evidence ids covered), {len(convs)} conversation(s), {n_questions} questions")
    print(f"{'method':44s} {'n':>5s} " + " ".join(f"{'R@' + str(k):>7s}" for k in ks) + "   mean tokens @k")
    for method, t in totals.items():
        n = t["questions"]
        rec = {k: t[k]["covered"] / max(1, n) for k in ks}
        tok_k = {k: statistics.fmean(t[k]["tokens"]) for k in ks}
        summary[method] = {"questions": n, "recall": rec, "mean_tokens": tok_k,
                           "median_tokens": {k: float(np.median(t[k]["tokens"])) for k in ks}}
        print(f"{method:44s} {n:5d} " + " ".join(f"{rec[k]:7.3f}" for k in ks) + "   "
              + " / ".join(f"{tok_k[k]:.0f}" for k in ks))
    elapsed = time.perf_counter() - t0
    print(f"elapsed {elapsed:.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    if args.memory_db:  # which writer made the memory: commit and settings (results are resumed across sessions)
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        writer = {"git": git.stdout.strip() or None, "memory": load_settings().memory.model_dump(mode="json"),
                  "writer": load_settings().writer.model_dump(mode="json")}
    args.out.write_text(json.dumps({"ks": ks, "search": modes, "conversations": [c.sample_id for c in convs],
                                    "writer": writer,
                                    "tokenizer": args.model, "memory_db": str(args.memory_db or ""),
                                    "summary": summary, "per_conversation": per_conv,
                                    "elapsed_s": elapsed, "command": " ".join(sys.argv)}, indent=2))
    print(f"wrote {args.out}")
    store.close()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
