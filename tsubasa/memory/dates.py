"""Dates in memories: relative phrases resolved against the session date, human-readable rendering.

A writer model keeps "yesterday" or "last week" as the speaker said it; a memory read months later
needs the absolute date. `resolve_relative` rewrites the phrase in the text, the way LoCoMo's own
annotations and gold answers phrase it ("the week before 9 June 2023", "in 2022"), and gives the
event date it implies (approximate for weeks, months and years).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date, timedelta

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # not strftime("%B"): that follows the process locale
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
            "eight": 8, "nine": 9, "ten": 10, "a few": 3, "a couple of": 2, "couple of": 2}
_UNIT_DAYS = {"day": 1, "week": 7, "month": 30, "year": 365}


def human_date(d: date) -> str:
    """`7 May 2023`: how LoCoMo's sessions and gold answers write dates."""
    return f"{d.day} {MONTHS[d.month - 1]} {d.year}"


def _month_shift(d: date, months: int) -> date:
    m = d.month - 1 + months
    return date(d.year + m // 12, m % 12 + 1, 1)


Rule = tuple[str, Callable[[re.Match, date], tuple[str, date]]]


def _weekday_before(m: re.Match, r: date) -> tuple[str, date]:
    wd = WEEKDAYS.index(m.group(1).lower())
    back = (r.weekday() - wd) % 7 or 7
    return f"the {m.group(1).capitalize()} before {human_date(r)}", r - timedelta(days=back)


def _ago(m: re.Match, r: date) -> tuple[str, date]:
    raw, unit = m.group(1).lower(), m.group(2).lower()
    n = int(raw) if raw.isdigit() else _NUMBERS.get(raw, 1)
    return f"{m.group(1)} {m.group(2)} before {human_date(r)}", r - timedelta(days=n * _UNIT_DAYS[unit.rstrip("s")])


def _in_month(months: int) -> Callable[[re.Match, date], tuple[str, date]]:
    def rule(m: re.Match, r: date) -> tuple[str, date]:
        d = _month_shift(r, months)
        return f"in {MONTHS[d.month - 1]} {d.year}", d

    return rule


_RULES: list[Rule] = [
    (r"the day before yesterday", lambda m, r: (f"on {human_date(r - timedelta(days=2))}", r - timedelta(days=2))),
    (r"(?:yesterday|last night)", lambda m, r: (f"on {human_date(r - timedelta(days=1))}", r - timedelta(days=1))),
    (r"(?:today|tonight|this (?:morning|afternoon|evening))",
     lambda m, r: (f"on {human_date(r)}", r)),
    (r"tomorrow", lambda m, r: (f"on {human_date(r + timedelta(days=1))}", r + timedelta(days=1))),
    (r"last weekend", lambda m, r: (f"the weekend before {human_date(r)}",
                                    r - timedelta(days=(r.weekday() - 5) % 7 or 7))),
    (r"(?:this|next) weekend", lambda m, r: (f"the weekend after {human_date(r)}",
                                             r + timedelta(days=(5 - r.weekday()) % 7 or 7))),
    (r"last week", lambda m, r: (f"the week before {human_date(r)}", r - timedelta(days=7))),
    (r"next week", lambda m, r: (f"the week after {human_date(r)}", r + timedelta(days=7))),
    (r"this week", lambda m, r: (f"the week of {human_date(r)}", r)),
    (r"last month", _in_month(-1)),
    (r"next month", _in_month(1)),
    (r"last year", lambda m, r: (f"in {r.year - 1}", date(r.year - 1, 1, 1))),
    (r"next year", lambda m, r: (f"in {r.year + 1}", date(r.year + 1, 1, 1))),
    (r"last (monday|tuesday|wednesday|thursday|friday|saturday|sunday)", _weekday_before),
    (rf"(\d+|{'|'.join(sorted(_NUMBERS, key=len, reverse=True))}) (days?|weeks?|months?|years?) ago", _ago),
]
_COMPILED = [(re.compile(rf"\b{p}\b", re.I), fn) for p, fn in _RULES]


def resolve_relative(text: str, report: date | None) -> tuple[str, date | None]:
    """Rewrite the first relative date phrase of `text` against `report` (the session date); return
    the new text and the event date it implies (None when the text has no such phrase)."""
    if report is None:
        return text, None
    for rx, fn in _COMPILED:
        m = rx.search(text)
        if m:
            phrase, when = fn(m, report)
            start = m.start()
            # "went to a group yesterday" -> "went to a group on 7 May 2023"; keep a sentence-initial capital
            if start == 0:
                phrase = phrase[0].upper() + phrase[1:]
            return text[:start] + phrase + text[m.end():], when
    return text, None
