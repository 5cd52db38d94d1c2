"""`tsubasa demo`: the main job on embedded defaults (local Milvus Lite, small CPU model)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from tsubasa.commands.common import ConfigOpt, console, fail, progress, settings_or_exit, setup_logging


def demo(
    conversation: str = typer.Option("conv-26", "--conversation", "-C", help="LoCoMo sample id."),
    sessions: int = typer.Option(3, "--sessions", "-s", min=1, help="How many first sessions to ingest."),
    questions: int = typer.Option(5, "--questions", "-q", min=1, help="How many questions to ask."),
    tenant: str = typer.Option("demo", "--tenant", "-t"),
    config: Path | None = ConfigOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Ingest the first sessions of a LoCoMo conversation into an evolving memory, then answer
    LoCoMo questions about them by retrieving the top-k memories."""
    setup_logging(verbose)
    from tsubasa.eval.locomo import LocomoNotFoundError, get_conversation, session_events
    from tsubasa.memory.runtime import MemorySystem

    settings = settings_or_exit(config)
    try:
        conv = get_conversation(conversation)
    except (LocomoNotFoundError, KeyError) as exc:
        fail(str(exc))
    system = MemorySystem(settings)
    user = conv.sample_id
    picked = conv.sessions[:sessions]
    console.print(f"[bold]TSUBASA demo[/bold]: {conv.sample_id}, sessions 1-{len(picked)}, model "
                  f"{settings.model.name}, Milvus {settings.milvus_uri}")
    with progress() as bar:
        task = bar.add_task("ingest", total=len(picked))
        for sess in picked:
            bar.update(task, description=f"ingest {sess.session_id}")
            system.writer.ingest(session_events(conv, sess, tenant, user))
            bar.advance(task)
    dias = {t.dia_id for s in picked for t in s.turns}
    qa = [q for q in conv.qa if q.scored and q.evidence and set(q.evidence) <= dias][:questions]
    table = Table(title=f"top-{settings.memory.top_k} memories for LoCoMo questions")
    for col in ("question", "gold", "grounding", "tokens", "evidence hit"):
        table.add_column(col)
    for q in qa:
        g = system.retriever.retrieve(tenant, user, q.question, k=settings.memory.top_k)
        hit = "yes" if set(q.evidence) <= g.source_ids else "no"
        table.add_row(q.question, str(q.answer), g.text, str(g.tokens), hit)
    console.print(table)
    counts = system.store.counts(tenant).get((tenant, user), {})
    console.print(f"stored for {tenant}/{user}: {counts}")
