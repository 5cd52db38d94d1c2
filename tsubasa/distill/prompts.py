"""Prompts of the reading wing: QA synthesis, the teacher's rich-context prompt and the student's
grounded prompt. The student prompt is the format adapters are trained on: serving an adapter with
a different prompt wastes what it learned, so serving and evaluation build it with
`student_messages` too."""

from __future__ import annotations

from collections.abc import Sequence

from tsubasa.llm.base import ChatMessage, msgs

PROMPT_VERSION = 3  # part of cache keys: bump when a prompt changes (3: memories dated "[7 May 2023]")

SYNTH_SYSTEM = "You write quiz questions about facts. Every answer is a few words taken from the fact."

SYNTH_USER = """Fact: {fact}

Write one question about this fact and its short answer.
Question: <question>
Answer: <answer>"""

# Same wording as the evaluation harness's "concise" answer prompt (tsubasa.eval.systems.answer_messages,
# which this layer may not import; a unit test keeps the two identical), so an adapter is trained on
# exactly the prompt it is evaluated and served with.
ANSWER_SYSTEM = ("You answer questions about people from their past conversations, using only the context "
                 "given. Answer in under 6 words. For a question about time, answer with the date or "
                 "period. Do not explain.")


def synth_messages(fact: str) -> list[ChatMessage]:
    return msgs(("system", SYNTH_SYSTEM), ("user", SYNTH_USER.format(fact=fact)))


def student_messages(question: str, grounding: Sequence[str]) -> list[ChatMessage]:
    """The student's (and serving's) prompt: the top-k memories, if any, then the question."""
    if grounding:
        memories = "\n".join(f"- {g}" for g in grounding)
        body = f"Memories:\n{memories}\n\nQuestion: {question}\nAnswer:"
    else:
        body = f"Question: {question}\nAnswer:"
    return msgs(("system", ANSWER_SYSTEM), ("user", body))


def teacher_messages(question: str, transcript: str, memories: Sequence[str]) -> list[ChatMessage]:
    """The teacher's prompt: the rich context (source conversation and many memories), then the question."""
    parts = []
    if memories:
        parts.append("Memories:\n" + "\n".join(f"- {m}" for m in memories))
    if transcript:
        parts.append(f"Conversation:\n{transcript}")
    parts.append(f"Question: {question}\nAnswer:")
    return msgs(("system", ANSWER_SYSTEM), ("user", "\n\n".join(parts)))
