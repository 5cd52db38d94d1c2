"""LoCoMo answers of several systems over one or more run directories (one per conversation), as one
table: F1 / BLEU-1 with bootstrap intervals, per category, tokens, and the paper's orderings checked
as paired differences over the same questions.

    .venv/bin/python benchmarks/locomo_compare.py .tsubasa/eval-qwen15/runs/conv-26/run \\
        --out benchmarks/results/locomo-qwen15.json

Only figures go to the JSON (no question or answer text: LoCoMo is CC BY-NC and stays out of the repo).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tsubasa.eval.locomo import CATEGORY_NAMES  # noqa: E402
from tsubasa.eval.runner import read_rows  # noqa: E402
from tsubasa.stats import bootstrap_mean, paired_difference  # noqa: E402

# The paper's orderings. Writing (Table 2): RAG(utterance) < RAG(observation) <= static <= evolving.
# Reading (its ablation): top-5 KL > cross-entropy (d=1) > no grounding > vanilla fine-tuning, and the
# adapter with its memories above the memories alone. Vanilla fine-tuning is served with the same k=3
# memories as tsubasa, so `vanilla < no grounding` also weighs memories against none: the pair
# `vanilla < tsubasa` is the like-for-like check.
READING = [("tsubasa-d1@k=3", "<", "tsubasa@k=3"), ("tsubasa-no-grounding", "<", "tsubasa-d1@k=3"),
           ("vanilla-ft@k=3", "<", "tsubasa-no-grounding"), ("vanilla-ft@k=3", "<", "tsubasa@k=3"),
           ("memory-evolving@k=3", "<", "tsubasa@k=3")]
ORDERINGS = [("rag-turns@k=3", "<", "rag-observations@k=3"), ("rag-observations@k=3", "<=", "memory-static@k=3"),
             ("memory-static@k=3", "<=", "memory-evolving@k=3"), ("rag-turns@k=3", "<", "memory-evolving@k=3")]


def label(row: dict) -> str:
    return row["system"] + (f"@k={row['k']}" if row.get("k") is not None else "")


def verdict(op: str, lo: float, mean: float, hi: float) -> str:
    if lo > 0:
        return "held (interval above 0)"
    if hi < 0:
        return "reversed (interval below 0)"
    if op == "<=" and mean >= 0:
        return "held in the mean, within noise"
    return "not shown (within noise)" if mean >= 0 else "not held in the mean, within noise"


def compare(runs: list[Path], orderings: list[tuple[str, str, str]], boot: int = 10_000) -> dict:
    """Every system's F1 (bootstrap interval), BLEU-1, tokens and categories over the rows of `runs`,
    pooled, and each ordering `a op b` as the paired F1 difference b - a on their common questions."""
    by_system: dict[str, dict[str, dict]] = defaultdict(dict)  # label -> qa_id -> row
    models, conversations = set(), set()
    for run in runs:
        for r in read_rows(run, with_judgements=False):
            by_system[label(r)][r["qa_id"]] = r
            models.add(r.get("model"))
            conversations.add(r["conversation"])
    systems = {}
    for name, rows in by_system.items():
        rs = list(rows.values())
        f1 = bootstrap_mean([100 * r["f1"] for r in rs], boot)
        cats = defaultdict(list)
        for r in rs:
            cats[r["category"]].append(r)
        systems[name] = {
            "n": len(rs), "f1": round(f1.mean, 2), "f1_ci95": [round(f1.lo, 2), round(f1.hi, 2)],
            "f1_locomo": round(100 * sum(r["f1_locomo"] for r in rs) / len(rs), 2),
            "bleu1": round(100 * sum(r["bleu1"] for r in rs) / len(rs), 2),
            "grounding_tokens_mean": round(sum(r["grounding_tokens"] for r in rs) / len(rs), 1),
            "prompt_tokens_mean": round(sum(r["prompt_tokens"] for r in rs) / len(rs), 1),
            "categories": {CATEGORY_NAMES[c]: {"n": len(v), "f1": round(100 * sum(r["f1"] for r in v) / len(v), 2),
                                               "bleu1": round(100 * sum(r["bleu1"] for r in v) / len(v), 2)}
                           for c, v in sorted(cats.items())},
            "per_conversation_f1": {c: round(100 * sum(r["f1"] for r in rs if r["conversation"] == c) /
                                             max(1, sum(r["conversation"] == c for r in rs)), 2)
                                    for c in sorted(conversations)},
        }
    checked = []
    for a, op, b in orderings:
        if a not in by_system or b not in by_system:
            continue
        common = sorted(set(by_system[a]) & set(by_system[b]))
        d = paired_difference([100 * by_system[b][q]["f1"] for q in common],
                              [100 * by_system[a][q]["f1"] for q in common], boot)
        checked.append({"ordering": f"{a} {op} {b}", "n": d.n, "f1_difference": round(d.mean, 2),
                        "ci95": [round(d.lo, 2), round(d.hi, 2)], "verdict": verdict(op, d.lo, d.mean, d.hi)})
    return {"benchmark": "locomo-f1", "conversations": sorted(conversations),
            "answerer": sorted(m for m in models if m),
            "runs": [str(r) for r in runs], "systems": systems, "orderings": checked}


def print_table(out: dict) -> None:
    systems = out["systems"]
    print(f"{'system':<24}{'n':>5}{'F1':>7}{'95% CI':>16}{'BLEU-1':>8}{'tokens':>8}  " +
          "  ".join(f"{n[:9]:>9}" for n in CATEGORY_NAMES.values() if n != CATEGORY_NAMES.get(5)))
    for name, s in sorted(systems.items(), key=lambda kv: kv[1]["grounding_tokens_mean"]):
        cats = "  ".join(f"{s['categories'].get(n, {}).get('f1', float('nan')):>9.2f}"
                         for n in CATEGORY_NAMES.values() if n != CATEGORY_NAMES.get(5))
        print(f"{name:<24}{s['n']:>5}{s['f1']:>7.2f}{s['f1_ci95']!s:>16}{s['bleu1']:>8.2f}"
              f"{s['grounding_tokens_mean']:>8.0f}  {cats}")
    for o in out["orderings"]:
        print(f"{o['ordering']:<50} diff {o['f1_difference']:+.2f} F1, 95% CI {o['ci95']}: {o['verdict']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories of `tsubasa eval locomo`")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/locomo-qwen15.json"))
    ap.add_argument("--orderings", choices=["writing", "reading"], default="writing",
                    help="the paper's orderings to check: the memory systems' (Table 2) or its reading ablation's")
    ap.add_argument("--boot", type=int, default=10_000)
    args = ap.parse_args()
    out = compare(args.runs, READING if args.orderings == "reading" else ORDERINGS, args.boot)
    out["command"] = " ".join(sys.argv)
    print_table(out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
