"""Sum per-conversation evidence-recall results (benchmarks/retrieval.py, one JSON per conversation)
into one table: every method over all conversations present, and over the held-out ones (every
conversation but the tuning one, conv-26).

The writer's memory of all ten LoCoMo conversations takes hours on a 2-core machine, so it is built
and measured one conversation at a time (each result committed as it lands) and summed here; the
file lists which conversations are still missing.

    .venv/bin/python benchmarks/aggregate_retrieval.py benchmarks/results/retrieval-qwen15 \\
        --out benchmarks/results/retrieval-qwen15.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

TUNING = "conv-26"
ALL = ["conv-26", "conv-30", "conv-41", "conv-42", "conv-43", "conv-44", "conv-47", "conv-48", "conv-49", "conv-50"]
_SCOPE = re.compile(r"\s*\((?:sessions [0-9-]+|same convs)\)")


def method_key(name: str) -> str:
    """'tsubasa-evolved (same convs) [hybrid]' -> 'tsubasa-evolved [hybrid]' (scope is per file)."""
    return _SCOPE.sub("", name)


def methods(summary: dict[str, dict]) -> dict[str, dict]:
    """One entry per method: where a file has a method both over all its questions and scoped to the
    sessions its memory covers ('utterance-rag [dense]' and 'utterance-rag (same convs) [dense]'),
    the scoped one (the fair comparison with the memory) and only it."""
    out: dict[str, dict] = {}
    for name, s in summary.items():
        key = method_key(name)
        if key != name or key not in out:
            out[key] = s
    return out


def aggregate(files: list[Path]) -> dict:
    """Totals per method (all conversations, held out), weighting by each file's question count."""
    per_conv: dict[str, dict] = {}
    partial: dict[str, list[int]] = {}
    for f in files:
        data = json.loads(f.read_text())
        for conv in data["conversations"]:
            per_conv[conv] = {"file": str(f), "summary": data["summary"], "writer": data.get("writer"),
                              "command": data.get("command")}
            sessions = data.get("per_conversation", {}).get(conv, {}).get("memory_sessions")
            if sessions is not None:
                partial[conv] = sessions
    out: dict = {"conversations": sorted(per_conv), "missing": [c for c in ALL if c not in per_conv],
                 "memory_sessions": partial, "tuning": TUNING}
    for scope, convs in (("all", sorted(per_conv)), ("held_out", sorted(c for c in per_conv if c != TUNING))):
        totals: dict[str, dict] = {}
        for conv in convs:
            for name, s in methods(per_conv[conv]["summary"]).items():
                t = totals.setdefault(name, {"questions": 0, "covered": {}, "token_sum": {},
                                                         "conversations": []})
                n = s["questions"]
                t["questions"] += n
                t["conversations"].append(conv)
                for k, r in s["recall"].items():
                    t["covered"][k] = t["covered"].get(k, 0) + round(r * n)
                    t["token_sum"][k] = t["token_sum"].get(k, 0.0) + s["mean_tokens"][k] * n
        out[scope] = {m: {"questions": t["questions"], "conversations": t["conversations"],
                          "recall": {k: c / max(1, t["questions"]) for k, c in t["covered"].items()},
                          "mean_tokens": {k: v / max(1, t["questions"]) for k, v in t["token_sum"].items()}}
                      for m, t in totals.items()}
    out["per_conversation"] = {c: {m: {"questions": s["questions"], "recall": s["recall"]}
                                   for m, s in methods(v["summary"]).items()} for c, v in sorted(per_conv.items())}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="folder of per-conversation retrieval.py JSON files")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    files = sorted(args.folder.glob("*.json"))
    if not files:
        print(f"{args.folder}: no per-conversation results (*.json) to sum", file=sys.stderr)
        return 2
    agg = aggregate(files)
    agg["command"] = " ".join(sys.argv)
    args.out.write_text(json.dumps(agg, indent=2))
    for scope in ("all", "held_out"):
        rows = agg[scope]
        if not rows:
            continue
        print(f"\n{scope}: " + ", ".join(sorted({c for r in rows.values() for c in r["conversations"]})))
        for m, r in sorted(rows.items()):
            rec = " / ".join(f"{v:.3f}" for v in r["recall"].values())
            tok = " / ".join(f"{v:.0f}" for v in r["mean_tokens"].values())
            print(f"  {m:36s} n={r['questions']:5d}  R@{'/'.join(r['recall'])} {rec}  tokens {tok}")
    if agg["missing"]:
        print(f"\nmissing: {', '.join(agg['missing'])}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
