"""Shared CLI plumbing: settings from --config/env with clear errors, logging, progress bars."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

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


class LoggedProgress(Progress):
    """A progress bar that, without a terminal (nohup, CI logs, `| tee`), prints a plain line per task
    when its description changes and at most every `every` seconds otherwise: a bar there is drawn
    only once, at the end, and a long run's log would say nothing until then."""

    def __init__(self, *columns: Any, every: float = 30.0, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self.every = every
        self._logged: dict[TaskID, tuple[float, str]] = {}
        # task -> (description, time, completed) its rate is measured from: a task that cycles through
        # stages (train steps 1..25, epoch, train steps 1..25 again) times each stage on its own
        self._base: dict[TaskID, tuple[str, float, float]] = {}

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id: TaskID) -> None:
        if self.console.is_terminal:
            return
        task = self._tasks[task_id]
        now = self.get_time()
        base = self._base.get(task_id)
        # timed from the first update seen of each stage (callers often create a task once its first
        # item is done, so the task's own start says nothing about the rate)
        if base is None or base[0] != task.description or task.completed < base[2]:
            base = self._base[task_id] = (task.description, now, task.completed)
        at, desc = self._logged.get(task_id, (-float("inf"), ""))
        if desc == task.description and now - at < self.every:
            return
        self._logged[task_id] = (now, task.description)
        total = f"/{task.total:.0f}" if task.total is not None else ""
        line = f"{time.strftime('%H:%M:%S')} {task.description}: {task.completed:.0f}{total}"
        done = task.completed - base[2]
        if done > 0 and now > base[1]:
            each = (now - base[1]) / done
            line += f", {each:.1f} s each"
            if task.total is not None and task.total > task.completed:
                line += f", eta {each * (task.total - task.completed) / 60:.0f} min"
        self.console.print(line, highlight=False, markup=False)


def progress() -> LoggedProgress:
    return LoggedProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)
