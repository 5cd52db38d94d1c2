"""`tsubasa memory ...`: search a user's memory, show a memory's history, counts per user."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from tsubasa.commands.common import ConfigOpt, console, fail, settings_or_exit, setup_logging
from tsubasa.schema import InvalidIdentifierError

app = typer.Typer(no_args_is_help=True)

TenantOpt = typer.Option("demo", "--tenant", "-t", help="Tenant id.")
UserOpt = typer.Option(..., "--user", "-u", help="User id.")


def _system(config: Path | None):
    from tsubasa.memory.runtime import MemorySystem

    return MemorySystem(settings_or_exit(config))


@app.command()
def search(query: str = typer.Argument(..., help="What to look for."), tenant: str = TenantOpt,
           user: str = UserOpt, k: int = typer.Option(3, "-k", min=1, max=100, help="How many items."),
           source: str = typer.Option("memories", help="memories | observations | turns"),
           config: Path | None = ConfigOpt) -> None:
    """Top-k of a user's memories (or observations / raw turns) for a query, with token count."""
    setup_logging()
    if source not in ("memories", "observations", "turns"):
        fail(f"--source must be memories, observations or turns (got {source!r})")
    try:
        g = _system(config).retriever.retrieve(tenant, user, query, k=k, source=source)  # type: ignore[arg-type]
    except InvalidIdentifierError as exc:
        fail(str(exc))
    table = Table(title=f"{source} for {tenant}/{user}: {g.tokens} tokens")
    for col in ("score", "id", "text", "sources"):
        table.add_column(col)
    for it in g.items:
        table.add_row(f"{it.score:.3f}", it.id[:12], it.text, ",".join(it.source_ids))
    console.print(table)


@app.command()
def history(memory_id: str = typer.Argument(..., help="Memory id (see `memory list`)."), tenant: str = TenantOpt,
            user: str = UserOpt, config: Path | None = ConfigOpt) -> None:
    """Every version of one memory, oldest first."""
    setup_logging()
    try:
        versions = _system(config).store.memory_history(tenant, user, memory_id)
    except InvalidIdentifierError as exc:
        fail(str(exc))
    if not versions:
        fail(f"no memory {memory_id!r} for {tenant}/{user}", code=1)
    table = Table(title=f"history of {memory_id}")
    for col in ("version", "op", "at", "observation", "text"):
        table.add_column(col)
    for v in versions:
        table.add_row(str(v.version), v.op.value, v.at.isoformat(timespec="seconds"), v.observation_id[:12], v.text)
    console.print(table)


@app.command("list")
def list_(tenant: str = TenantOpt, user: str = UserOpt, config: Path | None = ConfigOpt) -> None:
    """A user's current memories."""
    setup_logging()
    try:
        mems = _system(config).store.list_memories(tenant, user)
    except InvalidIdentifierError as exc:
        fail(str(exc))
    table = Table(title=f"{len(mems)} memories of {tenant}/{user}")
    for col in ("id", "v", "op", "date", "text", "sources"):
        table.add_column(col)
    for m in mems:
        table.add_row(m.memory_id, str(m.version), m.last_op.value, str(m.event_date or ""), m.text,
                      ",".join(m.source_ids))
    console.print(table)


def print_counts(counts: dict, title: str = "counts per user") -> None:
    table = Table(title=title)
    for col in ("tenant", "user", "turns", "observations", "memories", "versions"):
        table.add_column(col)
    for (t, u), c in sorted(counts.items()):
        table.add_row(t, u, str(c["turns"]), str(c["observations"]), str(c["memories"]), str(c["history"]))
    if not counts:
        table.add_row("-", "-", "0", "0", "0", "0")
    console.print(table)


@app.command()
def stats(tenant: str | None = typer.Option(None, "--tenant", "-t", help="Only this tenant."),
          config: Path | None = ConfigOpt) -> None:
    """Turns, observations, memories and memory versions per (tenant, user)."""
    setup_logging()
    try:
        counts = _system(config).store.counts(tenant)
    except InvalidIdentifierError as exc:
        fail(str(exc))
    print_counts(counts)
