"""Checks on what a small writer model extracts, before anything reaches the memory.

Measured failure modes of a 1.5B writer (Qwen2.5-Coder-1.5B through llama.cpp, LoCoMo conv-26):
after a few good lines it invents, it credits the other speaker's facts to the target speaker, it
writes "she"/"I" instead of the name, it repeats itself. Each check drops (and counts) or repairs:

- subject: a fact must be about the target: a leading pronoun becomes the name, a line about another
  speaker of the session is dropped (`other_speaker`), a line with no name gets it prefixed;
- provenance: a line whose cited turns are all another speaker's is dropped (`other_speakers_turns`);
- support: most of its content words must occur in the turns it cites, else the target's own turns
  (`unsupported`: invented details);
- repetition: near-duplicates of a line already kept (`repeat`), and a reply that keeps repeating
  is cut (`loop`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from tsubasa.schema import Turn

_WORD = re.compile(r"[a-z0-9']+")
_STOPWORD_TEXT = """
a an the and or but if of to in on at by for with from as into onto about over after before up down out off
is are was were be been being am has have had do does did will would can could should may might must shall
this that these those it its he she they them their his her him we our you your i me my mine who whom which
what when where why how not no so than then too very just also there here some any all each every more most
much many such own same other another s t d ll re ve m
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_FIRST_PERSON = re.compile(r"\b(i|i'm|i've|me|my|we|we're|our|us|you|your)\b", re.I)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_PRONOUN = re.compile(r"^(she|he|they|i)\b\s*", re.I)
_VERB_START = re.compile(r"^(is|was|has|had|went|goes|likes|loves|wants|plans|feels|thinks|took|made|got|"
                         r"started|joined|visited|attended|enjoys|works|worked|lives|lived)\b", re.I)


def _stem(word: str) -> str:
    return word[:5] if len(word) > 5 else word.rstrip("s")


def content_words(text: str, drop: set[str] | None = None) -> set[str]:
    """Lower-cased, crudely stemmed words that carry content (not stopwords, not `drop`)."""
    drop = drop or set()
    return {_stem(w) for w in _WORD.findall(text.lower()) if w not in STOPWORDS and w not in drop and len(w) > 1}


@dataclass
class GuardConfig:
    min_support: float = 0.5
    """Share of an observation's content words that must occur in its source turns."""
    loop_after: int = 3
    """Consecutive repeated lines after which the rest of a reply is ignored."""


class ObservationGuard:
    """Applies the checks above to one speaker's parsed lines of one session."""

    def __init__(self, turns: Sequence[Turn], speaker: str, cfg: GuardConfig | None = None) -> None:
        self.turns = {t.source_id: t for t in turns}
        self.speaker = speaker
        self.first = speaker.split()[0]
        self.others = sorted({t.speaker for t in turns if t.speaker != speaker})
        self.cfg = cfg or GuardConfig()
        self.names = {w.lower() for s in {speaker, *self.others} for w in s.split()}
        self._own_words = content_words(" ".join(t.text for t in turns if t.speaker == speaker))
        self._repeats = 0
        self.kept: list[set[str]] = []
        """Content words of every line kept so far for this speaker (all replies of the session)."""

    def new_reply(self) -> None:
        """Start checking another reply of the same session (a loop is counted per reply)."""
        self._repeats = 0

    def subject(self, text: str) -> str | None:
        """The text with the target as its subject, or None when it is about another speaker."""
        low = text.lower()
        for other in self.others:
            o = other.split()[0].lower()
            if low.startswith(o) and not low.startswith(self.first.lower()):
                return None
        if low.startswith(self.first.lower()):
            return text
        if m := _PRONOUN.match(text):
            if m.group(1).lower() == "i":
                return None  # a first-person line is a copied turn, not an observation
            return f"{self.speaker} {text[m.end():]}"
        if _VERB_START.match(text):
            return f"{self.speaker} {text[0].lower()}{text[1:]}"
        if self.first.lower() in low:
            return text
        return f"{self.speaker}: {text}"

    @staticmethod
    def third_person(text: str) -> str:
        """The first sentence, plus those after it that are not the speaker's own words copied from
        the turn ("... last Saturday. Really made me think about ...")."""
        first, *rest = _SENTENCE.split(text.strip())
        return " ".join([first, *(s for s in rest if not _FIRST_PERSON.search(s))])

    def check(self, text: str, source_ids: list[str], drop: Counter) -> str | None:
        """The repaired text, or None (and `drop[reason] += 1`)."""
        if re.match(rf"\s*({'|'.join(re.escape(s) for s in [self.speaker, *self.others])})\s*:", text, re.I):
            drop["copied_turn"] += 1
            return None
        fixed = self.subject(text)
        if fixed is None:
            drop["other_speaker"] += 1
            return None
        fixed = self.third_person(fixed)
        cited = [self.turns[i] for i in source_ids if i in self.turns]
        if cited and all(t.speaker != self.speaker for t in cited):
            drop["other_speakers_turns"] += 1
            return None
        words = content_words(fixed, self.names)
        if words:
            pool = content_words(" ".join(t.text for t in cited)) | self._own_words if cited else self._own_words
            if len(words & pool) / len(words) < self.cfg.min_support:
                drop["unsupported"] += 1
                return None
        return fixed

    def repeated(self, key_words: set[str], kept: list[set[str]], drop: Counter) -> bool:
        """True (counted) when the line repeats a kept one (Jaccard >= 0.8 of content words)."""
        for k in kept:
            union = key_words | k
            if union and len(key_words & k) / len(union) >= 0.8:
                drop["repeat"] += 1
                self._repeats += 1
                return True
        self._repeats = 0
        return False

    @property
    def looping(self) -> bool:
        return self._repeats >= self.cfg.loop_after
