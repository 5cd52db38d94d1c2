"""The LoCoMo runner end to end on real Milvus Lite, the real embedder and tiny-qwen3: every built-in
system answers, rows are scored and judged, a killed run resumes without recomputing, the report and
plots are written, and the CLI reports and names bad options."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from scripted import ScriptedEngine
from typer.testing import CliRunner

from tsubasa.eval.judge import EngineJudge
from tsubasa.eval.locomo import get_conversation
from tsubasa.eval.report import load_run, summarize, token_ratio, write_report
from tsubasa.eval.runner import (
    ROWS_FILE,
    LocomoRunner,
    MemoryModeError,
    RunSpec,
    RunSpecMismatchError,
    ensure_memory,
    read_rows,
)
from tsubasa.eval.systems import BUILTIN_SYSTEMS
from tsubasa.memory.retrieve import Retriever
from tsubasa.memory.writer import MemoryWriter

pytestmark = pytest.mark.integration

EXTRACTED = ("- [2023-05-07] Caroline went to an LGBTQ support group. (turns: D1:3)\n"
             "- [2023-05-08] Caroline wants to work in counseling and mental health. (turns: D1:9, D1:11)\n"
             "- [2022-05-08] Melanie painted a lake sunrise. (turns: D1:14)")


def _model_reply(messages) -> str:
    # The scripted *model* for memory writing: an extraction reply for extraction prompts, ADD otherwise.
    text = messages[-1].content
    return EXTRACTED if "Caroline:" in text and "List " in text else "ADD"


@dataclass
class Backend:
    store: object
    retriever: Retriever
    writer: MemoryWriter


@pytest.fixture()
def conv(locomo_path):
    full = get_conversation("conv-26", locomo_path)
    first = full.sessions[0]
    qa = [q for q in full.qa if q.evidence and all(e.startswith("D1:") for e in q.evidence)]
    return full.model_copy(update={"sessions": [first], "qa": qa})


@pytest.fixture()
def backend(store, embedder, tiny_engine, settings):
    writer = MemoryWriter(store, embedder, ScriptedEngine(_model_reply, real=tiny_engine), settings.memory)
    return Backend(store, Retriever(store, embedder, tiny_engine.count_tokens), writer)


def _spec(**kw) -> RunSpec:
    base = dict(systems=list(BUILTIN_SYSTEMS), ks=[3], conversations=["conv-26"], categories=[1, 2, 3, 4], limit=3,
                model="tiny-qwen3", max_new_tokens=8, context_tokens=300, tenant="t1", judge="local:tiny-qwen3")
    return RunSpec(**(base | kw))


def test_runner_answers_every_system_and_resumes(tmp_path, conv, backend, tiny_engine):
    built = ensure_memory(backend, conv, "t1", "conv-26")
    assert built == {"sessions_done_before": 0, "sessions_built": 1}
    assert ensure_memory(backend, conv, "t1", "conv-26")["sessions_built"] == 0  # idempotent
    assert backend.store.counts("t1")[("t1", "conv-26")]["memories"] >= 1

    run_dir = tmp_path / "run"
    judge = EngineJudge(tiny_engine, max_new_tokens=8)
    runner = LocomoRunner(_spec(), run_dir, [conv], backend, judge, engine=tiny_engine, batch_size=2)
    first = runner.run()
    assert (first.total, first.skipped, first.answered) == (15, 0, 15)
    rows = read_rows(run_dir)
    assert len(rows) == 15 and len({r["key"] for r in rows}) == 15
    assert {r["system"] for r in rows} == set(BUILTIN_SYSTEMS)
    assert {r["qa_id"] for r in rows} == {"conv-26.q000", "conv-26.q001", "conv-26.q002"}
    for r in rows:
        assert 0 <= r["f1"] <= 1 and 0 <= r["bleu1"] <= 1 and 0 <= r["f1_locomo"] <= 1
        assert r["judge"] == "local:tiny-qwen3" and r["latency_s"] >= 0 and r["prompt_tokens"] > 0
        assert r["k"] == (None if r["system"] == "full-context" else 3)
    evolving = [r for r in rows if r["system"] == "memory-evolving"]
    assert all(r["grounding_tokens"] > 0 for r in evolving)
    assert any(r["evidence_recall"] for r in evolving)  # provenance D1:3 reaches the LoCoMo evidence ids
    # memories reach the answerer dated as people (and LoCoMo's gold answers) write dates
    assert any("[7 May 2023] Caroline went to an LGBTQ support group" in r["grounding"] for r in evolving)
    assert not any("[2023-" in r["grounding"] for r in rows)
    full = [r for r in rows if r["system"] == "full-context"]
    assert all(r["extra"]["truncated"] and r["extra"]["turns_kept"] < r["extra"]["turns_total"] for r in full)
    assert all(r["grounding_tokens"] <= 300 for r in full)
    static = {r["qa_id"]: r["grounding"] for r in rows if r["system"] == "memory-static"}
    assert static == {r["qa_id"]: r["grounding"] for r in rows if r["system"] == "rag-observations"}
    facts = json.loads((run_dir / "systems.json").read_text())  # static vs evolving: same prompt, other store
    assert facts["memory-static@k=3"]["label"] == facts["memory-evolving@k=3"]["label"] == "Memories"
    assert facts["rag-observations@k=3"]["label"] == "Observations"

    # Kill simulation: keep 6 rows and a torn seventh line, as a run killed mid-write leaves them.
    path = run_dir / ROWS_FILE
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:6]) + lines[6][:25])
    kept = {r["key"]: r["at"] for r in read_rows(run_dir)}
    assert len(kept) == 6
    second = LocomoRunner(_spec(), run_dir, [conv], backend, judge, engine=tiny_engine, batch_size=2).run()
    assert (second.skipped, second.answered) == (6, 9)
    rows = read_rows(run_dir)
    assert len(rows) == 15 and len({r["key"] for r in rows}) == 15
    assert all(r["at"] == kept[r["key"]] for r in rows if r["key"] in kept)  # not recomputed
    third = LocomoRunner(_spec(), run_dir, [conv], backend, judge, engine=tiny_engine).run()
    assert (third.skipped, third.answered) == (15, 0)

    with pytest.raises(RunSpecMismatchError, match="max_new_tokens"):
        LocomoRunner(_spec(max_new_tokens=9), run_dir, [conv], backend, judge, engine=tiny_engine)

    spec, rows, info = load_run(run_dir)
    summaries = summarize(rows)
    assert [s.system for s in summaries] == list(BUILTIN_SYSTEMS)
    assert all(s.overall.n == 3 and s.overall.j is not None for s in summaries)
    ratio = token_ratio(summaries)
    assert ratio is not None and ratio.ratio > 1
    assert info["full-context"]["prefix_cache"] is True
    paths = write_report(run_dir, summaries, spec, command="tsubasa eval locomo ...", systems_info=info)
    report = paths["report"].read_text()
    assert "memory-evolving" in report and "Published anchors" in report and "ratio" in report
    assert "judged its own answers" in report
    assert paths["pareto"].stat().st_size > 10_000 and paths["categories"].stat().st_size > 10_000
    assert json.loads(paths["results"].read_text())["token_ratio"]["ratio"] == pytest.approx(ratio.ratio)

    from tsubasa.cli import app

    res = CliRunner().invoke(app, ["eval", "report", str(run_dir), "--out", str(tmp_path / "again")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "again" / "pareto.png").is_file()
    res = CliRunner().invoke(app, ["eval", "report", str(run_dir), str(run_dir), "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    assert "| run |" in (tmp_path / "cmp" / "report.md").read_text()


@pytest.mark.parametrize(("args", "named"), [
    (["--system", "nope"], "--system"),
    (["--categories", "9"], "--categories"),
    (["--categories", "5"], "--categories"),
    (["--conversations", "conv-99"], "--conversations"),
    (["--k", "x"], "--k"),
    (["--prompt", "long"], "--prompt"),
    (["--tenant", "a b"], "--tenant"),
])
def test_cli_names_the_bad_option(args, named, locomo_path, monkeypatch):
    from tsubasa.cli import app

    monkeypatch.setenv("TSUBASA_LOCOMO", str(locomo_path))
    res = CliRunner().invoke(app, ["eval", "locomo", *args])
    assert res.exit_code == 2
    assert named in res.output


def test_cli_report_rejects_a_directory_that_is_not_a_run(tmp_path):
    from tsubasa.cli import app

    res = CliRunner().invoke(app, ["eval", "report", str(tmp_path)])
    assert res.exit_code == 2 and "not a run directory" in res.output


def test_turns_mode_stores_raw_turns_only_and_refuses_memory_systems(tmp_path, conv, backend, tiny_engine):
    stats = ensure_memory(backend, conv, "t2", "conv-26", mode="turns")
    assert stats["sessions_built"] == 1
    counts = backend.store.counts("t2")[("t2", "conv-26")]
    assert counts["turns"] == len(conv.sessions[0].turns) and counts["observations"] == 0
    assert ensure_memory(backend, conv, "t2", "conv-26", mode="turns")["sessions_built"] == 0
    runner = LocomoRunner(_spec(systems=["rag-turns", "memory-evolving"], tenant="t2"), tmp_path / "r", [conv],
                          backend, None, engine=tiny_engine)
    with pytest.raises(MemoryModeError, match="memory-evolving"):
        runner.run(memory_mode="turns")


def test_adapter_systems_route_through_the_engine_adapters(tmp_path, tiny_cfg, store, embedder):
    """The distillation hook: a registered system serving a per-user LoRA adapter, with and without grounding."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tsubasa.eval.systems import Question, RetrievalSystem, SystemContext, build_system, register_system
    from tsubasa.llm import load_engine
    from tsubasa.llm.models import resolve_model

    engine = load_engine(tiny_cfg, shared=False)  # its own copy: loading an adapter changes the engine
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-qwen3", tiny_cfg.cache_dir))
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "lora")
    engine.load_adapter("t1/conv-26/v0001", str(tmp_path / "lora"))
    seen = []

    def adapter_for(tenant: str, user: str) -> str:
        seen.append((tenant, user))
        return f"{tenant}/{user}/v0001"

    register_system("test-adapter-only", lambda ctx: RetrievalSystem(ctx, "test-adapter-only", "memories", k=0,
                                                                     adapter=ctx.adapter_for),
                    uses_k=False, replace=True)
    ctx = SystemContext(engine=engine, store=store, retriever=Retriever(store, embedder, engine.count_tokens),
                        max_new_tokens=4, adapter_for=adapter_for)
    (ans,) = build_system("test-adapter-only", ctx).answer([Question(tenant_id="t1", user_id="conv-26",
                                                                     question="Where is Caroline from?")])
    assert ans.adapter == "t1/conv-26/v0001" and ans.grounding == "" and ans.grounding_tokens == 0
    assert seen == [("t1", "conv-26")]
    grounded = RetrievalSystem(ctx, "adapter+memory", "memories", k=3, adapter=adapter_for)
    (ans,) = grounded.answer([Question(tenant_id="t1", user_id="conv-26", question="Where is Caroline from?")])
    assert ans.adapter == "t1/conv-26/v0001"
