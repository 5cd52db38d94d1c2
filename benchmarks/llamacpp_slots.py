"""llama.cpp slots against a queue for the memory writer's two kinds of calls, side by side in one run.

- `extract`: both speakers' extraction prompts of LoCoMo sessions (long shared transcript prefix;
  in a queue the second prompt re-reads only the tail from the prompt cache);
- `decide`: independent evolution prompts (short, numbered candidates).

For each `model.parallel` in --parallel a fresh engine runs the same prompts (a batch per session
or per group of decisions, as MemoryWriter submits them); wall time, prompt and generated tokens
per second, medians over --repeats. Greedy decoding: the outputs of every setting are compared.

    .venv/bin/python benchmarks/llamacpp_slots.py --parallel 1,2,4 --sessions 1-2 --out \\
        benchmarks/results/llamacpp-slots.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

from tsubasa.config import load_settings
from tsubasa.eval.locomo import get_conversation, parse_range, session_events
from tsubasa.llm import load_engine, writer_model
from tsubasa.llm.base import SamplingParams, msgs
from tsubasa.memory import prompts
from tsubasa.memory.observe import ObservationExtractor


def workloads(conv_id: str, sessions: str, n_decide: int, max_items: int):
    """(extract batches, decide batches): lists of prompt lists."""
    settings = load_settings()
    conv = get_conversation(conv_id)
    extractor = ObservationExtractor(engine=None, embedder=None, cfg=settings.memory)  # type: ignore[arg-type]
    extract = []
    for i in parse_range(sessions, [s.index for s in conv.sessions]):
        turns = [e.to_turn() for e in session_events(conv, conv.session(i), "bench", conv_id, close=False)]
        date = min(t.timestamp for t in turns).date()
        extract.append([extractor.prompt(turns, s, date) for s in extractor.speakers(turns)])
    facts = [text for obs in conv.observations.values() for _, text, _ in obs]
    decide = []
    for j in range(n_decide):
        cands = "\n".join(f"{n + 1}. {facts[(j * 7 + n * 3) % len(facts)]}" for n in range(max_items))
        user = prompts.DECIDE_USER.format(candidates=cands, observation=facts[(j * 11 + 5) % len(facts)])
        decide.append(msgs(("system", prompts.DECIDE_SYSTEM), ("user", user)))
    return extract, [decide[i:i + 4] for i in range(0, len(decide), 4)]


def run(engine, batches, max_new_tokens: int) -> dict:
    t0 = time.perf_counter()
    outs, ptok, gtok = [], 0, 0
    for batch in batches:
        for g in engine.generate(batch, SamplingParams(max_new_tokens=max_new_tokens)):
            outs.append(g.text)
            ptok += g.prompt_tokens
            gtok += g.completion_tokens
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "prompt_tokens": ptok, "generated_tokens": gtok, "gen_tok_s": gtok / wall,
            "outputs": outs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parallel", default="1,2,4")
    ap.add_argument("-C", "--conversation", default="conv-26")
    ap.add_argument("--sessions", default="1-2")
    ap.add_argument("--decisions", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/llamacpp-slots.json"))
    args = ap.parse_args()
    settings = load_settings()
    extract, decide = workloads(args.conversation, args.sessions, args.decisions, 5)
    base = writer_model(settings.model, settings.writer)
    if base.engine != "llamacpp":
        print(f"writer engine is {base.engine}, not llamacpp", file=sys.stderr)
        return 2
    results: dict = {"model": base.name, "threads": base.threads or os.cpu_count(), "load": os.getloadavg(),
                     "sessions": args.sessions, "settings": {}}
    for par in [int(p) for p in args.parallel.split(",")]:
        engine = load_engine(base.model_copy(update={"parallel": par}))
        row = {}
        for name, batches, mnt in (("extract", extract, settings.memory.extract_max_new_tokens),
                                   ("decide", decide, settings.memory.decide_max_new_tokens)):
            reps = [run(engine, batches, mnt) for _ in range(args.repeats)]
            # the first repeat fills the prompt cache of later ones: keep both, report the median
            row[name] = {"wall_s": statistics.median(r["wall_s"] for r in reps),
                         "gen_tok_s": statistics.median(r["gen_tok_s"] for r in reps),
                         "walls": [round(r["wall_s"], 2) for r in reps],
                         "generated_tokens": reps[0]["generated_tokens"],
                         "prompt_tokens": reps[0]["prompt_tokens"],
                         # hashes, not text: the outputs are LoCoMo-derived and stay out of the repo
                         "output_sha256": [hashlib.sha256(o.encode()).hexdigest() for o in reps[0]["outputs"]]}
            print(f"parallel={par} {name}: {row[name]['wall_s']:.1f} s, {row[name]['gen_tok_s']:.1f} gen tok/s "
                  f"(walls {row[name]['walls']})", flush=True)
        engine.close()
        results["settings"][str(par)] = row
    ref = results["settings"][args.parallel.split(",")[0]]
    for row in results["settings"].values():
        for name in ("extract", "decide"):
            row[name]["speedup_vs_first"] = ref[name]["wall_s"] / row[name]["wall_s"]
            row[name]["same_outputs_as_first"] = sum(a == b for a, b in zip(row[name]["output_sha256"],
                                                                            ref[name]["output_sha256"], strict=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({p: {n: (round(r[n]["speedup_vs_first"], 2), r[n]["same_outputs_as_first"])
                          for n in ("extract", "decide")} for p, r in results["settings"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
