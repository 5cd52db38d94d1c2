"""The writer's memory of LoCoMo, one conversation at a time, resumable across sessions of work.

For each conversation without a result yet: build its evolving memory with the configured writer
(benchmarks/build_memory.py: real MemoryWriter on Milvus Lite, every LLM reply cached, processed
sessions skipped on a re-run), measure evidence recall@k of every method on it
(benchmarks/retrieval.py), and re-sum the totals (benchmarks/aggregate_retrieval.py). Each
conversation's result is a small JSON of figures under `--results` (commit it as it lands: a 2-core
machine needs hours for all ten); the memory and the reply cache stay under `--work` (LoCoMo-derived,
never committed).

    nice .venv/bin/python benchmarks/writer_locomo.py --conversations conv-26,conv-30,conv-41
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from aggregate_retrieval import ALL

HERE = Path(__file__).resolve().parent


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", default=",".join(ALL), help="comma-separated sample ids, in order")
    ap.add_argument("--work", type=Path, default=Path(".tsubasa/eval-qwen15"), help="memories and reply cache")
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/retrieval-qwen15"))
    ap.add_argument("--total", type=Path, default=Path("benchmarks/results/retrieval-qwen15.json"))
    ap.add_argument("--cost", type=Path, default=Path("benchmarks/results/writer-cost-qwen15"))
    args = ap.parse_args()
    py = sys.executable
    args.results.mkdir(parents=True, exist_ok=True)
    args.cost.mkdir(parents=True, exist_ok=True)
    for conv in args.conversations.split(","):
        out = args.results / f"{conv}.json"
        if out.is_file():
            print(f"{conv}: result exists ({out}), skipped", flush=True)
            continue
        t0 = time.perf_counter()
        db = args.work / conv / "evolving.db"
        run([py, str(HERE / "build_memory.py"), "--conversations", conv, "--mode", "evolving", "--db", str(db),
             "--cache", str(args.work / "replies.jsonl"), "--cost", str(args.cost / f"{conv}.json")])
        run([py, str(HERE / "retrieval.py"), "--conversations", conv, "--memory-db", str(db), "--out", str(out)])
        run([py, str(HERE / "aggregate_retrieval.py"), str(args.results), "--out", str(args.total)])
        print(f"{conv}: done in {time.perf_counter() - t0:.0f} s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
