"""The memory writer's cost on each engine, side by side on the same LoCoMo sessions: seconds and
LLM calls per session, llama.cpp (the laptop default) against transformers (hf), the same
Qwen2.5-Coder-1.5B weights (GGUF Q4_K_M for llama.cpp, the bf16 copy made from it for hf).

Each engine writes a fresh memory with an empty reply cache (every call is really made), through
`benchmarks/build_memory.py`, one engine after the other in one run; the figures are per session
and in total. The memories differ (different numerics, greedy decoding on each), so their sizes
are reported beside the cost.

    .venv/bin/python benchmarks/writer_engines.py -C conv-26 -s 1-2 --out benchmarks/results/writer-engines.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-C", "--conversation", default="conv-26")
    ap.add_argument("-s", "--sessions", default="1-2")
    ap.add_argument("--engines", default="llamacpp,hf")
    ap.add_argument("--threads", type=int, default=2, help="writer threads (llama.cpp) / torch threads (hf)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/writer-engines.json"))
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="writer-engines-") as tmp:
        for engine in args.engines.split(","):
            work = Path(tmp) / engine
            env = {**os.environ, "TSUBASA_WRITER__ENGINE": engine, "TSUBASA_WRITER__THREADS": str(args.threads),
                   "OMP_NUM_THREADS": str(args.threads)}
            t0 = time.perf_counter()
            subprocess.run([sys.executable, str(HERE / "build_memory.py"), "--conversations", args.conversation,
                            "--sessions", args.sessions, "--db", str(work / "memory.db"),
                            "--cache", str(work / "replies.jsonl"), "--cost", str(work / "cost.json")],
                           env=env, check=True)
            cost = json.loads((work / "cost.json").read_text())
            sessions = cost["sessions"]
            runs[engine] = {"writer": cost["writer"], "wall_s_including_load": round(time.perf_counter() - t0, 1),
                            "llm_s_total": round(sum(s["llm_s"] for s in sessions), 1),
                            "llm_calls_total": sum(s["llm_calls"] for s in sessions),
                            "observations_total": sum(s["observations"] for s in sessions),
                            "sessions": [{k: s[k] for k in ("session", "turns", "observations", "ops", "llm_calls",
                                                            "llm_s", "wall_s")} for s in sessions]}
            print(f"{engine}: {runs[engine]['llm_s_total']:.0f} s in {runs[engine]['llm_calls_total']} LLM calls, "
                  f"{runs[engine]['observations_total']} observations", flush=True)
    names = list(runs)
    ratios = {f"{b}/{a}": round(runs[b]["llm_s_total"] / runs[a]["llm_s_total"], 2)
              for a in names for b in names if a != b and runs[a]["llm_s_total"]}
    out = {"benchmark": "writer-engines", "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "conversation": args.conversation, "sessions": args.sessions,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "load_avg_1m_start_end": [round(load0, 1), round(os.getloadavg()[0], 1)]},
           "runs": runs, "llm_seconds_ratios": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"LLM seconds ratios: {ratios}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
