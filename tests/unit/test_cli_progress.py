"""The CLI's progress bar writes plain lines when there is no terminal (nohup, CI logs)."""

from __future__ import annotations

import io

from rich.console import Console

from tsubasa.commands.common import LoggedProgress


def _progress(terminal: bool, every: float) -> tuple[LoggedProgress, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=100)
    return LoggedProgress(console=console, every=every), out


def test_without_a_terminal_each_new_description_is_logged_and_repeats_are_rate_limited():
    bar, out = _progress(terminal=False, every=3600)
    with bar:
        task = bar.add_task("teacher", total=250)
        bar.update(task, completed=1)
        for i in range(2, 50):
            bar.update(task, completed=i)  # same description within `every`: no new line
        bar.update(task, description="train", completed=3, total=40)
        bar.advance(task)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    logged = [ln for ln in lines if ": " in ln and ln[:2].isdigit()]
    assert len(logged) == 2, lines
    assert "teacher: 1/250" in logged[0]
    assert "train: 3/40" in logged[1]


def test_every_zero_logs_each_update_with_rate():
    bar, out = _progress(terminal=False, every=0)
    with bar:
        task = bar.add_task("answer", total=None)
        bar.update(task, completed=2)
        bar.advance(task, 2)
    logged = [ln for ln in out.getvalue().splitlines() if "answer: " in ln]
    assert [ln.split("answer: ")[1].split(",")[0] for ln in logged] == ["2", "4"]
    assert all("s each" in ln for ln in logged)


def test_on_a_terminal_no_plain_lines_are_printed():
    bar, out = _progress(terminal=True, every=0)
    with bar:
        task = bar.add_task("answer", total=10)
        bar.update(task, completed=5)
    assert "answer: 5/10" not in out.getvalue()
