"""`tsubasa eval ...`: LoCoMo evaluation (filled in by the evaluation harness)."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)
