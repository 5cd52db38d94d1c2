"""`tsubasa ...`: the command line. Sub-command groups live in `tsubasa/commands/` and import their
heavy dependencies (torch, Ray, services) inside the commands that need them."""

from __future__ import annotations

import typer

from tsubasa.commands import adapters, demo, distill, evaluate, events, ingest, memory, serve

app = typer.Typer(
    name="tsubasa", no_args_is_help=True, add_completion=False,
    help="TSUBASA: evolving per-user memory and self-learned LoRA adapters for LLMs.",
)
app.add_typer(ingest.app, name="ingest", help="Feed events into the memory (LoCoMo, Kafka, backfill).")
app.add_typer(memory.app, name="memory", help="Inspect a user's memory: search, history, counts.")
app.add_typer(evaluate.app, name="eval", help="LoCoMo evaluation: run systems, report, plot.")
app.add_typer(distill.app, name="distill", help="Self-learning: distil users' histories into LoRA adapters.")
app.add_typer(adapters.app, name="adapters", help="Per-user adapter registry.")
app.add_typer(events.app, name="events", help="Produce event streams (LoCoMo replay).")
app.command("demo")(demo.demo)
app.command("serve")(serve.serve)


def main() -> None:
    from tsubasa.llm.base import EngineCapabilityError
    from tsubasa.llm.gguf_parts import ModelHashError, ModelPartsMissingError
    from tsubasa.llm.models import ModelNotFoundError
    from tsubasa.memory.milvus import StoreLockedError

    try:
        app()
    except (StoreLockedError, ModelHashError, ModelPartsMissingError, ModelNotFoundError,
            EngineCapabilityError) as exc:  # expected operational errors: a message, not a traceback
        from tsubasa.commands.common import err_console

        err_console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
