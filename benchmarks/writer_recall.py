"""The writer's extraction quality, fast: evidence recall@k of extracted observations on chosen
LoCoMo sessions, against raw turns over the same sessions, with every LLM reply cached on disk.

For tuning extraction prompts and guards (tune on conv-26 only; report the others as held out):
a re-run with a changed parser or guard costs no LLM call, a changed prompt re-asks only what
changed. Retrieval is exact cosine over MiniLM in numpy (no Milvus), so a pass takes seconds once
the replies are cached. The whole pipeline (evolution, Milvus) is measured by benchmarks/retrieval.py.

    .venv/bin/python benchmarks/writer_recall.py -C conv-26 -s 1-6
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from replay_cache import CachedEngine

from tsubasa.config import load_settings
from tsubasa.embed import load_embedder
from tsubasa.eval.locomo import get_conversation, parse_range, session_events
from tsubasa.llm import load_engine, writer_model
from tsubasa.memory.observe import ObservationExtractor


def recall(vecs: np.ndarray, sources: list[list[str]], qvecs: np.ndarray, evidence: list[set[str]],
           ks: list[int]) -> dict[int, float]:
    if len(vecs) == 0:
        return dict.fromkeys(ks, 0.0)
    order = np.argsort(-(qvecs @ vecs.T), axis=1)
    out = {}
    for k in ks:
        hit = sum(ev <= {s for j in order[i, :k] for s in sources[j]} for i, ev in enumerate(evidence))
        out[k] = hit / max(1, len(evidence))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-C", "--conversation", default="conv-26")
    ap.add_argument("-s", "--sessions", default="1-6")
    ap.add_argument("--ks", default="1,3,5,10")
    ap.add_argument("--cache", type=Path, default=Path(".tsubasa/writer-cache/replies.jsonl"))
    ap.add_argument("--dump", type=Path, default=None, help="write the observations here (JSON lines)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures here (JSON)")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    settings = load_settings()
    wcfg = writer_model(settings.model, settings.writer)
    engine = CachedEngine(lambda: load_engine(wcfg), args.cache)
    embedder = load_embedder(settings.embedder)
    extractor = ObservationExtractor(engine, embedder, settings.memory)  # type: ignore[arg-type]
    conv = get_conversation(args.conversation)
    picked = parse_range(args.sessions, [s.index for s in conv.sessions])
    t0 = time.perf_counter()
    obs, turns_all, dropped = [], [], Counter()
    for i in picked:
        sess = conv.session(i)
        turns = [e.to_turn(seq=j) for j, e in enumerate(session_events(conv, sess, "bench", conv.sample_id,
                                                                        close=False))]
        turns_all.extend(turns)
        o, st = extractor.extract(turns)
        obs.extend(o)
        dropped.update(st.dropped)
        print(f"{sess.session_id}: {len(o)} observations, dropped {dict(st.dropped)}", flush=True)
    ids = {t.source_id for t in turns_all}
    qa = [q for q in conv.qa if q.scored and q.evidence and set(q.evidence) <= ids]
    qv = embedder.embed([q.question for q in qa])
    evidence = [set(q.evidence) for q in qa]
    r_obs = recall(embedder.embed([o.text for o in obs]), [o.source_ids for o in obs], qv, evidence, ks)
    r_utt = recall(embedder.embed([t.rendered() for t in turns_all]), [[t.source_id] for t in turns_all], qv,
                   evidence, ks)
    print(f"\n{conv.sample_id} sessions {args.sessions}: {len(qa)} questions, {len(obs)} observations "
          f"from {len(turns_all)} turns; LLM calls {engine.calls} ({engine.seconds:.0f} s), cached {engine.hits}")
    print("observations " + " ".join(f"R@{k}={v:.3f}" for k, v in r_obs.items()))
    print("utterances   " + " ".join(f"R@{k}={v:.3f}" for k, v in r_utt.items()))
    print(f"dropped {dict(dropped)}; elapsed {time.perf_counter() - t0:.0f} s")
    if args.dump:
        args.dump.write_text("\n".join(o.model_dump_json() for o in obs) + "\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "conversation": conv.sample_id, "sessions": picked, "questions": len(qa), "observations": len(obs),
            "recall_observations": r_obs, "recall_utterances": r_utt, "dropped": dict(dropped),
            "llm_calls": engine.calls, "llm_seconds": engine.seconds, "writer": wcfg.model_dump(mode="json"),
            "command": " ".join(sys.argv)}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
