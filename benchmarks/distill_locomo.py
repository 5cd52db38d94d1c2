"""LoCoMo answers of the reading-wing systems for one distilled user, through the evaluation harness.

Runs the harness's `LocomoRunner` (resumable run directory, F1 / BLEU-1, report) on one conversation
with the systems `memory-evolving` (no adapter, the memory-only reference), `tsubasa` (adapter + k
memories), `tsubasa-no-grounding` and `vanilla-ft` (plus any `--system`). By default only the
questions whose evidence lies in the sessions the user's store holds are asked (`--questions
covered`), since neither the memory nor the adapter has seen the other sessions; `--questions all`
asks every scored question (with `--limit`).

    source env.sh   # TSUBASA_DATA_DIR / TSUBASA_MILVUS__URI of the distilled user
    .venv/bin/python benchmarks/distill_locomo.py --tenant bench --user conv-26 -o runs/distill-conv26
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SYSTEMS = "memory-evolving,tsubasa,tsubasa-no-grounding,vanilla-ft"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tenant", default="bench")
    ap.add_argument("--user", default="conv-26", help="LoCoMo sample id the user was ingested from")
    ap.add_argument("--system", default=SYSTEMS)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--questions", choices=["covered", "all"], default="covered")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("-o", "--run-dir", type=Path, default=Path("runs/distill-locomo"))
    args = ap.parse_args()

    from tsubasa.config import load_settings
    from tsubasa.eval.locomo import get_conversation
    from tsubasa.eval.report import summarize, write_report
    from tsubasa.eval.runner import LocomoRunner, RunSpec, read_rows
    from tsubasa.llm import load_engine
    from tsubasa.memory.runtime import MemorySystem

    settings = load_settings()
    engine = load_engine(settings.model)
    memory = MemorySystem(settings, engine=engine)
    conv = get_conversation(args.user)
    stored = {t.session_id for t in memory.store.list_turns(args.tenant, args.user)}
    if not stored:
        raise SystemExit(f"{args.tenant}/{args.user} has no turns in {settings.milvus_uri}")
    dias = {t.dia_id for s in conv.sessions if s.session_id in stored for t in s.turns}
    qa = [q for q in conv.qa if q.scored and (args.questions == "all" or (q.evidence and set(q.evidence) <= dias))]
    conv = conv.model_copy(update={"qa": qa[:args.limit] if args.limit else qa})
    systems = [s.strip() for s in args.system.split(",") if s.strip()]
    spec = RunSpec(systems=systems, ks=[args.k], conversations=[conv.sample_id], model=settings.model.name,
                   max_new_tokens=args.max_new_tokens, context_tokens=settings.model.max_context_tokens,
                   tenant=args.tenant, judge="none", memory_model=settings.model.name,
                   milvus_uri=settings.milvus_uri, limit=args.limit)
    print(f"{conv.sample_id}: {len(stored)} sessions in the store ({', '.join(sorted(stored))}); "
          f"{len(conv.qa)} questions ({args.questions}); systems {', '.join(systems)}; model {settings.model.name}")
    runner = LocomoRunner(spec, args.run_dir, [conv], memory, judge=None, engine=engine,
                          batch_size=settings.model.batch_size)
    t0 = time.perf_counter()
    res = runner.run(progress=lambda d, a, b: print(f"  {d}: {a}/{b}", flush=True), memory_mode="existing")
    rows = read_rows(args.run_dir)
    summaries = summarize(rows)
    write_report(args.run_dir, summaries, runner.spec, command="benchmarks/distill_locomo.py")
    print(f"\n{'system':<24}{'n':>4}{'F1':>8}{'BLEU-1':>8}{'tokens':>8}")
    for s in summaries:
        print(f"{s.label:<24}{s.overall.n:>4}{s.overall.f1:>8.2f}{s.overall.bleu1:>8.2f}{s.grounding_tokens:>8.1f}")
    out = args.run_dir / "distill_locomo.json"
    out.write_text(json.dumps({"user": f"{args.tenant}/{args.user}", "sessions": sorted(stored),
                               "questions": args.questions, "n_questions": len(conv.qa), "model": settings.model.name,
                               "seconds": time.perf_counter() - t0, "answered": res.answered,
                               "summaries": [s.model_dump() for s in summaries]}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
