"""`tsubasa eval ...`: LoCoMo evaluation (run systems resumably, report, compare runs, plot)."""

from __future__ import annotations

import re
import shlex
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from tsubasa.commands.common import ConfigOpt, console, fail, progress, settings_or_exit, setup_logging

app = typer.Typer(no_args_is_help=True)


def _parse_ks(spec: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        fail(f"--k: {spec!r} is not a comma-separated list of integers")
    if not ks or any(k < 0 or k > 100 for k in ks):
        fail(f"--k: {spec!r}: each k must be between 0 and 100")
    return ks


def _command() -> str:
    return "tsubasa " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _log_command(run_dir: Path) -> None:
    """Append this command to the run's commands.log (the report shows how its rows were made)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "commands.log", "a") as fh:
        fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}  {_command()}\n")


def _commands(run_dir: Path) -> str | None:
    path = run_dir / "commands.log"
    return path.read_text().strip() if path.is_file() else None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:60] or "run"


def _print_summaries(summaries) -> None:
    table = Table(title="LoCoMo (x100)")
    for col in ("system", "k", "n", "F1", "F1 LoCoMo", "BLEU-1", "J", "tokens/answer", "p50 s", "p95 s", "evid. %"):
        table.add_column(col, justify="left" if col == "system" else "right")

    def f(x, d=2):
        return "-" if x is None else f"{x:.{d}f}"

    for s in summaries:
        o = s.overall
        table.add_row(s.system, "-" if s.k is None else str(s.k), str(o.n), f(o.f1), f(o.f1_locomo), f(o.bleu1),
                      f(o.j), f(s.grounding_tokens, 1), f(s.latency_p50_s), f(s.latency_p95_s),
                      f(s.evidence_recall, 1))
    # Under nohup rich falls back to 80 columns, which squeezes this table unreadably.
    (console if console.is_terminal else Console(width=160)).print(table)


@app.command()
def locomo(
    system: str = typer.Option("all", "--system", "-S",
                               help="Comma-separated names or 'all' (the built-ins); see `tsubasa eval systems`."),
    model: str | None = typer.Option(None, "--model", "-m", help="Answering LLM (default: model.name)."),
    conversations: str = typer.Option("conv-26", "--conversations", "-C",
                                      help="Sample ids, 1-based positions (1-3), a split (train, validation, "
                                           "test: Memory-R1's 1 / 2 / 3-10) or 'all'."),
    categories: str = typer.Option("1-4", "--categories", help="Category ids or names (5 is never scored)."),
    k: str = typer.Option("3", "--k", help="Retrieved items per answer; a list (1,3,10) gives one point per k."),
    limit: int | None = typer.Option(None, "--limit", "-n", min=1, help="First N questions per conversation."),
    prompt: str = typer.Option("concise", "--prompt", help="concise (answer in under 6 words) | free."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", min=1, max=4096, help="Answer length cap (tokens)."),
    context_tokens: int | None = typer.Option(None, "--context-tokens", min=256,
                                              help="Full-context window, tokens (default: model.max_context_tokens)."),
    judge: str = typer.Option("auto", "--judge",
                              help="auto (endpoint if configured, else the local engine) | local | openai | none."),
    judge_base_url: str | None = typer.Option(None, "--judge-base-url", help="OpenAI-compatible judge URL."),
    judge_model: str | None = typer.Option(None, "--judge-model", help="Judge model name at that endpoint."),
    judge_max_new_tokens: int = typer.Option(48, "--judge-max-new-tokens", min=4, max=1024,
                                             help="Reply cap for a local judge (tokens)."),
    tenant: str = typer.Option("eval", "--tenant", "-t", help="Tenant whose users hold the conversations' memory."),
    milvus: str | None = typer.Option(None, "--milvus", help="Milvus URI / Lite file (default: milvus.uri)."),
    run_dir: Path | None = typer.Option(None, "--run-dir", "-o",
                                        help="Run directory (default: <eval.runs_dir>/locomo-<model>-<convs>)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, max=256, help="Questions per generate call."),
    memory_mode: str = typer.Option("build", "--memory",
                                    help="build: ingest sessions missing from the store first (idempotent); "
                                         "turns: raw turns only (full-context, rag-turns); existing: as is."),
    data: Path | None = typer.Option(None, "--data", help="locomo10.json (default: eval.locomo_path)."),
    config: Path | None = ConfigOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Evaluate systems on LoCoMo questions; resumable (re-run the same command to continue)."""
    setup_logging(verbose)
    from tsubasa.eval.judge import make_judge
    from tsubasa.eval.locomo import LocomoNotFoundError, load_locomo, parse_categories, select_conversations
    from tsubasa.eval.report import summarize, token_ratio, write_report
    from tsubasa.eval.runner import LocomoRunner, MemoryModeError, RunSpec, RunSpecMismatchError, read_rows
    from tsubasa.eval.systems import ANSWER_SYSTEM_PROMPTS, BUILTIN_SYSTEMS, available_systems
    from tsubasa.schema import InvalidIdentifierError, validate_identifier

    settings = settings_or_exit(config, **{"model.name": model, "milvus.uri": milvus})
    try:
        validate_identifier(tenant, "--tenant")
    except InvalidIdentifierError as exc:
        fail(str(exc))
    if memory_mode not in ("build", "turns", "existing"):
        fail(f"--memory: unknown mode {memory_mode!r}; use build, turns or existing")
    if prompt not in ANSWER_SYSTEM_PROMPTS:
        fail(f"--prompt: unknown style {prompt!r}; use {', '.join(ANSWER_SYSTEM_PROMPTS)}")
    known = available_systems()
    names = list(BUILTIN_SYSTEMS) if system == "all" else [s.strip() for s in system.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        fail(f"--system: unknown {', '.join(unknown) or '(none given)'}; available: {', '.join(known)}")
    ks = _parse_ks(k)
    try:
        cats = parse_categories(categories)
    except ValueError as exc:
        fail(f"--categories: {exc}")
    if 5 in cats:
        console.print("[yellow]category 5 (adversarial) has no gold answer to score; it is skipped[/yellow]")
        cats = [c for c in cats if c != 5]
        if not cats:
            fail("--categories: nothing left to score without category 5")
    locomo_path = data or (settings.eval.locomo_path if settings.eval.locomo_path.is_file() else None)
    try:
        convs = select_conversations(load_locomo(locomo_path), conversations)
    except LocomoNotFoundError as exc:
        fail(str(exc))
    except (ValueError, FileNotFoundError) as exc:
        fail(f"--conversations: {exc}" if isinstance(exc, ValueError) else f"--data: {exc}")

    from tsubasa.llm import load_engine, writer_model
    from tsubasa.memory.runtime import MemorySystem

    base_url = judge_base_url or settings.eval.judge_base_url
    judge_name = judge_model or settings.eval.judge_model
    api_key = settings.eval.judge_api_key.get_secret_value() if settings.eval.judge_api_key else None
    console.print(f"loading model [bold]{settings.model.name}[/bold] ...")
    engine = load_engine(settings.model)
    try:
        the_judge = make_judge(judge, engine, base_url=base_url, model=judge_name, api_key=api_key,
                               max_new_tokens=judge_max_new_tokens)
    except ValueError as exc:
        fail(f"--judge: {exc}")
    # The memory is written as `tsubasa ingest` writes it (the writer's own LLM: llama.cpp where the
    # model has a GGUF), with the answering engine reused when the writer is the same model and engine.
    wcfg = writer_model(settings.model, settings.writer)
    same = (wcfg.engine, wcfg.name) == (settings.model.engine, settings.model.name)
    memory = MemorySystem(settings, engine=engine if same else None, count_tokens=engine.count_tokens)
    window = context_tokens or settings.model.max_context_tokens
    model_cfg = getattr(getattr(engine, "base_model", None), "config", None)
    model_window = getattr(model_cfg, "max_position_embeddings", None)
    if isinstance(model_window, int) and window > model_window:
        fail(f"--context-tokens: {window} exceeds the window of {settings.model.name} ({model_window} tokens)")
    spec = RunSpec(systems=names, ks=ks, conversations=[c.sample_id for c in convs], categories=cats, limit=limit,
                   model=settings.model.name, prompt_style=prompt, max_new_tokens=max_new_tokens,  # type: ignore[arg-type]
                   context_tokens=window, tenant=tenant, judge=the_judge.name if the_judge else "none",
                   memory_model=f"{wcfg.name} ({wcfg.engine})", milvus_uri=settings.milvus_uri)
    out = run_dir or settings.eval.runs_dir / f"locomo-{_slug(settings.model.name)}-{_slug(conversations)}"
    try:
        runner = LocomoRunner(spec, out, convs, memory, the_judge, engine=engine,
                              batch_size=batch_size or settings.model.batch_size)
    except RunSpecMismatchError as exc:
        fail(str(exc))
    _log_command(out)
    items = runner.work()
    done_before = len({r["key"] for r in read_rows(out)} & {it.key for it in items})
    console.print(f"run dir {out}: {len(items)} (system, k, question) rows asked; {done_before} already done "
                  f"{'(resuming: they are skipped)' if done_before else ''}; judge: {spec.judge}")
    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("answer", total=max(len(items) - done_before, 0))

        def on_progress(desc: str, done: int, total: int) -> None:
            bar.update(task, description=desc, completed=max(done - done_before, 0))

        def on_build(desc: str) -> None:
            bar.update(task, description=f"memory {desc}")

        try:
            result = runner.run(progress=on_progress, memory_mode=memory_mode,  # type: ignore[arg-type]
                                on_build=on_build)
        except MemoryModeError as exc:
            fail(f"--memory: {exc}")
    rows = [r for r in read_rows(out) if r["key"] in {it.key for it in items}]
    summaries = summarize(rows)
    info_path = out / "systems.json"
    import json

    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    paths = write_report(out, summaries, runner.spec, command=_commands(out), systems_info=info)
    _print_summaries(summaries)
    ratio = token_ratio(summaries)
    if ratio:
        console.print(f"[bold]memory vs full context[/bold]: {ratio.sentence()}")
    console.print(f"answered {result.answered}, skipped (already in rows.jsonl) {result.skipped}, "
                  f"in {time.perf_counter() - t0:.0f} s; rows: {out / 'rows.jsonl'}")
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))


@app.command()
def judge(
    run_dir: Path = typer.Argument(..., help="Run directory whose stored predictions get J."),
    judge: str = typer.Option("auto", "--judge", help="auto | local | openai (see `tsubasa eval locomo`)."),
    judge_base_url: str | None = typer.Option(None, "--judge-base-url", help="OpenAI-compatible judge URL."),
    judge_model: str | None = typer.Option(None, "--judge-model", help="Judge model name at that endpoint."),
    judge_max_new_tokens: int = typer.Option(48, "--judge-max-new-tokens", min=4, max=1024,
                                             help="Reply cap for a local judge (tokens)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Local judge model (default: the run's model)."),
    system: str | None = typer.Option(None, "--system", "-S", help="Only these systems (comma-separated)."),
    limit: int | None = typer.Option(None, "--limit", "-n", min=1, help="At most N rows per (system, k)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, max=256),
    config: Path | None = ConfigOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Add LLM-judge J to a finished (or partial) run from its stored predictions; resumable."""
    setup_logging(verbose)
    from tsubasa.eval.judge import make_judge
    from tsubasa.eval.report import load_run, summarize, write_report
    from tsubasa.eval.runner import JudgeMismatchError, judge_run, read_rows

    try:
        spec, _, info = load_run(run_dir)
    except ValueError as exc:
        fail(f"RUN_DIR: {exc}")
    if judge == "none":
        fail("--judge: 'none' judges nothing; use auto, local or openai")
    settings = settings_or_exit(config, **{"model.name": model or spec.model})
    base_url = judge_base_url or settings.eval.judge_base_url
    judge_name = judge_model or settings.eval.judge_model
    api_key = settings.eval.judge_api_key.get_secret_value() if settings.eval.judge_api_key else None
    engine = None
    if judge == "local" or (judge == "auto" and not (base_url or judge_name)):
        from tsubasa.llm import load_engine

        console.print(f"loading local judge model [bold]{settings.model.name}[/bold] ...")
        engine = load_engine(settings.model)
    try:
        the_judge = make_judge(judge, engine, base_url=base_url, model=judge_name, api_key=api_key,
                               max_new_tokens=judge_max_new_tokens)
    except ValueError as exc:
        fail(f"--judge: {exc}")
    systems = [s.strip() for s in system.split(",") if s.strip()] if system else None
    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("judge", total=None)

        def on_progress(desc: str, done: int, total: int) -> None:
            bar.update(task, description=desc, completed=done, total=total)

        try:
            judged, already = judge_run(run_dir, the_judge, systems, limit,  # type: ignore[arg-type]
                                        batch_size or settings.model.batch_size, on_progress)
        except JudgeMismatchError as exc:
            fail(f"--judge: {exc}")
    console.print(f"judged {judged} rows with {the_judge.name} in {time.perf_counter() - t0:.0f} s "
                  f"({already} already had a verdict)")
    _log_command(run_dir)
    summaries = summarize(read_rows(run_dir))
    paths = write_report(run_dir, summaries, spec, command=_commands(run_dir), systems_info=info)
    _print_summaries(summaries)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="One or more run directories."),
    out: Path | None = typer.Option(None, "--out", "-o",
                                    help="Where to write (default: the run dir, or runs/compare-<time> for several)."),
) -> None:
    """Report one run again, or compare several side by side (tables, results.json, PNG plots)."""
    setup_logging(False)
    from tsubasa.eval.report import load_run, summarize, token_ratio, write_report

    summaries, specs, infos = [], [], {}
    for d in run_dirs:
        try:
            spec, rows, info = load_run(d)
        except ValueError as exc:
            fail(f"RUN_DIR: {exc}")
        if not rows:
            fail(f"RUN_DIR: {d} has no rows yet")
        label = d.name if len(run_dirs) > 1 else ""
        summaries.extend(summarize(rows, run=label))
        specs.append(spec)
        infos.update({f"{label}:{k}" if label else k: v for k, v in info.items()})
    compare = len(run_dirs) > 1
    target = out or (run_dirs[0] if not compare else Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    command = "\n".join(filter(None, [_commands(d) for d in run_dirs] + [_command()]))
    paths = write_report(target, summaries, None if compare else specs[0], command=command, compare=compare,
                         title="LoCoMo runs compared" if compare else "LoCoMo evaluation", systems_info=infos)
    _print_summaries(summaries)
    ratio = token_ratio(summaries)
    if ratio:
        console.print(f"[bold]memory vs full context[/bold]: {ratio.sentence()}")
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))


@app.command("systems")
def list_systems() -> None:
    """List the systems `tsubasa eval locomo --system` accepts."""
    from tsubasa.eval.systems import available_systems

    table = Table(title="evaluation systems")
    table.add_column("name")
    table.add_column("top-k")
    table.add_column("what")
    for name, spec in available_systems().items():
        table.add_row(name, "yes" if spec.uses_k else "no", spec.description)
    console.print(table)
