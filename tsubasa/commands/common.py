"""Shared CLI plumbing: settings from --config/env with clear errors, logging, progress bars."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tsubasa.config import ConfigError, Settings, load_settings

console = Console()
err_console = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML settings file (env TSUBASA_CONFIG).",
                         exists=False, dir_okay=False)


def settings_or_exit(config: Path | None = None, **overrides: Any) -> Settings:
    """Load settings; on a bad value print the field and exit 2 (no traceback)."""
    try:
        s = load_settings(config)
        if overrides:
            data = s.model_dump()
            for dotted, value in overrides.items():
                if value is None:
                    continue
                section, _, key = dotted.partition(".")
                if key:
                    data[section][key] = value
                else:
                    data[section] = value
            s = load_settings(config, **{k: data[k] for k in {d.partition(".")[0] for d in overrides}})
        return s
    except ConfigError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "sentence_transformers", "pymilvus", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)
