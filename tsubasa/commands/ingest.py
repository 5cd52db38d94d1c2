"""`tsubasa ingest ...`: feed events into the memory (LoCoMo conversations; Kafka in `run`/`backfill`)."""

from __future__ import annotations

from pathlib import Path

import typer

from tsubasa.commands.common import ConfigOpt, console, fail, progress, settings_or_exit, setup_logging

app = typer.Typer(no_args_is_help=True)


@app.command()
def locomo(
    conversation: str = typer.Option("conv-26", "--conversation", "-C", help="LoCoMo sample id, or 'all'."),
    sessions: str = typer.Option("all", "--sessions", "-s", help="Session range, e.g. 1-3 or 1,4 or all."),
    tenant: str = typer.Option("demo", "--tenant", "-t", help="Tenant to ingest as."),
    user: str | None = typer.Option(None, "--user", "-u", help="User id (default: the conversation id)."),
    mode: str | None = typer.Option(None, help="evolving | static (default: memory.mode)."),
    model: str | None = typer.Option(None, "--model", "-m", help="LLM (default: model.name)."),
    data: Path | None = typer.Option(None, help="locomo10.json (default: ../shared/data/)."),
    config: Path | None = ConfigOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Ingest LoCoMo sessions as a tenant's user: raw turns, observations, evolved memory.

    Re-running is a no-op: turns are keyed by event id and processed sessions are skipped."""
    setup_logging(verbose)
    from tsubasa.commands.memory import print_counts
    from tsubasa.eval.locomo import LocomoNotFoundError, load_locomo, parse_range, session_events
    from tsubasa.memory.runtime import MemorySystem
    from tsubasa.schema import InvalidIdentifierError, validate_identifier

    settings = settings_or_exit(config, **{"memory.mode": mode, "model.name": model})
    try:
        validate_identifier(tenant, "--tenant")
        if user:
            validate_identifier(user, "--user")
        convs = load_locomo(data)
    except (InvalidIdentifierError, LocomoNotFoundError) as exc:
        fail(str(exc))
    if conversation != "all":
        convs = [c for c in convs if c.sample_id == conversation]
        if not convs:
            fail(f"--conversation: no LoCoMo conversation {conversation!r}")
    system = MemorySystem(settings)
    scope = [(c, user or c.sample_id) for c in convs]
    before = {k: v for k, v in system.store.counts(tenant).items() if k[1] in {u for _, u in scope}}
    print_counts(before, "before")
    jobs = []
    for conv, uid in scope:
        try:
            picked = parse_range(sessions, [s.index for s in conv.sessions])
        except ValueError as exc:
            fail(f"--sessions: {exc}")
        jobs.extend((conv, conv.session(i), uid) for i in picked)
    totals = {"new_turns": 0, "observations": 0, "skipped": 0}
    with progress() as bar:
        task = bar.add_task("sessions", total=len(jobs))
        for conv, sess, uid in jobs:
            bar.update(task, description=f"{conv.sample_id} {sess.session_id}")
            appended, results = system.writer.ingest(session_events(conv, sess, tenant, uid))
            totals["new_turns"] += appended.new_turns
            for r in results:
                totals["observations"] += r.observations if not r.skipped else 0
                totals["skipped"] += int(r.skipped)
            bar.advance(task)
    after = {k: v for k, v in system.store.counts(tenant).items() if k[1] in {u for _, u in scope}}
    print_counts(after, "after")
    stats = system.writer.manager.stats
    console.print(f"new turns {totals['new_turns']}, sessions skipped (already processed) {totals['skipped']}, "
                  f"new observations {totals['observations']}, ops {dict(stats.ops)}, "
                  f"LLM decisions {stats.llm_calls}, fallbacks {stats.fallbacks}")
