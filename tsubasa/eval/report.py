"""Summaries of run rows: per-category and overall F1 / BLEU-1 / J, grounding tokens, latency
percentiles, evidence recall; markdown tables, a results JSON and the published anchors beside them.

Overall scores are micro-averages over questions (the convention of Mem0 and Memory-R1). Scores
are printed x100. A question whose judge reply had no label counts as WRONG in J and is reported.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from statistics import mean
from typing import Any

import yaml
from pydantic import BaseModel, Field

from tsubasa.eval.locomo import CATEGORY_NAMES
from tsubasa.eval.metrics import percentile
from tsubasa.eval.runner import SPEC_FILE, RunSpec, read_rows

REFERENCE_SYSTEM = "memory-evolving"
FULL_CONTEXT = "full-context"


class Scores(BaseModel):
    n: int = 0
    f1: float = 0.0
    f1_locomo: float = 0.0
    bleu1: float = 0.0
    j: float | None = None
    """None when no row of the group was judged."""
    j_n: int = 0
    """Rows that J averages over (the judged ones)."""


class Summary(BaseModel):
    run: str
    system: str
    k: int | None
    overall: Scores
    categories: dict[int, Scores]
    grounding_tokens: float
    prompt_tokens: float
    latency_p50_s: float
    latency_p95_s: float
    evidence_recall: float | None
    judges: list[str] = Field(default_factory=list)
    judge_unparsed: int = 0
    judge_errors: int = 0
    truncated: float | None = None
    """Fraction of answers whose context was truncated (full context only)."""
    full_history_tokens: float | None = None

    @property
    def label(self) -> str:
        return self.system if self.k is None else f"{self.system}@k={self.k}"


def _scores(rows: Sequence[dict[str, Any]]) -> Scores:
    if not rows:
        return Scores()
    judged = [r for r in rows if r.get("judge")]
    return Scores(n=len(rows), f1=100 * mean(r["f1"] for r in rows),
                  f1_locomo=100 * mean(r["f1_locomo"] for r in rows), bleu1=100 * mean(r["bleu1"] for r in rows),
                  j=100 * mean(r.get("judge_label") == "CORRECT" for r in judged) if judged else None,
                  j_n=len(judged))


def summarize(rows: Iterable[dict[str, Any]], run: str = "") -> list[Summary]:
    """One summary per (system, k), in first-seen order."""
    groups: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["system"], r.get("k")), []).append(r)
    out = []
    for (system, k), rs in groups.items():
        lat = [r["latency_s"] for r in rs]
        recall = [r["evidence_recall"] for r in rs if r.get("evidence_recall") is not None]
        extras = [r.get("extra") or {} for r in rs]
        trunc = [e["truncated"] for e in extras if "truncated" in e]
        full = [e["full_tokens"] for e in extras if "full_tokens" in e]
        out.append(Summary(
            run=run, system=system, k=k, overall=_scores(rs),
            categories={c: _scores([r for r in rs if r["category"] == c])
                        for c in sorted({r["category"] for r in rs})},
            grounding_tokens=mean(r["grounding_tokens"] for r in rs),
            prompt_tokens=mean(r["prompt_tokens"] for r in rs),
            latency_p50_s=percentile(lat, 50), latency_p95_s=percentile(lat, 95),
            evidence_recall=100 * mean(recall) if recall else None,
            judges=sorted({r["judge"] for r in rs if r.get("judge")}),
            judge_unparsed=sum(1 for r in rs if r.get("judge") and r.get("judge_label") is None
                               and not r.get("judge_error")),
            judge_errors=sum(1 for r in rs if r.get("judge_error")),
            truncated=100 * mean(trunc) if trunc else None, full_history_tokens=mean(full) if full else None))
    return out


@lru_cache(maxsize=1)
def published_anchors() -> list[dict[str, Any]]:
    """The published reference numbers (tsubasa/eval/data/published.yaml)."""
    text = resources.files("tsubasa.eval").joinpath("data/published.yaml").read_text()
    return list(yaml.safe_load(text)["anchors"])


@dataclass
class TokenRatio:
    memory_label: str
    memory_tokens: float
    full_context_tokens: float
    full_history_tokens: float | None

    @property
    def ratio(self) -> float:
        return self.full_context_tokens / self.memory_tokens if self.memory_tokens else float("inf")

    @property
    def history_ratio(self) -> float | None:
        if self.full_history_tokens is None or not self.memory_tokens:
            return None
        return self.full_history_tokens / self.memory_tokens

    def sentence(self) -> str:
        s = (f"{self.memory_label}: {self.memory_tokens:.1f} grounding tokens per answer vs "
             f"{self.full_context_tokens:.0f} for full context (window-truncated): "
             f"ratio {self.ratio:.1f}x fewer")
        if self.history_ratio is not None:
            s += (f"; the whole conversation is {self.full_history_tokens:.0f} tokens, "
                  f"{self.history_ratio:.1f}x the memory grounding")
        return s


def token_ratio(summaries: Sequence[Summary], k: int = 3) -> TokenRatio | None:
    """Memory grounding tokens at k (evolving memory) against the full-context baseline of the same run."""
    for s in summaries:
        if s.system == REFERENCE_SYSTEM and s.k == k:
            full = next((f for f in summaries if f.system == FULL_CONTEXT and f.run == s.run), None)
            if full is None:
                return None
            return TokenRatio(s.label, s.grounding_tokens, full.grounding_tokens, full.full_history_tokens)
    return None


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _j(sc: Scores) -> str:
    """J, with the judged count when only part of the rows were judged."""
    if sc.j is None:
        return "-"
    return _f(sc.j) if sc.j_n == sc.n else f"{_f(sc.j)} ({sc.j_n}/{sc.n} judged)"


def _judge_note(summaries: Sequence[Summary], spec: RunSpec | None) -> str:
    judges = sorted({j for s in summaries for j in s.judges})
    if not judges:
        return ("J: not computed (the run used `--judge none`; `tsubasa eval judge RUN_DIR` adds it afterwards "
                "from the stored predictions).")
    note = f"J produced by: {', '.join(judges)}."
    model = spec.model if spec else None
    if any(j.startswith("local:") for j in judges):
        note += (" No external judge was configured, so the local engine"
                 + (f" (`{model}`, the answering model itself)" if model and f"local:{model}" in judges else "")
                 + " judged its own answers. A model this small cannot judge reliably: treat J as a plumbing"
                 " check, not comparable with published J (GPT-4o-mini judges).")
    unparsed = sum(s.judge_unparsed for s in summaries)
    errors = sum(s.judge_errors for s in summaries)
    if unparsed or errors:
        note += f" Replies without a usable label (counted WRONG): {unparsed}; judge call errors: {errors}."
    return note


def markdown(summaries: Sequence[Summary], spec: RunSpec | None = None, title: str = "LoCoMo evaluation",
             command: str | None = None, compare: bool = False, systems_info: dict[str, Any] | None = None) -> str:
    """The report: overall table, per-category tables, token ratio, judge note, published anchors."""
    lines = [f"# {title}", ""]
    if command:
        lines += ["Commands (in order; a re-run resumes):", "", "```", command, "```", ""]
    if spec:
        lines += [f"- model: `{spec.model}` (memory written by `{spec.memory_model or spec.model}`), prompt "
                  f"`{spec.prompt_style}`, max new tokens {spec.max_new_tokens}, full-context window "
                  f"{spec.context_tokens} tokens",
                  f"- conversations: {', '.join(spec.conversations)}; categories "
                  f"{', '.join(f'{c} {CATEGORY_NAMES[c]}' for c in spec.categories)}"
                  + (f"; first {spec.limit} questions per conversation" if spec.limit else ""), ""]
    run_col = ["run"] if compare else []
    head = [*run_col, "system", "k", "n", "F1", "F1 (LoCoMo)", "BLEU-1", "J", "grounding tok/answer",
            "prompt tok", "p50 s", "p95 s", "evidence recall %"]
    lines += ["## Overall (this harness)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        o = s.overall
        cells = [*([s.run] if compare else []), s.system, "-" if s.k is None else str(s.k), str(o.n), _f(o.f1),
                 _f(o.f1_locomo), _f(o.bleu1), _j(o), _f(s.grounding_tokens, 1), _f(s.prompt_tokens, 0),
                 _f(s.latency_p50_s), _f(s.latency_p95_s), _f(s.evidence_recall, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    cats = sorted({c for s in summaries for c in s.categories})
    for metric, name in (("f1", "F1"), ("bleu1", "BLEU-1"), ("j", "J")):
        if metric == "j" and all(s.overall.j is None for s in summaries):
            continue
        head = [*run_col, "system", "k", *[f"{c} {CATEGORY_NAMES[c]} (n)" for c in cats]]
        lines += ["", f"### {name} by category", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in summaries:
            cells = [*([s.run] if compare else []), s.system, "-" if s.k is None else str(s.k)]
            for c in cats:
                sc = s.categories.get(c)
                n = sc.j_n if sc is not None and metric == "j" else (sc.n if sc else 0)
                cells.append("-" if sc is None else f"{_f(getattr(sc, metric))} ({n})")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Grounding tokens: memory vs full context", ""]
    ratio = token_ratio(summaries)
    lines.append(f"- {ratio.sentence()}" if ratio else
                 "- (needs memory-evolving at k=3 and full-context in the same run)")
    for s in summaries:
        if s.truncated is not None:
            lines.append(f"- {s.label}: context truncated to the window for {s.truncated:.0f}% of answers "
                         f"(kept {s.grounding_tokens:.0f} of {s.full_history_tokens or 0:.0f} history tokens; "
                         f"evidence turns inside the window: {_f(s.evidence_recall, 1)}%)")
    if systems_info:
        for label, info in systems_info.items():
            if info.get("prefix_cache"):
                lines.append(f"- {label}: transcript key/value cache computed once per user "
                             f"({info.get('shared_prefill_s', 0)} s, not included in the per-answer latency)")
    lines += ["", "## Judge", "", _judge_note(summaries, spec), "", "## Published anchors (not our runs)", "",
              "Reported by their authors on the backbones named; not reproduced here.", "",
              "| system | source | backbone | judge | F1 | BLEU-1 | J | provenance |", "|" + "---|" * 8]
    for a in published_anchors():
        o = a.get("overall") or {}
        lines.append(f"| {a['system']} | {a['source']} | {a['backbone']} | {a.get('judge') or '-'} | "
                     f"{_f(o.get('f1'))} | {_f(o.get('bleu1'))} | {_f(o.get('j'))} | {a['provenance']} |")
    return "\n".join(lines) + "\n"


def load_run(run_dir: str | Path) -> tuple[RunSpec | None, list[dict[str, Any]], dict[str, Any]]:
    """(spec, rows, systems info) of a run directory; ValueError if it is not one."""
    d = Path(run_dir)
    spec_path = d / SPEC_FILE
    if not d.is_dir() or not spec_path.is_file():
        raise ValueError(f"{d} is not a run directory (no {SPEC_FILE})")
    spec = RunSpec.model_validate_json(spec_path.read_text())
    info_path = d / "systems.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return spec, read_rows(d), info


def results_json(summaries: Sequence[Summary], spec: RunSpec | None, systems_info: dict[str, Any] | None = None,
                 ) -> dict[str, Any]:
    ratio = token_ratio(summaries)
    return {
        "spec": spec.model_dump() if spec else None,
        "summaries": [s.model_dump() | {"label": s.label} for s in summaries],
        "token_ratio": None if ratio is None else {
            "memory": ratio.memory_label, "memory_tokens": ratio.memory_tokens,
            "full_context_tokens": ratio.full_context_tokens, "full_history_tokens": ratio.full_history_tokens,
            "ratio": ratio.ratio, "history_ratio": ratio.history_ratio},
        "systems": systems_info or {},
        "published_anchors": published_anchors(),
    }


def write_report(out_dir: str | Path, summaries: Sequence[Summary], spec: RunSpec | None = None,
                 command: str | None = None, compare: bool = False, title: str = "LoCoMo evaluation",
                 systems_info: dict[str, Any] | None = None, plots: bool = True) -> dict[str, Path]:
    """Write report.md, results.json and (if any rows) pareto.png / categories.png into out_dir."""
    from tsubasa.eval.plots import plot_categories, plot_pareto

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": out / "report.md", "results": out / "results.json"}
    paths["report"].write_text(markdown(summaries, spec, title, command, compare, systems_info))
    paths["results"].write_text(json.dumps(results_json(summaries, spec, systems_info), indent=2))
    if plots and summaries:
        paths["pareto"] = plot_pareto(summaries, out / "pareto.png", compare=compare)
        paths["categories"] = plot_categories(summaries, out / "categories.png", compare=compare)
    return paths
