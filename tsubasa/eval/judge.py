"""LLM-as-a-judge J: the generous CORRECT/WRONG judge of Mem0 and Memory-R1.

The judge is an OpenAI-compatible endpoint (`OpenAIJudge`, via the `openai` client) or a local
`Engine` (`EngineJudge`). Every verdict carries the judge's name, so a J score always says which
model produced it. The parser accepts the JSON the prompt asks for and the usual deviations (plain
text, code fences, lowercase, trailing prose); a reply with no usable label is `label=None`
(counted as WRONG in J and reported as unparsed).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from typing import Literal, Protocol

from pydantic import BaseModel

from tsubasa.llm.base import Engine, SamplingParams, msgs

Label = Literal["CORRECT", "WRONG"]

# Same grading rules as the Mem0 / Memory-R1 judge (generous on topic and on date format), in our words.
JUDGE_PROMPT = """Label a generated answer to a question as CORRECT or WRONG.
You get (1) a question one person asked about another person's past conversations, (2) the gold
(ground-truth) answer, usually short, and (3) a generated answer.

Be generous. If the generated answer is about the same thing as the gold answer, it is CORRECT,
even when it is longer or worded differently. Example: question "What did I buy the last time I
was in Hawaii?", gold answer "A shell necklace": any answer naming that necklace is CORRECT.
For questions about time, the gold answer is a date, month or year. If the generated answer points
to the same date or period, it is CORRECT, whatever its format ("May 7th" and "7 May" are the same)
and even if it uses relative terms ("last Tuesday") that resolve to it.
Give one short sentence of reasoning, then the label. Never write both labels.
Return the label as JSON with the key "label", for example {{"label": "CORRECT"}}.

Question: {question}
Gold answer: {gold}
Generated answer: {prediction}
Reasoning and label:"""
# The item comes last so that every judge prompt shares the instructions as a token prefix
# (a local judge computes their key/value cache once).

_JSON_OBJ = re.compile(r"\{[^{}]*\}", re.S)
_LABEL_KEY = re.compile(r"""["']?label["']?\s*[:=]\s*["']?\s*(correct|wrong|incorrect)\b""", re.I)
_WORD = re.compile(r"\b(CORRECT|WRONG|INCORRECT)\b")
_WORD_ANY = re.compile(r"\b(correct|wrong|incorrect)\b", re.I)
_NEGATED = re.compile(r"(?:\bnot|n't)\s+correct\b", re.I)  # "is not correct" is a WRONG


class Verdict(BaseModel):
    label: Label | None
    """None: the reply had no usable label (counted as WRONG in J)."""
    raw: str
    judge: str
    """Which judge produced it, e.g. `local:smollm2-135m-instruct` or `openai:gpt-4o-mini@https://...`."""
    error: str | None = None

    @property
    def correct(self) -> bool:
        return self.label == "CORRECT"


def _norm(word: str) -> Label:
    return "CORRECT" if word.upper() == "CORRECT" else "WRONG"


def parse_judge_reply(text: str | None) -> Label | None:
    """CORRECT / WRONG from a judge reply, or None when it names neither (or is empty).

    Order of trust: a JSON object with a `label` key; a `label: X` pair in plain text; the last
    upper-case CORRECT/WRONG/INCORRECT word (the prompt asks for the label last); the last such word
    in any case. INCORRECT and "not correct" count as WRONG."""
    if not isinstance(text, str) or not text.strip():
        return None
    for blob in reversed(_JSON_OBJ.findall(text)):
        try:
            obj = json.loads(blob)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            for key, value in obj.items():
                if str(key).strip().lower() == "label" and isinstance(value, str):
                    v = value.strip().upper()
                    if v in ("CORRECT", "WRONG", "INCORRECT"):
                        return _norm(v)
    pairs = _LABEL_KEY.findall(text)
    if pairs:
        return _norm(pairs[-1])
    text = _NEGATED.sub(" WRONG", text)
    for pattern in (_WORD, _WORD_ANY):
        words = pattern.findall(text)
        if words:
            return _norm(words[-1])
    return None


class JudgeItem(BaseModel):
    question: str
    gold: str
    prediction: str


def judge_messages(item: JudgeItem):
    return msgs(("user", JUDGE_PROMPT.format(question=item.question, gold=item.gold,
                                             prediction=item.prediction or "(no answer)")))


class Judge(Protocol):
    name: str
    """Recorded beside every J score."""

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]: ...


class EngineJudge:
    """A local engine as the judge (greedy decoding). With the transformers engine the shared
    instructions are prefilled once (`PrefixCachedGenerator`); answers are the same either way."""

    def __init__(self, engine: Engine, max_new_tokens: int = 48, prefix_cache: bool = True) -> None:
        from tsubasa.eval.prefix import PrefixCachedGenerator

        self.engine = engine
        self.name = f"local:{engine.model_name}"
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        self.generator = PrefixCachedGenerator(engine) if prefix_cache else None

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        if not items:
            return []
        prompts = [judge_messages(it) for it in items]
        if self.generator is not None and self.generator.supported:
            probe = [judge_messages(JudgeItem(question=q, gold="-", prediction="-")) for q in ("A?", "B?")]
            self.generator.set_prefix(*probe)
            gens = self.generator.generate(prompts, self.params)
        else:
            gens = self.engine.generate(prompts, self.params)
        return [Verdict(label=parse_judge_reply(g.text), raw=g.text, judge=self.name) for g in gens]


class OpenAIJudge:
    """Any OpenAI-compatible chat endpoint as the judge (GPT-4o-mini in Mem0 / Memory-R1)."""

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 timeout_s: float = 60.0, max_retries: int = 3, max_tokens: int = 128) -> None:
        try:
            from openai import OpenAI
        except ImportError:  # pragma: no cover - the eval extra installs it
            raise RuntimeError("an OpenAI-compatible judge needs the openai package: pip install 'tsubasa[eval]'") \
                from None
        # Local OpenAI-compatible servers often want no key; the client insists on a non-empty one.
        self.client = OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout_s, max_retries=0)
        self.model = model
        self.max_retries = max_retries
        self.max_tokens = max_tokens
        self.name = f"openai:{model}" + (f"@{base_url}" if base_url else "")

    def _one(self, item: JudgeItem) -> Verdict:
        last_error = ""
        for attempt in range(self.max_retries + 1):
            try:
                resp = self.client.chat.completions.create(
                    model=self.model, temperature=0.0, max_tokens=self.max_tokens,
                    messages=[m.model_dump() for m in judge_messages(item)])
                text = resp.choices[0].message.content or ""
                return Verdict(label=parse_judge_reply(text), raw=text, judge=self.name)
            except Exception as exc:  # network / HTTP errors: retry, then record (never abort the run)
                last_error = f"{type(exc).__name__}: {exc}"
                if attempt < self.max_retries:
                    time.sleep(min(2.0 ** attempt, 10.0))
        return Verdict(label=None, raw="", judge=self.name, error=last_error)

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        return [self._one(it) for it in items]


def make_judge(kind: str, engine: Engine | None = None, *, base_url: str | None = None,
               model: str | None = None, api_key: str | None = None, max_new_tokens: int = 48) -> Judge | None:
    """`none` -> None (no J); `local` -> the given engine; `openai` -> an endpoint (needs `model`);
    `auto` -> `openai` when a base URL or model is configured, else `local`."""
    if kind == "auto":
        kind = "openai" if (base_url or model) else "local"
    if kind == "none":
        return None
    if kind == "local":
        if engine is None:
            raise ValueError("judge 'local' needs an engine")
        return EngineJudge(engine, max_new_tokens=max_new_tokens)
    if kind == "openai":
        if not model:
            raise ValueError("judge 'openai' needs a judge model name (--judge-model / eval.judge_model)")
        return OpenAIJudge(model=model, base_url=base_url, api_key=api_key, max_tokens=max(max_new_tokens, 64))
    raise ValueError(f"unknown judge {kind!r}: use auto, local, openai or none")
