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
    assert "s each" not in logged[0] and "s each" in logged[1]  # a rate needs two updates of the stage


def test_on_a_terminal_no_plain_lines_are_printed():
    bar, out = _progress(terminal=True, every=0)
    with bar:
        task = bar.add_task("answer", total=10)
        bar.update(task, completed=5)
    assert "answer: 5/10" not in out.getvalue()


def test_a_task_cycling_through_stages_times_each_stage_on_its_own():
    """`tsubasa distill` drives one task through `train` 1..25, `epoch`, `train` 1..25 again: the
    second epoch's steps are timed from that stage's first update, not from the task's start (which
    made 30 s steps read as 1,000 s each)."""
    clock = [0.0]
    out = io.StringIO()
    bar = LoggedProgress(console=Console(file=out, force_terminal=False, width=100), every=0,
                         get_time=lambda: clock[0])
    with bar:
        task = bar.add_task("u train", total=4)
        bar.update(task, completed=0)
        for step in range(1, 5):
            clock[0] += 30
            bar.update(task, completed=step)
        clock[0] += 5
        bar.update(task, description="u epoch", completed=1, total=3)
        for step in range(1, 3):
            clock[0] += 30
            bar.update(task, description="u train", completed=step, total=4)
    lines = [ln for ln in out.getvalue().splitlines() if ln[:2].isdigit()]  # the logged lines, not the bar
    assert "u train: 4/4, 30.0 s each" in lines[4]
    assert "u train: 1/4, 30.0 s each, eta 2 min" in lines[1]
    assert lines[-1].endswith("u train: 2/4, 30.0 s each, eta 1 min"), lines  # 2nd epoch, from step 1
