"""The reading ablation's tables (issue 14) from what `benchmarks/reading_ablation.sh USER` left for
each user: LoCoMo F1 / BLEU-1 per variant (per user and pooled, with the paper's orderings checked as
paired differences), internalisation before and after (per user and pooled, bootstrap intervals), the
variants' training figures, and the wall time of every step.

    .venv/bin/python benchmarks/reading_ablation_report.py conv-26 conv-30 conv-41 \\
        --out benchmarks/results/reading-ablation-qwen15.json

Only figures go to the JSON: the run directories and `internalise.json` hold LoCoMo-derived text
(questions, answers, the teacher's answers) and stay under `.tsubasa/`, out of the repo.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.locomo_compare import READING, compare, print_table, verdict  # noqa: E402
from tsubasa.distill.adapters import AdapterRegistry  # noqa: E402
from tsubasa.eval.runner import ROWS_FILE  # noqa: E402
from tsubasa.stats import bootstrap_mean, paired_difference  # noqa: E402

# variant -> its registry under the ablation root (as in reading_ablation.sh and pipeline.registry_for)
REGISTRIES = {"tsubasa (d=5)": "adapters", "d=1": "distill/ablations/tsubasa-kl-d1-k3",
              "d=20": "distill/ablations/tsubasa-kl-d20-k3", "no grounding": "distill/ablations/no_grounding-kl-d5-k0",
              "vanilla": "distill/ablations/vanilla-lm"}
# internalisation orderings: KL(teacher || student) on held-out questions, lower is better, so `a
# better than b` reads as mean(KL_a - KL_b) < 0
INTERNALISE = [("after d=5 (k=3)", "after d=1 (k=3)"), ("after d=5 (k=3)", "before (base model, k=3)"),
               ("after d=1 (k=3)", "before (base model, k=3)"), ("after d=20 (k=3)", "before (base model, k=3)"),
               ("after no-grounding d=5", "before (base model, no grounding)"),
               ("after d=5 (k=3)", "after no-grounding d=5")]


def _ci(iv: dict) -> list[float]:
    return [round(iv["lo"], 4), round(iv["hi"], 4)]


def internalisation(per_user: dict[str, dict], boot: int) -> dict:
    """Per user: each condition's mean KL and agreement with intervals; pooled over users: the same on
    the concatenated questions, and the orderings as paired differences (lower KL is better)."""
    out: dict = {"per_user": {}, "pooled": {}}
    kl: dict[str, list[float]] = defaultdict(list)
    agree: dict[str, list[float]] = defaultdict(list)
    for u, res in per_user.items():
        rows = []
        for r in res["rows"]:
            rows.append({"label": r["label"], "n": r["n_questions"], "mean_kl": round(r["mean_kl"], 4),
                         "kl_ci95": _ci(r["kl_ci"]), "agreement": round(r["agreement"], 4),
                         "agreement_ci95": _ci(r["agreement_ci"])})
            kl[r["label"]] += r["kl_per_question"]
            agree[r["label"]] += [float(a) for a in r["agree_per_question"]]
        out["per_user"][u] = {"n_heldout": res["n_heldout"], "n_train": res["n_train"],
                              "dataset": res.get("dataset", {}), "rows": rows}
    for label in kl:
        k, a = bootstrap_mean(kl[label], boot), bootstrap_mean(agree[label], boot)
        out["pooled"][label] = {"n": k.n, "mean_kl": round(k.mean, 4), "kl_ci95": [round(k.lo, 4), round(k.hi, 4)],
                                "agreement": round(a.mean, 4), "agreement_ci95": [round(a.lo, 4), round(a.hi, 4)]}
    checked = []
    for a, b in INTERNALISE:
        if a in kl and b in kl:
            d = paired_difference(kl[b], kl[a], boot)  # KL_b - KL_a > 0: a is closer to the teacher
            checked.append({"ordering": f"{a} closer to the teacher than {b}", "n": d.n,
                            "kl_reduction": round(d.mean, 4), "ci95": [round(d.lo, 4), round(d.hi, 4)],
                            "verdict": verdict("<", d.lo, d.mean, d.hi)})
    out["orderings"] = checked
    return out


def training(root: Path, user: str) -> dict[str, dict]:
    """Each published variant's manifest figures (loss per epoch, seconds, examples)."""
    out = {}
    for variant, sub in REGISTRIES.items():
        if not (root / sub).is_dir():  # AdapterRegistry would create it: a report changes nothing
            continue
        v = AdapterRegistry(str(root / sub)).current("bench", user)
        if v is not None:
            m = v.manifest
            out[variant] = {"version": v.name, "n_examples": m.n_examples, "grounding_k": m.grounding_k, "d": m.d,
                            "loss": m.loss,
                            **{k: round(x, 4) for k, x in m.metrics.items()}}
    return out


def wall_times(path: Path) -> dict[str, int]:
    """The step times reading_ablation.sh appended ("step seconds" lines; a rerun step adds its time)."""
    times: dict[str, int] = defaultdict(int)
    if path.exists():
        for line in path.read_text().splitlines():
            step, _, secs = line.rpartition(" ")
            if step and secs.isdigit():
                times[step] += int(secs)
    return dict(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("users", nargs="+", help="LoCoMo sample ids the ablation ran on")
    ap.add_argument("--root", type=Path, default=Path(".tsubasa/distill-qwen15"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/reading-ablation-qwen15.json"))
    ap.add_argument("--boot", type=int, default=10_000)
    args = ap.parse_args()
    runs = {u: args.root / "runs" / u for u in args.users if (args.root / "runs" / u / ROWS_FILE).exists()}
    internalised = {u: json.loads(p.read_text()) for u in args.users
                    if (p := args.root / "runs" / u / "internalise.json").exists()}
    missing = [u for u in args.users if u not in runs and u not in internalised]
    if len(missing) == len(args.users):
        raise SystemExit(f"nothing to report under {args.root}/runs for {', '.join(args.users)}: "
                         "run benchmarks/reading_ablation.sh USER first")
    out: dict = {"benchmark": "reading-ablation", "users": args.users, "command": " ".join(sys.argv),
                 "locomo": {}, "training": {u: training(args.root, u) for u in args.users},
                 "wall_seconds": {u: wall_times(args.root / f"{u}.times") for u in args.users}}
    if runs:
        out["locomo"]["pooled"] = compare(list(runs.values()), READING, args.boot)
        print(f"LoCoMo, pooled over {', '.join(runs)}")
        print_table(out["locomo"]["pooled"])
        out["locomo"]["per_user"] = {u: compare([r], READING, args.boot) for u, r in runs.items()}
    if internalised:
        out["internalisation"] = internalisation(internalised, args.boot)
        print(f"\ninternalisation, pooled over {', '.join(internalised)}: mean KL(teacher || student), agreement")
        for label, r in out["internalisation"]["pooled"].items():
            print(f"  {label:<36}{r['n']:>5}{r['mean_kl']:>8.3f} {r['kl_ci95']!s:<20}{r['agreement']:>6.2f}")
        for o in out["internalisation"]["orderings"]:
            print(f"  {o['ordering']:<80} KL {o['kl_reduction']:+.3f} {o['ci95']}: {o['verdict']}")
    for u, steps in out["wall_seconds"].items():
        print(f"\n{u} wall time: " + ", ".join(f"{s} {t / 60:.0f} min" for s, t in steps.items()))
    if missing:
        print(f"\nno runs yet for {', '.join(missing)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
